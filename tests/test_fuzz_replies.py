"""Malformed and poisoned replies never touch server state, for every strategy.

Hypothesis builds a valid reply to what a node was asked for and then breaks
it one way (wrong names, shapes, dtypes, NaN/Inf, corrupt or truncated array
bytes, random bytes, absurd sizes, missing metrics). Each must be rejected and
counted, the global model must stay bitwise identical, and a good reply
afterwards must still be accepted: the run goes on.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlayer.config import compose_config
from fedlayer.layers import copy_state, select, states_equal
from fedlayer.methods import METHODS
from fedlayer.server.builder import build_strategy
from fedlayer.workload import load_workload
from tests.conftest import fuzz_examples, make_reply

NODES = [101, 202, 303]
BREAKS = [
    "rename", "unknown-key", "shape", "dtype", "nan", "inf", "corrupt-bytes",
    "truncated-bytes", "random-bytes", "huge-examples", "zero-examples", "no-metrics", "huge-shape",
]
# Strategies whose replies are not dense layers are fuzzed in their own tests.
DENSE = sorted(name for name in METHODS if name != "laq")


_PREPARED: dict[str, object] = {}


def _cached(name: str, tmp_path_factory):
    """One prepared strategy per name, reused across examples: bad replies pile up on it."""
    if name not in _PREPARED:
        _PREPARED[name] = _prepared(name, tmp_path_factory.mktemp(name))
    return _PREPARED[name]


def _prepared(name: str, tmp_path):
    cfg = compose_config([f"strategy={name}", "dataset=digits", "model=cnn", "federation.num_clients=3", f"output_dir={tmp_path}"])
    workload = load_workload(cfg, 3)
    strategy = build_strategy(cfg, workload)
    strategy.attach_run_dir(tmp_path)
    strategy.client_of = {node: i for i, node in enumerate(NODES)}  # what the identity query would learn
    chosen = strategy.sample_nodes(1, NODES)
    strategy.plans = {node: strategy.plan(1, node) for node in chosen}
    return strategy


def _good_state(strategy, node):
    # A strategy that asks for nothing (local-only) must refuse any arrays at all.
    requested = strategy.plans[node].request or strategy.layers.names
    state = copy_state(select(strategy.global_state, strategy.layers, requested))
    for key, value in state.items():
        if np.issubdtype(value.dtype, np.floating):
            state[key] = value + np.float32(0.01)
    return state


def _broken_reply(strategy, node, kind: str, data: bytes) -> Message:
    state = _good_state(strategy, node)
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
        state[key].flat[len(data) % state[key].size] = np.nan if kind == "nan" else -np.inf
    elif kind == "huge-examples":
        examples = 10**15
    elif kind == "zero-examples":
        examples = 0
    reply = make_reply(node, state, examples)
    if kind == "no-metrics":
        content = RecordDict({"arrays": reply.content["arrays"]})
        reply = Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))
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
        items = {k: (Array(dtype=good.dtype, shape=shape, stype=good.stype, data=payload) if k == key else v) for k, v in arrays.items()}
        reply.content["arrays"] = ArrayRecord(items)
    return reply


@pytest.mark.parametrize("name", DENSE)
@settings(max_examples=fuzz_examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(BREAKS), data=st.binary(min_size=0, max_size=300), pick=st.integers(0, 10))
def test_malformed_reply_is_rejected_and_state_unchanged(name, kind, data, pick, tmp_path_factory):
    strategy = _cached(name, tmp_path_factory)
    node = sorted(strategy.plans)[pick % len(strategy.plans)]
    before = copy_state(strategy.global_state)
    rejected_before = len(strategy.rejections)
    metrics = strategy.aggregate_train(1, [_broken_reply(strategy, node, kind, data)])
    assert metrics is None, kind
    assert len(strategy.rejections) == rejected_before + 1, kind
    assert strategy.rejections[-1].node_id == node
    assert states_equal(strategy.global_state, before), kind


@pytest.mark.parametrize("name", DENSE)
def test_run_goes_on_after_bad_replies(name, tmp_path):
    strategy = _prepared(name, tmp_path)
    nodes = sorted(strategy.plans)
    replies = [_broken_reply(strategy, nodes[0], "nan", b"x")]
    replies += [make_reply(node, _good_state(strategy, node) if strategy.plans[node].request else None, 10) for node in nodes[1:]]
    strategy.aggregate_train(1, replies)
    assert len(strategy.rejections) == 1 and strategy.rejections[0].node_id == nodes[0]
