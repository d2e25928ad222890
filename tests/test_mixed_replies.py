"""Any mix of honest and faulty replies leaves the model the honest replies alone give.

For every strategy (LAQ's compressed replies in their own test), a round gets honest replies plus any
mix of duplicated, oversized (huge but finite, or scaled), mislabelled
(another client's partition id) and malformed replies, in any order. The
global model must be finite and bitwise equal to the model of the same round
with the honest replies alone, and every faulty reply must be counted.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from benchmarks.faults import (
    DENSE_FAULTS,
    LAQ_MALFORMED,
    ROUND_NODES,
    faulty_reply,
    honest_state,
    laq_faulty_reply,
    laq_reply,
    laq_state,
    laq_upload,
    round_one_strategy,
    train_reply,
)
from fedlayer.layers import copy_state, states_equal
from fedlayer.methods.base import all_finite
from fedlayer.methods.laq import LAQStrategy
from tests.conftest import fuzz_examples
from tests.test_fuzz_replies import DENSE



@pytest.mark.parametrize("name", DENSE)
@settings(max_examples=fuzz_examples(60) // 4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    honest=st.integers(3, 5),
    faults=st.lists(st.sampled_from(DENSE_FAULTS), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    order=st.randoms(use_true_random=False),
    data=st.binary(max_size=64),
)
@example(honest=3, faults=["scaled", "huge", "scaled"], seed=0, order=random.Random(0), data=b"")  # an even split
def test_faulty_replies_leave_the_model_of_the_honest_ones(name, honest, faults, seed, order, data, tmp_path_factory):
    mixed = round_one_strategy(name, tmp_path_factory.mktemp(name), ROUND_NODES)
    alone = round_one_strategy(name, tmp_path_factory.mktemp(name), ROUND_NODES)
    honest_nodes = ROUND_NODES[:honest]
    faulty_nodes = ROUND_NODES[honest:]
    honest_replies = {
        node: train_reply(mixed, node, honest_state(mixed, node, seed + i), 10 + i)
        for i, node in enumerate(honest_nodes)
    }
    bad = []
    for i, kind in enumerate(faults):
        node = (
            honest_nodes[i % honest]
            if kind == "duplicate"
            else faulty_nodes[i % len(faulty_nodes)]
        )
        bad.append(
            faulty_reply(mixed, node, kind, honest_replies, seed + 100 + i, data)
        )
    replies = [*honest_replies.values(), *bad]
    order.shuffle(replies)

    before = copy_state(mixed.global_state)
    mixed.aggregate_train(1, replies)
    alone.aggregate_train(1, [train_reply(alone, node, honest_state(alone, node, seed + i), 10 + i) for i, node in enumerate(honest_nodes)])

    assert all_finite(mixed.global_state)
    assert states_equal(mixed.global_state, alone.global_state), faults
    assert alone.rejections == []
    assert len(mixed.rejections) == len(bad), [r.reason for r in mixed.rejections]
    if mixed.plans[ROUND_NODES[0]].request:  # the honest replies did move the model
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
        laq = LAQStrategy(laq_state(0), num_clients=len(nodes), alpha=0.1, bits=8)
        laq.client_of = {node: pid for pid, node in enumerate(nodes)}
        laq.configure_train(1, nodes)
        return laq

    mixed, alone = strategy(), strategy()
    honest_replies = {node: laq_reply(node, pid, laq_upload(laq_state(seed + pid))[0], to=mixed) for pid, node in enumerate(nodes[:honest])}
    bad = []
    for i, kind in enumerate(faults):
        node, pid = nodes[honest + i % (len(nodes) - honest)], honest + i % (len(nodes) - honest)
        duplicated = honest_replies[nodes[i % honest]]
        bad.append(laq_faulty_reply(kind, node, pid, honest=duplicated, seed=seed + i, num_clients=len(nodes), to=mixed))
    replies = [*honest_replies.values(), *bad]
    order.shuffle(replies)
    mixed.aggregate_train(1, replies)
    alone.aggregate_train(1, [laq_reply(node, pid, laq_upload(laq_state(seed + pid))[0], to=alone) for pid, node in enumerate(nodes[:honest])])
    assert all_finite(mixed.global_state) and states_equal(mixed.global_state, alone.global_state)
    assert sorted(mixed.qhat) == sorted(alone.qhat) == list(range(honest))
    assert len(mixed.rejections) == len(bad) and alone.rejections == []
