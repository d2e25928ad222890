"""Serialised sizes of Flower messages.

Flower 1.39 ships a message as content-addressed objects (the Message, its
RecordDict, each record, each Array and its ArrayChunks), one RPC each. The
bytes on the wire for a message are therefore the deflated sizes of all its
distinct nested objects; this is what the SuperLink stores and forwards, so it
is what fedlayer counts (never the raw array sizes).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects

from fedlayer.layers import to_arrayrecord

#: Record names that carry model payload (as opposed to config and metrics).
#: Strategies put dense layers in ``arrays`` and compressed updates in ``payload``.
PAYLOAD_RECORDS = ("arrays", "payload")


def object_tree_bytes(obj: InflatableObject) -> int:
    """Serialised size of an object and all its distinct descendants."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def message_bytes(message: Message) -> int:
    """Bytes a message occupies on the wire (all distinct nested objects)."""
    return object_tree_bytes(message)


def payload_bytes(message: Message) -> int:
    """Bytes of the model payload records of a message (see ``PAYLOAD_RECORDS``)."""
    if message.has_error():
        return 0
    content = message.content
    return sum(
        object_tree_bytes(content[name]) for name in PAYLOAD_RECORDS if name in content
    )


def array_bytes_by_key(record: ArrayRecord | ConfigRecord) -> dict[str, int]:
    """Serialised bytes of each array of an ArrayRecord, keyed by state-dict key."""
    if not isinstance(record, ArrayRecord):
        return {}
    return {key: object_tree_bytes(array) for key, array in record.items()}


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
