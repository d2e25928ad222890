"""Reply validation: nothing reaches the global model before it passes here.

A reply is checked for errors, a usable example count, names that are whole
known layers the server asked for, exact shapes and dtypes, and finite values.
Any failure raises ``ReplyRejected`` with the node id and the reason; callers
log it, count it, and leave every piece of server state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedlayer.layers import ModelLayers, State

#: Largest example count a reply may claim (guards the weighted average).
MAX_EXAMPLES = 10**9


class ReplyRejected(Exception):
    """A client reply that must not touch server state."""

    def __init__(self, node_id: int, reason: str) -> None:
        super().__init__(f"reply from node {node_id} rejected: {reason}")
        self.node_id = node_id
        self.reason = reason


@dataclass
class TrainReply:
    """A validated training reply: whole layers, checked against the model."""

    node_id: int
    state: State
    layer_names: set[str]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)


def _metrics(message: Message, node_id: int) -> dict[str, float]:
    record = message.content.metric_records.get("metrics")
    if not isinstance(record, MetricRecord):
        raise ReplyRejected(node_id, "missing MetricRecord 'metrics'")
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    return values


def _num_examples(metrics: dict[str, float], node_id: int) -> int:
    value = metrics.get("num-examples")
    if value is None:
        raise ReplyRejected(node_id, "metric 'num-examples' missing")
    if not math.isfinite(value) or value <= 0 or value > MAX_EXAMPLES or value != int(value):
        raise ReplyRejected(node_id, f"num-examples must be a positive integer, got {value}")
    return int(value)


def _decode_arrays(record: ArrayRecord, node_id: int) -> State:
    state: State = {}
    for key in record.keys():
        array = record[key]
        try:
            value = array.numpy()
        except Exception as err:  # corrupt bytes raise many kinds of errors
            raise ReplyRejected(node_id, f"array {key!r} does not decode: {err}") from None
        if tuple(array.shape) != value.shape or str(array.dtype) != str(value.dtype):
            raise ReplyRejected(
                node_id,
                f"array {key!r} declares {array.dtype}{tuple(array.shape)} but holds {value.dtype}{value.shape}",
            )
        state[key] = value
    return state


def check_state(
    state: State,
    layers: ModelLayers,
    node_id: int,
    allowed: Collection[str] | None = None,
    required: Collection[str] | None = None,
) -> set[str]:
    """Check a (partial) state against the model; return the layer names in it.

    Keys must belong to known layers and come as whole layers; ``allowed``
    restricts which layers may appear, ``required`` which must. Shapes and
    dtypes must match the model exactly and float values must be finite.
    """
    unknown = [k for k in state if k not in layers.keys_set]
    if unknown:
        raise ReplyRejected(node_id, f"unknown keys {unknown[:5]}")
    present = layers.layers_in(state.keys())
    covered = {k for name in present for k in layers[name].keys}
    partial = sorted(set(state) - covered)
    if partial:
        raise ReplyRejected(node_id, f"incomplete layers: keys {partial[:5]} without the rest of their layer")
    if allowed is not None and not set(present) <= set(allowed):
        raise ReplyRejected(node_id, f"layers not requested: {sorted(set(present) - set(allowed))[:5]}")
    if required is not None and not set(required) <= set(present):
        raise ReplyRejected(node_id, f"requested layers missing: {sorted(set(required) - set(present))[:5]}")
    for name in present:
        layer = layers[name]
        for key, shape, dtype in zip(layer.keys, layer.shapes, layer.dtypes):
            value = state[key]
            if tuple(value.shape) != shape:
                raise ReplyRejected(node_id, f"{key}: shape {tuple(value.shape)} != {shape}")
            if str(value.dtype) != dtype:
                raise ReplyRejected(node_id, f"{key}: dtype {value.dtype} != {dtype}")
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise ReplyRejected(node_id, f"{key}: non-finite values")
    return set(present)


def validate_train_reply(
    message: Message,
    layers: ModelLayers,
    allowed: Collection[str] | None = None,
    required: Collection[str] | None = None,
) -> TrainReply:
    """Validate a training reply against the model and the layers asked for."""
    node_id = message.metadata.src_node_id
    if message.has_error():
        raise ReplyRejected(node_id, f"client error: {message.error.reason}")
    metrics = _metrics(message, node_id)
    num_examples = _num_examples(metrics, node_id)
    arrays = message.content.array_records.get("arrays")
    state = _decode_arrays(arrays, node_id) if isinstance(arrays, ArrayRecord) else {}
    names = check_state(state, layers, node_id, allowed, required)
    payload_record = message.content.config_records.get("payload")
    payload = dict(payload_record.items()) if isinstance(payload_record, ConfigRecord) else {}
    return TrainReply(
        node_id=node_id,
        state=state,
        layer_names=names,
        num_examples=num_examples,
        metrics=metrics,
        payload=payload,
    )
