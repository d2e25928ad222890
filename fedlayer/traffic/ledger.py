"""The byte ledger: what each round cost, by direction and by layer, next to FedAvg.

For every message the server pushes and every reply it pulls, the ledger keeps
the measured serialised size. Next to it, it keeps what FedAvg would have sent
for the same participation: the same message with its payload records replaced
by the full model. The ratio of the two is the saving fedlayer reports.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import Message, MessageType

from fedlayer.layers import ModelLayers
from fedlayer.wire.records import CODEC_RESYNC, CONFIG, TRAFFIC
from fedlayer.traffic.size import MessageSize, measure_message

#: Where the bytes of array keys outside every exchanged layer go (only a reply that is then
#: refused carries such keys; the method's own traffic is all named by its layers).
FOREIGN_KEYS = "(keys of no layer)"


@dataclass
class RoundTraffic:
    """Traffic of one round (train and evaluate messages together)."""

    round: int
    bytes_down: int = 0
    bytes_up: int = 0
    fedavg_bytes_down: int = 0
    fedavg_bytes_up: int = 0
    messages_down: int = 0
    messages_up: int = 0
    layer_bytes_down: dict[str, int] = field(default_factory=dict)
    layer_bytes_up: dict[str, int] = field(default_factory=dict)
    client_reported_down: int = 0
    client_reported_up: int = 0
    #: identity queries and their answers: included in bytes_*, not in messages_*
    control_bytes_down: int = 0
    control_bytes_up: int = 0
    #: codec stage: train downloads sent as a dense resync (the client had lost its reference)
    codec_resyncs: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        into[key] = into.get(key, 0) + value


class ByteLedger:
    """Per-round byte accounting, measured from the serialised messages.

    Parameters
    ----------
    layers : ModelLayers
        Every layer the method's messages may carry (``strategy.exchanged_layers()``: the
        model's, and FedLP's level heads), to attribute array bytes to layers.
    full_model_bytes : int
        Serialised size of an ArrayRecord holding the whole model: what FedAvg
        ships as payload in each direction for each participating client.
    """

    def __init__(self, layers: ModelLayers, full_model_bytes: int) -> None:
        self.layers = layers
        self.full_model_bytes = full_model_bytes
        self.rounds: dict[int, RoundTraffic] = {}

    def _round(self, server_round: int) -> RoundTraffic:
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundTraffic(round=server_round)
        return self.rounds[server_round]

    def _layer_bytes(self, size: MessageSize) -> dict[str, int]:
        per_layer: dict[str, int] = defaultdict(int)
        for key, nbytes in size.by_key.items():
            per_layer[self.layers.layer_of(key) if key in self.layers.keys_set else FOREIGN_KEYS] += nbytes
        return per_layer

    def _fedavg_equivalent(self, size: MessageSize) -> int:
        return size.total - size.payload + self.full_model_bytes

    def record_down(self, server_round: int, message: Message, *, control: bool = False) -> int:
        """Count a message pushed to a node; returns its size.

        ``control=True`` marks a message without a model that FedAvg would
        send as it is (an identity query): counted in bytes, not as a round message.
        """
        size = measure_message(message)
        traffic = self._round(server_round)
        traffic.bytes_down += size.total
        if control:
            traffic.control_bytes_down += size.total
            traffic.fedavg_bytes_down += size.total
            return size.total
        traffic.messages_down += 1
        config = message.content.config_records.get(CONFIG)
        traffic.codec_resyncs += int(bool(config is not None and config.get(CODEC_RESYNC, False)))
        traffic.fedavg_bytes_down += self._fedavg_equivalent(size)
        _add(traffic.layer_bytes_down, self._layer_bytes(size))
        return size.total

    def record_up(self, server_round: int, reply: Message, *, control: bool = False) -> int:
        """Count a reply pulled from a node; returns its size."""
        size = measure_message(reply)
        traffic = self._round(server_round)
        traffic.bytes_up += size.total
        if control:
            traffic.control_bytes_up += size.total
            traffic.fedavg_bytes_up += size.total
        else:
            traffic.messages_up += 1
            # An evaluation reply carries metrics only, in FedAvg as well.
            evaluation = reply.metadata.message_type == MessageType.EVALUATE
            traffic.fedavg_bytes_up += size.total if evaluation else self._fedavg_equivalent(size)
            _add(traffic.layer_bytes_up, self._layer_bytes(size))
        if not reply.has_error():
            metrics = reply.content.metric_records.get(TRAFFIC)
            if metrics is not None:
                traffic.client_reported_down += int(metrics.get("bytes-received", 0))
                traffic.client_reported_up += int(metrics.get("bytes-sent", 0))
        return size.total

    def totals(self) -> dict[str, int]:
        """Cumulative totals over all rounds."""
        keys = (
            "bytes_down",
            "bytes_up",
            "fedavg_bytes_down",
            "fedavg_bytes_up",
            "client_reported_down",
            "client_reported_up",
            "control_bytes_down",
            "control_bytes_up",
            "codec_resyncs",
        )
        return {k: sum(getattr(t, k) for t in self.rounds.values()) for k in keys}

    def state_dict(self) -> dict[str, Any]:
        """Serialisable ledger state (for checkpoints)."""
        return {str(r): t.as_dict() for r, t in self.rounds.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict`` output."""
        self.rounds = {int(key): RoundTraffic(**value) for key, value in state.items()}
