"""A Flower ``Grid`` that delivers every message to a ClientApp in this process.

The server side (``FederatedRun``) and the client side (the real ClientApp
with its mods) run unchanged; only the transport is replaced by a protobuf
round trip, so each side gets its own copy of a message as over the wire.
Node ids, message ids and the run id are fixed, so serialised sizes (and
therefore the byte ledger) repeat to the byte from run to run.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import DictConfig

from fedlayer.client.app import make_client_app
from fedlayer.server.loop import FederatedRun

RUN_ID = 1
#: Node ids with a fixed varint length, so message sizes repeat exactly.
FIRST_NODE_ID = 1_000_000_000_000


class SimulatedCrash(RuntimeError):
    """The server process dying mid-round, as an exception."""


def wire_copy(message: Message) -> Message:
    """The message as the other side receives it (a protobuf round trip)."""
    return message_from_proto(message_to_proto(message))


@dataclass
class InProcessGrid(Grid):
    """Nodes ``0..num_nodes-1`` (partition ids) served by ``client_app`` in process.

    ``node_config(partition)`` gives each node's node config; ``dropped``
    node ids never answer (their messages time out like a dead SuperNode's);
    ``leave_after`` maps node ids to a round: the node answers that round's
    training message, then disconnects (it is no longer listed, and never answers).
    ``crash_at=(round, n)`` raises ``SimulatedCrash`` (the server dies) when the
    ``n+1``-th training message of that round is pushed, after the first ``n``
    were served: clients have trained (and saved state) for a round the server
    never checkpointed.
    """

    client_app: ClientApp
    num_nodes: int
    node_config: Callable[[int], dict] = field(default=lambda p: {})
    run_config: dict = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)
    leave_after: dict[int, int] = field(default_factory=dict)
    first_node_id: int = FIRST_NODE_ID
    crash_at: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # Messages take their run id from the task identity the engine sets.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1
        self.contexts = {
            self.first_node_id + p: Context(
                run_id=RUN_ID,
                node_id=self.first_node_id + p,
                node_config=self.node_config(p),
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            for p in range(self.num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._count = 0
        self._served: dict[int, int] = {}
        self.gone: set[int] = set()

    # Grid's abstract interface ------------------------------------------------
    @property
    def run(self):  # type: ignore[override]
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[override]  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.contexts if node not in self.gone]

    def _next_id(self) -> str:
        self._count += 1
        return str(uuid.UUID(int=self._count))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = self._next_id()
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node = message.metadata.dst_node_id
            self._maybe_crash(message)
            if node in self.dropped or node in self.gone or node not in self.contexts:
                continue
            received = wire_copy(message)
            try:
                reply = self.client_app(received, self.contexts[node])
            except Exception as err:  # as a SuperNode reports a ClientApp exception (flwr/supernode/runtime/run_clientapp.py)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(type(err)) + ":<'" + str(err) + "'>"), reply_to=received)
            if message.metadata.message_type == "train" and self.leave_after.get(node) == int(received.content["config"]["server-round"]):
                self.gone.add(node)
            reply.metadata.__dict__["_message_id"] = self._next_id()
            self._replies[message_id] = wire_copy(reply)
        return ids

    def _maybe_crash(self, message: Message) -> None:
        if self.crash_at is None or message.metadata.message_type != "train":
            return
        server_round = int(message.content["config"]["server-round"])
        served = self._served.get(server_round, 0)
        if server_round == self.crash_at[0] and served >= self.crash_at[1]:
            raise SimulatedCrash(f"server killed in round {server_round} after {served} messages")
        self._served[server_round] = served + 1

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]


def run_in_process(cfg: DictConfig, **grid_options: Any) -> tuple[FederatedRun, dict[str, Any]]:
    """A whole run of ``cfg`` in process: the real round loop and ClientApp, one node per
    partition; the finished run and its summary. ``grid_options`` go to ``InProcessGrid``."""
    num_clients = int(cfg.federation.num_clients)
    grid = InProcessGrid(
        make_client_app(cfg), num_clients,
        # a fixed host name, so message sizes repeat on every machine
        node_config=lambda p: {"partition-id": p, "num-partitions": num_clients, "host": "in-process"}, **grid_options,
    )
    run = FederatedRun(cfg)
    return run, run.run(grid)
