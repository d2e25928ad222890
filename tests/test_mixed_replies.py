"""Any mix of honest and faulty replies leaves the model the honest replies alone give.

For every strategy (LAQ's compressed replies in their own test), a round gets honest replies plus any
mix of duplicated, oversized (huge but finite, or scaled), mislabelled
(another client's partition id) and malformed replies, in any order. The
global model must be finite and bitwise equal to the model of the same round
with the honest replies alone, and every faulty reply must be counted.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedlayer.config import compose_config
from fedlayer.layers import copy_state, states_equal
from fedlayer.methods.base import all_finite
from fedlayer.methods.laq import BASE_KEY, UPDATE_KEY, LAQStrategy
from fedlayer.server.builder import build_strategy
from fedlayer.workload import load_workload
from tests.conftest import fuzz_examples, make_reply
from tests.test_fuzz_replies import BREAKS, DENSE, _broken_reply
from tests.test_laq import MALFORMED as LAQ_MALFORMED
from tests.test_laq import _reply as laq_reply
from tests.test_laq import _state as laq_state
from tests.test_laq import _upload as laq_upload

NODES = [101, 202, 303, 404, 505, 606, 707]
FAULTS = ["duplicate", "huge", "scaled", "mislabelled", *BREAKS]


@functools.lru_cache(maxsize=None)
def _setting(name: str):
    cfg = compose_config([f"strategy={name}", "dataset=digits", "model=cnn", f"federation.num_clients={len(NODES)}"])
    return cfg, load_workload(cfg, len(NODES))


def _strategy(name: str, tmp_path):
    """A fresh strategy in round 1 with every node identified and asked to train."""
    cfg, workload = _setting(name)
    strategy = build_strategy(cfg, workload)
    strategy.attach_run_dir(tmp_path)
    strategy.client_of = {node: i for i, node in enumerate(NODES)}
    strategy.configure_train(1, NODES)
    return strategy


def _honest_state(strategy, node: int, seed: int):
    """What a node was sent for its requested layers, moved by a small random step."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in strategy.plans[node].request:
        for key in strategy.layers[name].keys if name in strategy.layers else strategy.all_layers[name].keys:
            sent = strategy.sent_value(node, key)
            value = sent.copy()
            if np.issubdtype(value.dtype, np.floating):
                value = value + rng.normal(0, 0.01, value.shape).astype(value.dtype)
            state[key] = value
    return state


def _reply(strategy, node: int, state, examples: int, partition: int | None = None):
    partition = strategy.client_of[node] if partition is None else partition
    return make_reply(node, state if state else None, examples, metrics={"partition-id": partition})


def _faulty(strategy, node: int, kind: str, honest_replies: dict, seed: int, data: bytes):
    if kind == "duplicate":
        return honest_replies[node]  # the same reply pulled twice
    if kind in ("huge", "scaled"):
        # a method that asks for nothing (local-only) is sent the whole model unasked
        state = _honest_state(strategy, node, seed) or copy_state(strategy.global_state)
        for key, value in state.items():
            if np.issubdtype(value.dtype, np.floating):
                sent = strategy.sent_value(node, key)
                state[key] = np.full_like(value, 3e38) if kind == "huge" else (sent + (value - sent) * 1e6).astype(value.dtype)
        return _reply(strategy, node, state, 10)
    if kind == "mislabelled":
        return _reply(strategy, node, _honest_state(strategy, node, seed), 10, partition=(strategy.client_of[node] + 1) % len(NODES))
    return _broken_reply(strategy, node, kind, data)


@pytest.mark.parametrize("name", DENSE)
@settings(max_examples=fuzz_examples(60) // 4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    honest=st.integers(3, 5),
    faults=st.lists(st.sampled_from(FAULTS), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    order=st.randoms(use_true_random=False),
    data=st.binary(max_size=64),
)
@example(honest=3, faults=["scaled", "huge", "scaled"], seed=0, order=random.Random(0), data=b"")  # an even split
def test_faulty_replies_leave_the_model_of_the_honest_ones(name, honest, faults, seed, order, data, tmp_path_factory):
    mixed = _strategy(name, tmp_path_factory.mktemp(name))
    alone = _strategy(name, tmp_path_factory.mktemp(name))
    honest_nodes = NODES[:honest]
    faulty_nodes = NODES[honest:]
    honest_replies = {
        node: _reply(mixed, node, _honest_state(mixed, node, seed + i), 10 + i) for i, node in enumerate(honest_nodes)
    }
    bad = []
    for i, kind in enumerate(faults):
        node = honest_nodes[i % honest] if kind == "duplicate" else faulty_nodes[i % len(faulty_nodes)]
        bad.append(_faulty(mixed, node, kind, honest_replies, seed + 100 + i, data))
    replies = [*honest_replies.values(), *bad]
    order.shuffle(replies)

    before = copy_state(mixed.global_state)
    mixed.aggregate_train(1, replies)
    alone.aggregate_train(1, list(honest_replies.values()))

    assert all_finite(mixed.global_state)
    assert states_equal(mixed.global_state, alone.global_state), faults
    assert alone.rejections == []
    assert len(mixed.rejections) == len(bad), [r.reason for r in mixed.rejections]
    if mixed.plans[NODES[0]].request:  # the honest replies did move the model
        assert not states_equal(mixed.global_state, before)


@settings(max_examples=fuzz_examples(100), deadline=None)
@given(
    honest=st.integers(3, 5),
    faults=st.lists(st.sampled_from(["duplicate", "scaled", "mislabelled", *sorted(LAQ_MALFORMED)]), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    order=st.randoms(use_true_random=False),
)
@example(honest=3, faults=["scaled", "scaled", "scaled"], seed=0, order=random.Random(0))  # an even split (CI, stop 13)
def test_laq_faulty_replies_leave_the_model_of_the_honest_ones(honest, faults, seed, order):
    """The same property for LAQ, whose replies are compressed innovations, not layers."""
    nodes = [11, 22, 33, 44, 55, 66, 77]

    def strategy():
        laq = LAQStrategy(laq_state(0), num_clients=len(nodes), alpha=0.1)
        laq.client_of = {node: pid for pid, node in enumerate(nodes)}
        laq.configure_train(1, nodes)
        return laq

    mixed, alone = strategy(), strategy()
    honest_replies = {node: laq_reply(node, pid, laq_upload(laq_state(seed + pid))[0]) for pid, node in enumerate(nodes[:honest])}
    bad = []
    for i, kind in enumerate(faults):
        node, pid = nodes[honest + i % (len(nodes) - honest)], honest + i % (len(nodes) - honest)
        if kind == "duplicate":
            bad.append(honest_replies[nodes[i % honest]])
        elif kind == "scaled":
            bad.append(laq_reply(node, pid, laq_upload({k: v * 1e6 for k, v in laq_state(seed + 50 + i).items()})[0]))
        elif kind == "mislabelled":
            bad.append(laq_reply(node, (pid + 1) % len(nodes), laq_upload(laq_state(seed + 60 + i))[0]))
        else:
            good = laq_upload(laq_state(seed + 70 + i))[0]
            bad.append(laq_reply(node, pid, {UPDATE_KEY: LAQ_MALFORMED[kind](good[UPDATE_KEY]), BASE_KEY: 0}))
    replies = [*honest_replies.values(), *bad]
    order.shuffle(replies)
    mixed.aggregate_train(1, replies)
    alone.aggregate_train(1, list(honest_replies.values()))
    assert all_finite(mixed.global_state) and states_equal(mixed.global_state, alone.global_state)
    assert sorted(mixed.qhat) == sorted(alone.qhat) == list(range(honest))
    assert len(mixed.rejections) == len(bad) and alone.rejections == []
