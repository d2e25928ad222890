"""The warm worker: one long-lived process per device that answers the ClientApp's messages.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message, which
then pays for starting Python, importing torch and fedlayer, building the data
split and the first optimizer (and on CUDA, the CUDA context). The worker pays
that once: the forwarding ClientApp (``fedlayer.client.warm.forward``) hands it
each Message with its Context over a Unix socket in the node's private state
folder, the worker runs fedlayer's own ClientApp on them and sends back the
reply and the updated Context. It holds no round state of its own: what a
node keeps between rounds travels in the Context (Flower keeps it per run) and
the node's state files, exactly as on the cold path; what it keeps warm is
imports, the process-wide caches (keyed by the config they were built from),
and one session per run (keyed by run id, run config and node config, at
most ``MAX_SESSIONS``): its ClientApp and its model, on the run's device
(on CUDA with the CUDA context), into whose tensors each message loads the
state it received instead of building and moving a new model
(``fedlayer.models.kept``: one model per session, rebuilt when the structure
it is keyed by changes; optimizers are built per round as on the cold path).

``fedlayer-client`` starts it (``python -m fedlayer.client.warm.worker
--state-dir DIR``) and restarts it when it ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity
from google.protobuf.message import DecodeError

from fedlayer.client.app import make_client_app
from fedlayer.client.runtime import client_config
from fedlayer.client.warm.protocol import (
    PROTOCOL,
    SOCKET,
    PeerRefused,
    ProtocolError,
    check_peer,
    hello,
    private_folder,
    recv_frame,
    recv_json,
    send_frame,
    send_json,
    socket_address,
)
from fedlayer.models.kept import KeptModel

LOG = logging.getLogger("fedlayer.warm")
#: Exit status when a forwarding process went away mid-request: the call is
#: abandoned by ending the process (a running torch step cannot be interrupted
#: safely); ``fedlayer-client`` starts a fresh worker.
CANCELLED = 75
#: A request's deadline, as a share of ``federation.round_timeout``: the
#: forwarding side gives up before the server's round does.
DEADLINE_SHARE = 0.9
#: Runs (run id + config) a worker keeps a session (ClientApp and model) for.
MAX_SESSIONS = 4


@dataclass(frozen=True)
class Session:
    """What a worker keeps for one run: the ClientApp, and the model its messages load into."""

    app: ClientApp
    kept: KeptModel

    @classmethod
    def new(cls) -> Session:
        kept = KeptModel()
        return cls(make_client_app(kept=kept), kept)


def session_key(context: Context) -> tuple[int, str]:
    """(run id, digest of the run config and node config): what a per-run cache is keyed by."""
    config = json.dumps([sorted((k, str(v)) for k, v in context.run_config.items()),
                         sorted((k, str(v)) for k, v in context.node_config.items())])
    return context.run_id, hashlib.sha256(config.encode()).hexdigest()[:16]


def round_deadline(message: Message, context: Context) -> float:
    """Seconds the forwarding side waits for the reply: ``DEADLINE_SHARE`` of the round
    timeout, and never past the message's own time to live."""
    metadata = message.metadata
    left = metadata.created_at + metadata.ttl - time.time()
    try:
        left = min(left, DEADLINE_SHARE * float(client_config(context, None).federation.round_timeout))
    except Exception as err:  # the ClientApp call reports a bad config; the message's TTL still bounds it
        LOG.debug("no round timeout for run %d: %s", context.run_id, err)
    return max(left, 1.0)


class Worker:
    """Serves connections on the socket in ``<state_dir>/warm``; one ClientApp call at a time."""

    def __init__(self, state_dir: Path) -> None:
        self.path = private_folder(state_dir) / SOCKET
        self.uid = os.getuid()
        self.hello = hello()
        self.sessions: OrderedDict[tuple[int, str], Session] = OrderedDict()
        self._calls = threading.Lock()

    def listen(self) -> socket.socket:
        """Bind the socket (0600, replacing a stale one) and listen."""
        if self.path.is_socket():
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address, folder = socket_address(self.path)
        umask = os.umask(0o177)
        try:
            listener.bind(address)
        finally:
            os.umask(umask)
            if folder is not None:
                os.close(folder)
        self.path.chmod(0o600)
        listener.listen(16)
        return listener

    def serve_forever(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        """One request: peer and code checks, the call, the reply."""
        with conn:
            try:
                check_peer(conn, self.uid)
                theirs = recv_json(conn)
                other_code = theirs.get("protocol") != PROTOCOL or theirs.get("code") != self.hello["code"]
                if other_code:  # logged before the answer, so the log already says it when the peer goes cold
                    LOG.warning("refused a request for other code (code %.12s, this worker runs %.12s)",
                                theirs.get("code"), self.hello["code"])
                send_json(conn, self.hello)
                if other_code:
                    return
                message = message_from_proto(ProtoMessage.FromString(recv_frame(conn)))
                context = context_from_proto(ProtoContext.FromString(recv_frame(conn)))
                send_json(conn, {"deadline": round_deadline(message, context)})
                with self._calls:
                    if _peer_gone(conn):
                        LOG.warning("dropped a %s message: its ClientApp process went away while it waited",
                                    message.metadata.message_type)
                        return
                    outcome = self.call(message, context, conn)
                if isinstance(outcome, Message):
                    send_json(conn, {"ok": True})
                    send_frame(conn, message_to_proto(outcome).SerializeToString())
                    send_frame(conn, context_to_proto(context).SerializeToString())
                else:
                    send_json(conn, {"ok": False, "error": outcome})
            except (PeerRefused, ProtocolError, DecodeError, ValueError) as err:  # ValueError: a frame that is no Flower Message/Context
                LOG.warning("refused a connection: %s", err)
            except OSError as err:
                LOG.warning("connection lost: %s", err)

    def call(self, message: Message, context: Context, conn: socket.socket) -> Message | str:
        """Run the run's ClientApp on ``message``; the reply, or the exception as text."""
        key = session_key(context)
        session = self.sessions.pop(key, None)
        if session is None:
            LOG.info("run %d: new session (config %s)", key[0], key[1])
            session = Session.new()
        self.sessions[key] = session
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        builds = session.kept.builds
        TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id
        started = time.perf_counter()
        stop = threading.Event()
        threading.Thread(target=_cancel_when_gone, args=(conn, stop), daemon=True).start()
        try:
            reply = session.app(message, context)
        except Exception as err:  # the cold path's ClientApp process would raise it to Flower too
            LOG.exception("run %d: the ClientApp raised", context.run_id)
            session.kept.forget()  # whatever the call left in the model, the next message builds a new one
            return f"{type(err).__name__}: {err}"
        finally:
            stop.set()
        LOG.info("served %s run %d node %d in %.3f s (%s model)", message.metadata.message_type, context.run_id,
                 context.node_id, time.perf_counter() - started,
                 "no" if session.kept.model is None else "new" if session.kept.builds > builds else "kept")
        return reply


def _peer_gone(conn: socket.socket) -> bool:
    """Whether the forwarding side closed its end (it sends nothing while it waits)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except OSError:  # reset by the peer
        return True


def _cancel_when_gone(conn: socket.socket, stop: threading.Event) -> None:
    """End the process when the forwarding side goes away during the call (see ``CANCELLED``)."""
    while not stop.wait(0.2):
        if _peer_gone(conn) and not stop.is_set():
            LOG.warning("the ClientApp process went away mid-call: cancelling (exit %d)", CANCELLED)
            logging.shutdown()
            os._exit(CANCELLED)


def _prewarm() -> None:
    """Build a first optimizer: the first ``step`` imports ``torch._dynamo`` (seconds)."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).step()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedlayer-warm-worker", description="Serve this node's ClientApp messages from one warm process.")
    parser.add_argument("--state-dir", required=True, help="the node's state folder (its node config's state-dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="fedlayer warm worker: %(message)s")
    worker = Worker(Path(args.state_dir).expanduser().resolve())
    _prewarm()
    listener = worker.listen()

    def leave(signum: int, _frame: object) -> None:
        worker.path.unlink(missing_ok=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    LOG.info("ready on %s (pid %d, code %.12s)", worker.path, os.getpid(), worker.hello["code"])
    worker.serve_forever(listener)


if __name__ == "__main__":
    main()
