"""The ClientApp Flower loads in deployment: the node's warm worker answers, else fedlayer's ClientApp, cold.

Imports only ``flwr`` and the standard library: on the warm path this process
(one per message, started by Flower) never imports torch or fedlayer's
methods. It falls back to the cold path, in this process, whenever the worker
cannot answer for this exact code: no ``state-dir`` in the node config, no
worker listening, a worker of another user or running other code (the
handshake compares ``protocol.code_digest``), or a worker that went away
before its reply (killed, restarted, out of memory). None of these is an error
reply. A worker that accepted the message but misses its deadline (below the
round timeout, see ``worker.round_deadline``) is one: the round could not use
a cold answer any more.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from logging import INFO, WARNING

from fedlayer.client.warm.protocol import (
    SOCKET,
    ProtocolError,
    check_peer,
    connect,
    hello,
    recv_frame,
    recv_json,
    send_frame,
    send_json,
    socket_folder,
)

#: Seconds to connect and get the worker's handshake (it answers at once, even while busy).
HANDSHAKE_TIMEOUT = 10.0


class WorkerAppError(RuntimeError):
    """fedlayer's ClientApp raised in the worker (``"<type>: <text>"``); Flower replies with an error, as when it raises cold."""


class WorkerDeadline(TimeoutError):
    """The worker accepted a message and did not answer within its deadline."""


def worker_socket(context: Context) -> Path | None:
    """The node's worker socket, when its node config names a state folder holding one."""
    state_dir = context.node_config.get("state-dir")
    if not state_dir:
        return None
    path = socket_folder(str(state_dir)) / SOCKET
    return path if path.exists() else None


def forward(message: Message, context: Context) -> Message | None:
    """The worker's reply to ``message`` (``context.state`` updated as the call left it);
    None when the worker cannot answer and the message must run cold."""
    path = worker_socket(context)
    if path is None:
        return None
    try:
        sock = connect(path, HANDSHAKE_TIMEOUT)
    except OSError as err:
        log(INFO, "fedlayer: no warm worker at %s (%s); running cold", path, err)
        return None
    with sock:
        try:
            check_peer(sock, os.getuid())
            mine = hello(cache=path.parent)  # the digest kept in the node's private folder: a stat per file, not a hash
            send_json(sock, mine)
            theirs = recv_json(sock)
            if theirs != mine:
                log(WARNING, "fedlayer: the warm worker runs other code (%.12s, this app %.12s); running cold",
                    theirs.get("code"), mine["code"])
                return None
            send_frame(sock, message_to_proto(message).SerializeToString())
            send_frame(sock, context_to_proto(context).SerializeToString())
            deadline = float(recv_json(sock)["deadline"])
        except (OSError, ProtocolError, KeyError, ValueError) as err:
            log(WARNING, "fedlayer: the warm worker did not take the message (%s); running cold", err)
            return None
        sock.settimeout(deadline)
        try:
            outcome = recv_json(sock)
            if not outcome.get("ok"):
                raise WorkerAppError(str(outcome.get("error")))
            reply = message_from_proto(ProtoMessage.FromString(recv_frame(sock)))
            updated = context_from_proto(ProtoContext.FromString(recv_frame(sock)))
        except TimeoutError:
            raise WorkerDeadline(f"the warm worker did not answer within {deadline:.0f} s") from None
        except (OSError, ProtocolError) as err:
            log(WARNING, "fedlayer: the warm worker went away before replying (%s); running cold", err)
            return None
    context.state = updated.state
    return reply


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere): how long the
    ``flwr-clientapp`` process took to start, import ``flwr`` and load this app before a message reached it."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _serve(message: Message, context: Context) -> Message:
    age, started = process_age(), time.perf_counter()
    reply, path, imports = forward(message, context), "warm", 0.0
    if reply is None:
        from fedlayer.client.app import app as cold

        path, imports = "cold", time.perf_counter() - started  # the handler's time to here: mostly importing fedlayer and torch
        reply = cold(message, context)
    # One line per message: which path answered and where the time went (benchmarks.segments reads it).
    log(INFO, "fedlayer: %s message answered %s in %.3f s (imports %.3f s), %s s after the ClientApp process started",
        message.metadata.message_type, path, time.perf_counter() - started, imports, "?" if age is None else f"{age:.2f}")
    return reply


app = ClientApp()
app.train()(_serve)
app.evaluate()(_serve)
app.query()(_serve)
