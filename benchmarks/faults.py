"""Faulty training replies, built as a client would send them: shared by the fault tests and benchmarks.

Nothing here attacks a real run: each builder returns a Flower ``Message``
that a strategy's ``aggregate_train`` takes as a pulled reply. Used by
``tests/test_fuzz_replies.py``, ``tests/test_mixed_replies.py``,
``tests/test_laq.py`` and ``benchmarks/fault_matrix.py``.

Faults of a dense strategy (one that receives whole layers):

- ``duplicate``: an honest reply pulled twice;
- ``huge``: every float tensor filled with 3e38 (finite, near float32's maximum);
- ``scaled``: ``sent + 1e6 * (trained - sent)`` for every float tensor;
- ``mislabelled``: an honest update claiming the next client's partition id;
- ``BREAKS``: malformed replies (wrong names, shapes, dtypes, NaN/Inf, corrupt,
  truncated or random array bytes, absurd sizes and example counts, no metrics).

LAQ's replies are coded innovations (``update_records``: scalars in the
payload, one coded Array per tensor), not layers; its builders (``laq_*``)
make valid uploads and ``LAQ_MALFORMED`` breaks them.

A reply answers a message: ``make_reply(..., to=strategy)`` answers the train
message the strategy sent the node this round (``sent_message``, given an id
by ``push`` as a grid would). ``ANSWER_FAULTS`` carry honest content in a reply
to another message; ``CODEC_FAULTS`` (``codec_reply``: the real client half of
the codec) are encoded otherwise than ``codec.up_bits`` says.
"""

from __future__ import annotations

import functools
import itertools
import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.serde import message_from_proto, message_to_proto
from omegaconf import DictConfig

from fedlayer.codec.client import close_upload, open_download
from fedlayer.config import compose_config
from fedlayer.layers import State, copy_state, select, to_arrayrecord
from fedlayer.methods.base import LayerwiseStrategy, NodePlan
from fedlayer.methods.laq import ERROR_KEY, SKIP_KEY, lazy_decision, update_records
from fedlayer.methods.outbox import Outbox
from fedlayer.methods.replies import identity_query
from fedlayer.wire.records import CODED, CODEC_VERSION, PAYLOAD
from fedlayer.server.builder import build_strategy
from fedlayer.workload import Workload, load_workload

#: The node ids of a round with honest and faulty replies (client id = index).
ROUND_NODES = [101, 202, 303, 404, 505, 606, 707]
#: Malformed dense replies, one way of breaking a valid reply each.
BREAKS = [
    "rename", "unknown-key", "shape", "dtype", "nan", "inf", "corrupt-bytes",
    "truncated-bytes", "random-bytes", "huge-examples", "zero-examples", "no-metrics", "huge-shape",
]  # fmt: skip
#: Faults of a well-formed reply: repeated, oversized, or under another client's id.
REPLY_FAULTS = ["duplicate", "huge", "scaled", "mislabelled"]
#: Every fault of a dense strategy's reply.
DENSE_FAULTS = [*REPLY_FAULTS, *BREAKS]


# ------------------------------------------------------------------ replies
#: Message ids ``push`` hands out, in order (so that reports repeat from run to run).
_MESSAGE_IDS = itertools.count(1)


def push(messages: Iterable[Message]) -> list[Message]:
    """Give each message that has none an id of its own, as a grid does when it pushes it; returns them.

    (Flower's ``InMemoryGrid`` sets a uuid4 on the pushed ``Message`` itself; these are uuids
    of a counter, as ``tests.inprocess`` hands out.) Each strategy's messages get their own
    ids, so a reply answers one strategy's message, never an identical twin's.
    """
    messages = list(messages)
    for message in messages:
        if not message.metadata.message_id:
            message.metadata.__dict__["_message_id"] = str(uuid.UUID(int=next(_MESSAGE_IDS)))
    return messages


def sent_message(strategy: LayerwiseStrategy, node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    """The message ``strategy`` sent ``node_id`` in this round's exchange of ``message_type``, pushed.

    (Pushed here if the test did not push the round's messages itself, as the round loop would have.)
    """
    outbox = {
        MessageType.TRAIN: strategy.outbox,
        MessageType.EVALUATE: strategy.evaluate_outbox,
        MessageType.QUERY: strategy.query_outbox,
    }[message_type]
    message = outbox.message(node_id)
    if message is None:
        raise LookupError(f"{type(strategy).__name__} sent node {node_id} no {message_type} message this round")
    push(outbox.by_node.values())
    return message


def send_plans(strategy: LayerwiseStrategy, server_round: int, plans: dict[int, NodePlan]) -> dict[int, Message]:
    """What ``configure_train`` sends for hand-made ``plans`` (instead of sampled, planned ones):
    the train messages by node, recorded as the round's and pushed."""
    strategy.plans = plans
    strategy.sent_states = {}
    messages = push(strategy.build_messages(server_round, plans, MessageType.TRAIN))
    strategy.outbox = Outbox.of(server_round, MessageType.TRAIN, messages)
    return {message.metadata.dst_node_id: message for message in messages}


def make_reply(
    node_id: int,
    state: State | None,
    num_examples: int = 10,
    metrics: dict[str, float] | None = None,
    payload: dict | None = None,
    *,
    records: dict | None = None,
    to: LayerwiseStrategy | Message | None = None,
) -> Message:
    """A reply from ``node_id`` to a train message, as the server would pull it (with ``records`` added).

    ``to``: the strategy whose train message to ``node_id`` this round it
    answers (``sent_message``), or the message itself; None: a message no
    strategy sent (for checks of a reply's content alone).
    """
    if isinstance(to, LayerwiseStrategy):
        sent = sent_message(to, node_id)
    elif isinstance(to, Message):
        sent = to
    else:
        sent = Message(
            RecordDict({"config": ConfigRecord({"x": 1})}),
            dst_node_id=node_id,
            message_type=MessageType.TRAIN,
        )
    content = RecordDict(
        {"metrics": MetricRecord({"num-examples": num_examples, **(metrics or {})})}
    )
    if state is not None:
        content["arrays"] = to_arrayrecord(state)
    if payload is not None:
        content["payload"] = ConfigRecord(payload)
    for name, record in (records or {}).items():
        content[name] = record
    return Message(content, reply_to=sent)


@functools.lru_cache(maxsize=None)
def unit_setting(name: str, num_clients: int, overrides: tuple[str, ...] = ()) -> tuple[DictConfig, Workload]:
    """The unit-test setting of strategy ``name``: the cnn on digits, ``num_clients`` clients (and ``overrides``)."""
    cfg = compose_config(
        [
            f"strategy={name}",
            "dataset=digits",
            "model=cnn",
            f"federation.num_clients={num_clients}",
            *overrides,
        ]
    )
    return cfg, load_workload(cfg, num_clients)


def round_one_strategy(
    name: str, run_dir: Path, nodes: Sequence[int], overrides: tuple[str, ...] = ()
) -> LayerwiseStrategy:
    """A fresh strategy of the unit setting (with ``overrides``) in round 1, every node identified
    (client id = its index) and asked to train."""
    cfg, workload = unit_setting(name, len(nodes), tuple(overrides))
    strategy = build_strategy(cfg, workload)
    strategy.attach_run_dir(run_dir)
    strategy.client_of = {
        node: i for i, node in enumerate(nodes)
    }  # what the identity query would learn
    strategy.configure_train(1, list(nodes))
    return strategy


def honest_state(strategy: LayerwiseStrategy, node: int, seed: int) -> State:
    """What ``node`` was sent for its requested layers, moved by a small random step (empty if it was asked for none)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in strategy.plans[node].request:
        for key in (
            strategy.layers[name].keys
            if name in strategy.layers
            else strategy.all_layers[name].keys
        ):
            sent = strategy.sent_value(node, key)
            value = sent.copy()
            if np.issubdtype(value.dtype, np.floating):
                value = value + rng.normal(0, 0.01, value.shape).astype(value.dtype)
            state[key] = value
    return state


def train_reply(
    strategy: LayerwiseStrategy,
    node: int,
    state: State,
    examples: int,
    partition: int | None = None,
) -> Message:
    """``node``'s reply carrying ``state`` (no arrays if empty), naming its registered partition id unless ``partition``."""
    partition = strategy.client_of[node] if partition is None else partition
    return make_reply(
        node, state if state else None, examples, metrics={"partition-id": partition}, to=strategy
    )


def faulty_reply(
    strategy: LayerwiseStrategy,
    node: int,
    kind: str,
    honest_replies: dict[int, Message],
    seed: int,
    data: bytes,
) -> Message:
    """A faulty reply of ``kind`` (one of ``DENSE_FAULTS``) from ``node``.

    ``duplicate`` repeats ``honest_replies[node]``; ``data`` feeds the breaks
    that take arbitrary bytes (``random-bytes``, the NaN/Inf position).
    """
    if kind == "duplicate":
        return honest_replies[node]  # the same reply pulled twice
    if kind in ("huge", "scaled"):
        # a method that asks for nothing (local-only) is sent the whole model unasked
        state = honest_state(strategy, node, seed) or copy_state(strategy.global_state)
        for key, value in state.items():
            if np.issubdtype(value.dtype, np.floating):
                sent = strategy.sent_value(node, key)
                state[key] = (
                    np.full_like(value, 3e38)
                    if kind == "huge"
                    else (sent + (value - sent) * 1e6).astype(value.dtype)
                )
        return train_reply(strategy, node, state, 10)
    if kind == "mislabelled":
        other = (strategy.client_of[node] + 1) % len(strategy.client_of)
        return train_reply(
            strategy, node, honest_state(strategy, node, seed), 10, partition=other
        )
    return broken_reply(strategy, node, kind, data)


def good_state(strategy: LayerwiseStrategy, node: int) -> State:
    """The global model's values of the layers ``node`` was asked for, plus 0.01 (the whole model if it was asked for none)."""
    # A strategy that asks for nothing (local-only) must refuse any arrays at all.
    requested = strategy.plans[node].request or strategy.layers.names
    state = copy_state(select(strategy.global_state, strategy.layers, requested))
    for key, value in state.items():
        if np.issubdtype(value.dtype, np.floating):
            state[key] = value + np.float32(0.01)
    return state


def broken_reply(
    strategy: LayerwiseStrategy, node: int, kind: str, data: bytes
) -> Message:
    """``good_state``'s reply from ``node``, broken one way (``kind``, one of ``BREAKS``)."""
    state = good_state(strategy, node)
    key = next(k for k, v in state.items() if v.dtype == np.float32 and v.size > 1)
    examples = 10
    if kind == "rename":
        state["renamed." + key] = state.pop(key)
    elif kind == "unknown-key":
        state["evil.weight"] = np.zeros(3, np.float32)
    elif kind == "shape":
        state[key] = state[key].reshape(-1)[:-1]
    elif kind == "dtype":
        state[key] = state[key].astype(np.float64)
    elif kind in ("nan", "inf"):
        state[key] = state[key].copy()
        state[key].flat[len(data) % state[key].size] = (
            np.nan if kind == "nan" else -np.inf
        )
    elif kind == "huge-examples":
        examples = 10**15
    elif kind == "zero-examples":
        examples = 0
    reply = make_reply(node, state, examples, to=strategy)
    if kind == "no-metrics":
        content = RecordDict({"arrays": reply.content["arrays"]})
        reply = Message(content, reply_to=sent_message(strategy, node))
    if kind in ("corrupt-bytes", "truncated-bytes", "random-bytes", "huge-shape"):
        arrays = reply.content["arrays"]
        good = arrays[key]
        if kind == "corrupt-bytes":
            payload = bytes(b ^ 0x5A for b in good.data[:64]) + good.data[64:]
            shape = tuple(good.shape)
        elif kind == "truncated-bytes":
            payload, shape = good.data[: len(good.data) // 2], tuple(good.shape)
        elif kind == "random-bytes":
            payload, shape = data, tuple(good.shape)
        else:
            payload, shape = good.data, (2**31, 2**31)
        items = {
            k: (
                Array(dtype=good.dtype, shape=shape, stype=good.stype, data=payload)
                if k == key
                else v
            )
            for k, v in arrays.items()
        }
        reply.content["arrays"] = ArrayRecord(items)
    return reply


# ------------------------------------------------------------------ LAQ
#: The small parameter-only model LAQ's unit tests use (no BatchNorm buffers).
LAQ_SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.conv.weight": (4, 1, 3, 3),
    "blocks.0.conv.bias": (4,),
    "head.fc.weight": (3, 16),
    "head.fc.bias": (3,),
}


def laq_state(seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None) -> State:
    """Standard-normal float32 tensors of ``shapes`` (``LAQ_SHAPES`` by default), drawn in order from ``seed``."""
    rng = np.random.default_rng(seed)
    return {
        key: rng.standard_normal(shape).astype(np.float32)
        for key, shape in (shapes or LAQ_SHAPES).items()
    }


def laq_upload(
    g: State, qhat: State | None = None, bits: int = 8, base: int = 0
) -> tuple[dict, State]:
    """The records of an upload of ``g`` quantized around ``qhat`` (zeros by default), and the quantized ``Q``."""
    qhat = qhat or {k: np.zeros_like(v) for k, v in g.items()}
    decision = lazy_decision(
        g,
        qhat,
        bits=bits,
        ehat=0.0,
        clock=0,
        tbar=100,
        drift=0.0,
        drift_scale=1.0,
        force=True,
    )
    return update_records(base, decision.tensors, decision.error), decision.q


def laq_reply(
    node: int, pid: float, update: dict, state: State | None = None, *, to: LayerwiseStrategy | None = None
) -> Message:
    """A LAQ reply from ``node`` naming partition id ``pid``, carrying the records ``update`` (``laq_upload``,
    ``update_records``; and ``state`` as dense arrays), to ``to``'s train message (``make_reply``)."""
    payload = update.get(PAYLOAD)
    records = {name: record for name, record in update.items() if name != PAYLOAD}
    return make_reply(node, state, metrics={"partition-id": pid}, payload=None if payload is None else dict(payload),
                      records=records, to=to)


def _coded(change: Callable[[dict[str, Array]], object]) -> Callable[[dict], dict]:
    """A fault: the update's coded tensors changed in place by ``change`` (bypasses the encoder)."""

    def apply(update: dict) -> dict:
        arrays = dict(update[CODED].items())
        change(arrays)
        return {**update, CODED: ArrayRecord(arrays)}

    return apply


def _first(**fields: object) -> Callable[[dict], dict]:
    """A fault: the first coded tensor with ``fields`` (dtype, shape, stype, data) replaced; a callable
    field is applied to the old value."""

    def change(arrays: dict[str, Array]) -> None:
        key = next(iter(arrays))
        old = arrays[key]
        now = {"dtype": old.dtype, "shape": tuple(old.shape), "stype": old.stype, "data": old.data}
        now.update({name: value(now[name]) if callable(value) else value for name, value in fields.items()})
        arrays[key] = Array(**now)

    return _coded(change)


def _radius(value: float) -> Callable[[dict], dict]:
    return _first(data=lambda data: np.float32(value).tobytes() + data[4:])


def _renamed(arrays: dict[str, Array]) -> None:
    arrays["head.fc.evil"] = arrays.pop(next(iter(arrays)))


def _dense_first(arrays: dict[str, Array]) -> None:
    key = next(iter(arrays))
    arrays[key] = Array(np.zeros(tuple(arrays[key].shape), np.float32))


def _payload(**entries: object) -> Callable[[dict], dict]:
    return lambda update: {**update, PAYLOAD: ConfigRecord({**update[PAYLOAD], **entries})}


#: Ways of breaking a valid LAQ upload (``laq_upload``'s records -> records).
LAQ_MALFORMED: dict[str, Callable[[dict], dict]] = {
    "random-bytes": _first(data=b"\xff\x00garbage" * 7),
    "truncated": _first(data=lambda data: data[: len(data) // 2]),
    "corrupt": _first(data=lambda data: bytes(b ^ 0xA5 for b in data[:40]) + data[40:]),  # the radius's sign flips
    "bits-0": _first(dtype="q0"),
    "bits-9": _first(dtype="q9"),
    "packed-length": _first(data=lambda data: data[:4] + b"\x01\x02"),
    "radius-nan": _radius(float("nan")),
    "radius-inf": _radius(float("inf")),
    "radius-negative": _radius(-1.0),
    "wrong-name": _coded(_renamed),
    "wrong-shape": _first(shape=lambda shape: (math.prod(shape),)),  # the right size, the wrong shape
    "missing-tensor": _coded(lambda arrays: arrays.popitem()),
    "version-2": _first(stype="fedlayer.delta.v2"),
    "dense-tensor": _coded(_dense_first),
    "skip-with-tensors": _payload(**{SKIP_KEY: True}),
    "upload-without-tensors": lambda update: {PAYLOAD: update[PAYLOAD]},
    "skip-not-bool": _payload(**{SKIP_KEY: 1}),
    "error-nan": _payload(**{ERROR_KEY: float("nan")}),
}


def laq_faulty_reply(
    kind: str,
    node: int,
    pid: int,
    *,
    honest: Message,
    seed: int,
    num_clients: int,
    shapes: dict[str, tuple[int, ...]] | None = None,
    to: LayerwiseStrategy | None = None,
    bits: int = 8,
) -> Message:
    """A faulty LAQ reply of ``kind`` (one of ``REPLY_FAULTS``, or a key of ``LAQ_MALFORMED``) from ``node`` (partition ``pid``),
    to ``to``'s train message, quantised at ``bits`` (the strategy's).

    ``duplicate`` returns ``honest`` again; the others upload ``laq_state`` of
    a seed derived from ``seed``: filled with 3e38 (``huge``), times 1e6
    (``scaled``), under the next partition id (``mislabelled``), or with its
    encoding broken by ``LAQ_MALFORMED[kind]``.
    """
    if kind == "duplicate":
        return honest
    if kind == "huge":
        g = {k: np.full_like(v, 3e38) for k, v in laq_state(seed + 40, shapes).items()}
        return laq_reply(node, pid, laq_upload(g, bits=bits)[0], to=to)
    if kind == "scaled":
        g = {k: v * 1e6 for k, v in laq_state(seed + 50, shapes).items()}
        return laq_reply(node, pid, laq_upload(g, bits=bits)[0], to=to)
    if kind == "mislabelled":
        return laq_reply(node, (pid + 1) % num_clients, laq_upload(laq_state(seed + 60, shapes), bits=bits)[0], to=to)
    good = laq_upload(laq_state(seed + 70, shapes), bits=bits)[0]
    return laq_reply(node, pid, LAQ_MALFORMED[kind](good), to=to)


# ------------------------------------------------------------------ what a reply answers, and how it is encoded
#: Honest training content in a reply that does not answer this round's train message to its node:
#: last round's message (``stale``), next round's (``future``), another node's (``other-node``),
#: the node's evaluate message or an identity query (``evaluate-reply``, ``query-reply``).
ANSWER_FAULTS = ["stale", "future", "other-node", "evaluate-reply", "query-reply"]
#: Replies encoded other than ``CODEC_SETTING`` says: another bit width, dense, another reference version.
CODEC_FAULTS = ["codec-2-bits", "codec-8-bits", "codec-16-bits", "codec-dense", "codec-version"]
#: The codec every ``CODEC_FAULTS`` case runs with.
CODEC_SETTING = ("codec.up_bits=4", "codec.down_bits=4")
#: A LAQ upload quantised at 8 bits, the strategy configured for 4.
LAQ_BITS_FAULT = "laq:bits-8"
#: The bits each codec fault encodes at (None: dense).
CODEC_FAULT_BITS: dict[str, int | None] = {"codec-2-bits": 2, "codec-8-bits": 8, "codec-16-bits": 16, "codec-dense": None}


def readdressed(reply: Message, answers: Message, src_node_id: int) -> Message:
    """``reply``'s content as a reply to ``answers`` from ``src_node_id`` (whoever ``answers`` went to), as pulled."""
    moved = Message(reply.content, reply_to=answers)
    if src_node_id == answers.metadata.dst_node_id:
        return moved
    proto = message_to_proto(moved)
    proto.metadata.src_node_id = src_node_id
    return message_from_proto(proto)


def identity_query_to(strategy: LayerwiseStrategy, node_id: int) -> Message:
    """An identity query to ``node_id``, pushed (what the server asks a node it has not identified)."""
    (query,) = push([identity_query(strategy.method, node_id)])
    return query


def codec_reply(
    strategy: LayerwiseStrategy,
    node: int,
    state: State,
    examples: int = 10,
    *,
    up_bits: int | None | str = "configured",
    levers: str | None = "configured",
    version_offset: int = 0,
) -> Message:
    """``node``'s reply carrying ``state``, encoded by the real client half of the codec (a node that held nothing).

    ``up_bits``: encode at these bits (None: dense) instead of the configured
    ``codec-up-bits``; ``levers``: encode with these levers (``Encoding.levers``; None: plain) instead of
    the configured ``codec-levers``; ``version_offset``: state the reference version the client now holds plus this.
    """
    assert strategy.codec is not None, "codec_reply needs a strategy with the codec stage on"
    sent = sent_message(strategy, node)
    context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
    _, session = open_download(sent.content, context, lambda: copy_state(strategy.codec.initial), train=True)
    assert session is not None
    if up_bits != "configured":
        session.up_bits = up_bits
    if levers != "configured":
        session.levers = levers
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": examples, "partition-id": strategy.client_of[node]}),
            "arrays": to_arrayrecord(state),
        }
    )
    reply = close_upload(content, session, context)
    if version_offset:
        reply["metrics"] = MetricRecord({**dict(reply["metrics"].items()), CODEC_VERSION: session.version + version_offset})
    return Message(reply, reply_to=sent)


def codec_faulty_reply(strategy: LayerwiseStrategy, node: int, kind: str, seed: int) -> Message:
    """``node``'s honest update encoded as ``kind`` (one of ``CODEC_FAULTS``) says, against the configured codec."""
    state = honest_state(strategy, node, seed) or copy_state(strategy.global_state)
    if kind == "codec-version":
        return codec_reply(strategy, node, state, version_offset=1)
    return codec_reply(strategy, node, state, up_bits=CODEC_FAULT_BITS[kind])


# ------------------------------------------------------------------ too few carriers to compare
#: The round's only reply, its update 3e38 (``huge``) or x1e6 (``scaled``): no median to compare it with.
SOLE_FAULTS = ["sole-huge", "sole-scaled"]
#: FedLP: the only replying node that kept some layer sends that layer huge or scaled (its other layers honest).
SOLE_CARRIER_FAULTS = ["sole-carrier-huge", "sole-carrier-scaled"]


def sole_carrier(strategy: LayerwiseStrategy, nodes: Sequence[int]) -> tuple[str, int, list[int]]:
    """A layer that exactly one of ``nodes`` was asked to return, that node, and the nodes not asked for it."""
    asked = {node: set(strategy.plans[node].request) for node in nodes}
    for name in strategy.layers.names:
        carriers = [node for node in nodes if name in asked[node]]
        if carriers and len(carriers) < len(nodes):
            return name, carriers[0], [node for node in nodes if name not in asked[node]]
    raise LookupError("every layer is asked of all nodes or of none")


def oversized(strategy: LayerwiseStrategy, node: int, state: State, keys: Iterable[str], kind: str) -> State:
    """``state`` with the float tensors ``keys`` 3e38 (``kind`` ``huge``) or ``sent + 1e6 x (value - sent)`` (``scaled``)."""
    state = dict(state)
    for key in keys:
        value = state[key]
        if np.issubdtype(value.dtype, np.floating):
            sent = strategy.sent_value(node, key)
            state[key] = np.full_like(value, 3e38) if kind == "huge" else (sent + (value - sent) * 1e6).astype(value.dtype)
    return state


def honest_reply(strategy: LayerwiseStrategy, node: int, index: int, seed: int) -> Message:
    """``node``'s honest reply to ``strategy``'s train message of this round, as the ``index``-th
    node of the round (LAQ: an upload at its bits; encoded when the codec is on)."""
    if strategy.method == "laq":
        upload = laq_upload(laq_state(seed + index, strategy.shapes), bits=strategy.options.bits)[0]
        return laq_reply(node, index, upload, to=strategy)
    state = honest_state(strategy, node, seed + index)
    if strategy.codec is not None:
        return codec_reply(strategy, node, state, 10 + index)
    return train_reply(strategy, node, state, 10 + index)
