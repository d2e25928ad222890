"""Replies: who a node is, and whether what it sent may touch the model.

Validation: a reply is checked for errors, a usable example count, names that
are whole known layers the server asked for, exact shapes and dtypes, and
finite values. Any failure raises ``ReplyRejected`` with the node id and the
reason; callers log it, count it, and leave every piece of server state untouched.

Identity: Flower node ids are addresses, not identities (every simulation
draws new ones; a SuperNode that registers again may get a new one). What the
server keeps per client, and the seeded choice of who trains, are keyed by a
*client id*: the node's ``partition-id`` from its node config, learned once
per node with a QUERY message that the ClientApp answers without touching
data or model. A node without one is assigned a free client id by the
server (``ASSIGNED_BASE`` and up, see ``methods.identity``), told it in every message (``client-id``), and answers later queries
with it (kept in its state folder, so it survives a restart). The client id
is the one source of truth: a reply naming another ``partition-id`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedlayer.layers import ModelLayers, State
from fedlayer.wire.records import (
    ARRAYS,
    ASSIGNED_BASE,
    CLIENT_ID,
    CONFIG,
    METHOD,
    METRICS,
    NO_PARTITION,
    NUM_EXAMPLES,
    PARTITION_ID,
    PAYLOAD,
    QUERY,
    TRAIN_SECONDS,
)
from fedlayer.wire.messages import MessageError, decode

M = TypeVar("M")

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
    record = message.content.metric_records.get(METRICS)
    if not isinstance(record, MetricRecord):
        raise ReplyRejected(node_id, f"missing MetricRecord {METRICS!r}")
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    return values


def _num_examples(metrics: dict[str, float], node_id: int) -> int:
    value = metrics.get(NUM_EXAMPLES)
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
    check_metric(metrics, node_id, TRAIN_SECONDS, math.inf)
    arrays = message.content.array_records.get(ARRAYS)
    state = _decode_arrays(arrays, node_id) if isinstance(arrays, ArrayRecord) else {}
    names = check_state(state, layers, node_id, allowed, required)
    payload_record = message.content.config_records.get(PAYLOAD)
    payload = dict(payload_record.items()) if isinstance(payload_record, ConfigRecord) else {}
    return TrainReply(
        node_id=node_id,
        state=state,
        layer_names=names,
        num_examples=num_examples,
        metrics=metrics,
        payload=payload,
    )


def reply_message(cls: type[M], reply: TrainReply) -> M:
    """A method's typed reply metrics (``wire.messages``); ``ReplyRejected`` naming the key when they do not decode."""
    try:
        return decode(cls, reply.metrics, metrics=True)
    except MessageError as err:
        raise ReplyRejected(reply.node_id, str(err)) from None


def validate_evaluate_reply(message: Message) -> dict[str, float]:
    """An evaluation reply's metrics (``training.evaluate``'s): no error, every metric finite,
    ``accuracy`` in [0, 1], ``loss`` >= 0, a positive integer example count."""
    node_id = message.metadata.src_node_id
    if message.has_error():
        raise ReplyRejected(node_id, f"client error: {message.error.reason}")
    metrics = _metrics(message, node_id)
    _num_examples(metrics, node_id)
    nonfinite = sorted(key for key, value in metrics.items() if not math.isfinite(value))
    if nonfinite:
        raise ReplyRejected(node_id, f"non-finite metrics {nonfinite[:5]}")
    check_metric(metrics, node_id, "accuracy", 1.0, required=True)
    check_metric(metrics, node_id, "loss", math.inf, required=True)
    return metrics


def check_metric(metrics: dict[str, float], node_id: int, key: str, high: float, *, required: bool = False) -> None:
    """A client-reported metric the server uses must lie in ``[0, high]`` (absent: refused only if
    ``required``); else ``ReplyRejected``. One absurd value must not stick in a run's totals."""
    value = metrics.get(key)
    if value is None:
        if required:
            raise ReplyRejected(node_id, f"metric {key!r} missing")
        return
    if not (math.isfinite(value) and 0.0 <= value <= high):
        raise ReplyRejected(node_id, f"metric {key!r} must lie in [0, {high:g}], got {value!r}")


# --- identity -------------------------------------------------------------------
class Identity(NamedTuple):
    """What a node said it is: its client id (None: none yet), and whether the server assigned it."""

    node: int
    client: int | None
    assigned: bool


def identity_query(method: str, node_id: int) -> Message:
    """The QUERY message asking ``node_id`` for its ``partition-id``."""
    content = RecordDict({CONFIG: ConfigRecord({METHOD: method, QUERY: PARTITION_ID})})
    return Message(content, message_type=MessageType.QUERY, dst_node_id=node_id)


def parse_identity(
    reply: Message, client_of: dict[int, int], connected: Iterable[int], limit: int | None = None
) -> Identity:
    """The identity a query reply states; ``ReplyRejected`` if unusable.

    A node without a partition id answers with the client id the server
    assigned it earlier, or with none (``client`` None: the server assigns one).
    Partition ids lie below ``ASSIGNED_BASE``, assigned ids at or above it;
    ``limit``: methods with one slot per client take partition ids in
    ``[0, limit)`` and assigned ids in ``ASSIGNED_BASE + [0, limit)``. An id
    held by another *connected* node is refused; one held by a node that is
    gone moves to the new node (a SuperNode that came back under a new node
    id) unless its binding says otherwise (``fedlayer.methods.identity``).
    """
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise ReplyRejected(node, f"identity query failed: {reply.error.reason}")
    record = reply.content.metric_records.get(METRICS)
    value = record.get(PARTITION_ID) if isinstance(record, MetricRecord) else None
    if not isinstance(value, (int, float)) or value != int(value) or value < NO_PARTITION:
        raise ReplyRejected(node, f"{PARTITION_ID} must be an integer >= 0 (or {NO_PARTITION}: none), got {value!r}")
    if value == NO_PARTITION:
        assigned = record.get(CLIENT_ID) if isinstance(record, MetricRecord) else None
        if assigned is None:
            return Identity(node, None, assigned=True)
        top = ASSIGNED_BASE + limit if limit is not None else None
        if not isinstance(assigned, int) or isinstance(assigned, bool) or assigned < ASSIGNED_BASE or (top is not None and assigned >= top):
            where = f"in [{ASSIGNED_BASE}, {top})" if top is not None else f">= {ASSIGNED_BASE}"
            raise ReplyRejected(node, f"{CLIENT_ID} must be a server-assigned id, an integer {where}, got {assigned!r}")
        value = assigned
    else:
        top = limit if limit is not None else ASSIGNED_BASE
        if value >= top:
            raise ReplyRejected(node, f"{PARTITION_ID} must be an integer in [0, {top}), got {value!r}")
    client = int(value)
    live = set(connected)
    owner = next((n for n, c in client_of.items() if c == client and n != node and n in live), None)
    if owner is not None:
        raise ReplyRejected(node, f"{PARTITION_ID} {client} already belongs to node {owner}")
    return Identity(node, client, assigned=record.get(PARTITION_ID) == NO_PARTITION)


def client_order(node_ids: Iterable[int], client_of: dict[int, int]) -> list[int]:
    """Nodes ordered by client id (unknown nodes last, by node id): the same order in every run."""
    return sorted(node_ids, key=lambda node: (node not in client_of, client_of.get(node, node), node))
