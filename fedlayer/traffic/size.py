"""Serialised sizes of Flower messages, measured in one pass.

Flower 1.39 ships a message as content-addressed objects (the Message, its
RecordDict, each record, each Array and its ArrayChunks), one RPC each. The
bytes on the wire for a message are therefore the serialised sizes of all its
distinct nested objects; this is what the SuperLink stores and forwards, so it
is what fedlayer counts (never the raw array sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import InflatableObject

from fedlayer.layers import to_arrayrecord
from fedlayer.wire.records import PAYLOAD_RECORDS


@dataclass
class MessageSize:
    """A message's bytes: in all, in its payload records, and per array key of those."""

    total: int
    payload: int = 0
    by_key: dict[str, int] = field(default_factory=dict)


class _Sizes:
    """Distinct objects of a tree and their serialised sizes; each object is serialised once."""

    def __init__(self) -> None:
        self.size: dict[str, int] = {}

    def tree(self, obj: InflatableObject, object_id: str | None = None) -> set[str]:
        """Ids of ``obj`` and all its descendants.

        Children's ids are taken from their parent's ``children`` keys, which
        Flower caches for array chunks: asking a chunk for ``object_id`` would
        hash its data again.
        """
        object_id = object_id or obj.object_id
        ids = {object_id}
        for child_id, child in (obj.children or {}).items():
            ids |= self.tree(child, child_id)
        if object_id not in self.size:
            self.size[object_id] = len(obj.deflate())
        return ids

    def total(self, ids: set[str]) -> int:
        return sum(self.size[i] for i in ids)


def measure_message(message: Message) -> MessageSize:
    """Total, payload and per-array bytes of a message.

    Payload: the records named in ``PAYLOAD_RECORDS`` (each counted over its
    own distinct objects); per key: each array of an ArrayRecord payload.
    """
    sizes = _Sizes()
    payload, by_key = 0, {}
    if not message.has_error():
        for name in PAYLOAD_RECORDS:
            if name not in message.content:
                continue
            record = message.content[name]
            if isinstance(record, ArrayRecord):
                for key, array in record.items():
                    by_key[key] = sizes.total(sizes.tree(array))
            payload += sizes.total(sizes.tree(record))
    return MessageSize(total=sizes.total(sizes.tree(message)), payload=payload, by_key=by_key)


def object_tree_bytes(obj: InflatableObject) -> int:
    """Serialised size of an object and all its distinct descendants."""
    sizes = _Sizes()
    return sizes.total(sizes.tree(obj))


def message_bytes(message: Message) -> int:
    """Bytes a message occupies on the wire (all distinct nested objects)."""
    return object_tree_bytes(message)


def payload_bytes(message: Message) -> int:
    """Bytes of the model payload records of a message (see ``PAYLOAD_RECORDS``)."""
    return measure_message(message).payload


def trained_model_bytes(state: dict[str, np.ndarray]) -> int:
    """Serialised size of an ArrayRecord of ``state`` once its float tensors are trained.

    Flower stores equal objects once (arrays, their chunks, and the record's
    references to them), and an initial model often holds equal arrays
    (BatchNorm's zero means and unit variances) that training makes distinct,
    while integer counters (``num_batches_tracked``) stay equal. So the size of
    a FedAvg client's upload, the unit of the FedAvg equivalent, is that of
    the state with its float tensors replaced by random values of the same
    shape and dtype (the serialised size does not depend on the values).
    """
    rng = np.random.default_rng(0)
    trained = {
        key: rng.standard_normal(value.shape).astype(value.dtype) if value.dtype.kind == "f" else value
        for key, value in state.items()
    }
    return object_tree_bytes(to_arrayrecord(trained))
