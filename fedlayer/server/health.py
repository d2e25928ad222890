"""Per-client health: who was sampled, who answered, how fast, how many bytes, what was refused.

``ClientHealth`` observes every exchange (``fedlayer.server.exchange``):
the measured size of each message and reply and each reply's round trip,
keyed by node. At the end of a round the nodes are mapped to client ids (a
node is identified during the round) and folded into per-client totals; the
totals are part of the checkpoint, so a resumed run continues them exactly.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import Message, MessageType

from fedlayer.methods.base import Rejection
from fedlayer.wire.records import METRICS, TRAIN_SECONDS

TRAIN_LOSS = "train-loss"


@dataclass
class ClientRound:
    """One client's numbers in one round (what TensorBoard plots per client)."""

    bytes_down: int = 0
    bytes_up: int = 0
    sampled: bool = False
    replied: bool = False
    error_replies: int = 0
    train_loss: float | None = None
    #: the reply's own training time; kept only when the strategy accepted the reply
    train_seconds: float | None = None
    round_trip_seconds: float | None = None


@dataclass
class ClientTotals:
    """One client's numbers over the run (a row of ``clients.csv``)."""

    rounds_sampled: int = 0
    replies: int = 0
    error_replies: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    round_trip_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0

    def add(self, step: ClientRound) -> None:
        self.rounds_sampled += int(step.sampled)
        self.replies += int(step.replied)
        self.error_replies += step.error_replies
        self.bytes_down += step.bytes_down
        self.bytes_up += step.bytes_up
        if step.round_trip_seconds is not None:
            self.round_trip_seconds.append(step.round_trip_seconds)
        if step.train_seconds is not None:
            self.train_seconds.append(step.train_seconds)


def _number(record: Any, key: str) -> float | None:
    """``record[key]`` if it is a real number (a reply's metrics are untrusted input)."""
    value = None if record is None else record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class ClientHealth:
    """Per-client totals of a run; an ``ExchangeObserver`` of its exchanges."""

    def __init__(self) -> None:
        self.clients: dict[int, ClientTotals] = {}
        #: how many of the strategy's rejections are already counted
        self.rejections_seen = 0
        self._nodes: dict[int, ClientRound] = {}

    # ExchangeObserver ------------------------------------------------------
    def sent(self, message: Message, nbytes: int) -> None:
        step = self._nodes.setdefault(message.metadata.dst_node_id, ClientRound())
        step.bytes_down += nbytes
        step.sampled |= message.metadata.message_type == MessageType.TRAIN

    def replied(self, reply: Message, nbytes: int, round_trip: float) -> None:
        step = self._nodes.setdefault(reply.metadata.src_node_id, ClientRound())
        step.bytes_up += nbytes
        if reply.has_error():
            step.error_replies += 1
            return
        if reply.metadata.message_type != MessageType.TRAIN:
            return
        step.replied = True
        step.round_trip_seconds = round_trip
        metrics = reply.content.metric_records.get(METRICS)
        step.train_loss = _number(metrics, TRAIN_LOSS)
        step.train_seconds = _number(metrics, TRAIN_SECONDS)

    # the round -------------------------------------------------------------
    def end_round(self, client_of: dict[int, int], rejections: list[Rejection]) -> dict[int, ClientRound]:
        """Fold the round's observations into the totals; the round's numbers by client id.

        ``client_of``: node id -> client id (nodes never identified are left out);
        ``rejections``: all of the strategy's refusals so far (the new ones are counted). A refused
        reply's training time is dropped: only accepted replies' (finite, >= 0: ``validate_train_reply``) count.
        """
        new = rejections[self.rejections_seen :]
        refused = {rejection.node_id for rejection in new}
        steps: dict[int, ClientRound] = {}
        for node, step in self._nodes.items():
            if node in refused:
                step.train_seconds = None
            if node in client_of:
                client = client_of[node]
                steps[client] = step
                self.clients.setdefault(client, ClientTotals()).add(step)
        self._nodes = {}
        for rejection in new:
            if rejection.node_id in client_of:
                refusals = self.clients.setdefault(client_of[rejection.node_id], ClientTotals()).refusals
                refusals[rejection.reason] = refusals.get(rejection.reason, 0) + 1
        self.rejections_seen = len(rejections)
        return steps

    def rows(self, hosts: dict[str, set[int]]) -> list[dict[str, Any]]:
        """One row per client, ordered by client id (``clients.csv``)."""
        host_of = {client: host for host, clients in hosts.items() for client in clients}
        return [
            {
                "client": client,
                "host": host_of.get(client, ""),
                "rounds_sampled": totals.rounds_sampled,
                "replies": totals.replies,
                "error_replies": totals.error_replies,
                "refusals": sum(totals.refusals.values()),
                "refusal_reasons": "; ".join(f"{reason} (x{n})" for reason, n in Counter(totals.refusals).most_common()),
                "median_train_seconds": _median(totals.train_seconds),
                "median_round_trip_seconds": _median(totals.round_trip_seconds),
                "bytes_down": totals.bytes_down,
                "bytes_up": totals.bytes_up,
            }
            for client, totals in sorted(self.clients.items())
        ]

    def state_dict(self) -> dict[str, Any]:
        """Serialisable totals (for checkpoints)."""
        return {"rejections_seen": self.rejections_seen, "clients": {str(c): asdict(t) for c, t in self.clients.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict`` output (an empty dict: a checkpoint from before client health)."""
        self.rejections_seen = int(state.get("rejections_seen", 0))
        self.clients = {int(c): ClientTotals(**t) for c, t in state.get("clients", {}).items()}
        self._nodes = {}
