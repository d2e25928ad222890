"""Malformed and poisoned replies never touch server state, for every strategy.

Hypothesis builds a valid reply to what a node was asked for and then breaks
it one way (wrong names, shapes, dtypes, NaN/Inf, corrupt or truncated array
bytes, random bytes, absurd sizes, missing metrics). Each must be rejected and
counted, the global model must stay bitwise identical, and a good reply
afterwards must still be accepted: the run goes on.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.faults import BREAKS, broken_reply, good_state
from fedlayer.config import compose_config
from fedlayer.layers import copy_state, states_equal
from fedlayer.methods import METHODS
from fedlayer.server.builder import build_strategy
from fedlayer.workload import load_workload
from tests.conftest import fuzz_examples, make_reply

NODES = [101, 202, 303]
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
    strategy.configure_train(1, NODES)
    return strategy


@pytest.mark.parametrize("name", DENSE)
@settings(max_examples=fuzz_examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(BREAKS), data=st.binary(min_size=0, max_size=300), pick=st.integers(0, 10))
def test_malformed_reply_is_rejected_and_state_unchanged(name, kind, data, pick, tmp_path_factory):
    strategy = _cached(name, tmp_path_factory)
    node = sorted(strategy.plans)[pick % len(strategy.plans)]
    before = copy_state(strategy.global_state)
    rejected_before = len(strategy.rejections)
    metrics = strategy.aggregate_train(1, [broken_reply(strategy, node, kind, data)])
    assert metrics is None, kind
    assert len(strategy.rejections) == rejected_before + 1, kind
    assert strategy.rejections[-1].node_id == node
    assert states_equal(strategy.global_state, before), kind


@pytest.mark.parametrize("name", DENSE)
def test_run_goes_on_after_bad_replies(name, tmp_path):
    strategy = _prepared(name, tmp_path)
    nodes = sorted(strategy.plans)
    replies = [broken_reply(strategy, nodes[0], "nan", b"x")]
    replies += [
        make_reply(
            node,
            good_state(strategy, node) if strategy.plans[node].request else None,
            10,
            to=strategy,
        )
        for node in nodes[1:]
    ]
    strategy.aggregate_train(1, replies)
    assert len(strategy.rejections) == 1 and strategy.rejections[0].node_id == nodes[0]
