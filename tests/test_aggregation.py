"""Aggregation rules, the update-norm guard and the finite-model check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlayer.config import compose_config
from fedlayer.errors import ConfigError, ParameterError
from fedlayer.layers import ModelLayers, copy_state, states_equal
from fedlayer.methods.aggregation import aggregate_layers, oversized_updates, squared_norm
from fedlayer.methods.base import LayerwiseStrategy
from fedlayer.methods.replies import TrainReply
from fedlayer.methods.laq import LAQStrategy
from fedlayer.server.builder import build_strategy
from fedlayer.workload import load_workload
from tests.conftest import make_reply, small_state

NODES = [11, 22, 33, 44, 55]


def _strategy(**kwargs) -> LayerwiseStrategy:
    strategy = LayerwiseStrategy(small_state(), **kwargs)
    strategy.client_of = {node: i for i, node in enumerate(NODES)}
    strategy.configure_train(1, NODES)
    return strategy


def _moved(strategy: LayerwiseStrategy, seed: int, scale: float = 1.0):
    """The global model moved by a random step of size ~``scale`` (float tensors only)."""
    rng = np.random.default_rng(seed)
    return {
        key: (value + scale * rng.standard_normal(value.shape)).astype(value.dtype)
        if np.issubdtype(value.dtype, np.floating) else value.copy()
        for key, value in strategy.global_state.items()
    }


def _trimmed(states, trim):
    layers = ModelLayers.from_state(small_state())
    replies = [TrainReply(node, state, set(layers.names), 10) for node, state in enumerate(states)]
    return aggregate_layers(replies, layers, layers.names, "trimmed_mean", trim)


def test_trimmed_mean_cuts_each_end():
    values = [1.0, 2.0, 3.0, 100.0, -50.0]
    replies = [{k: np.full_like(v, x) for k, v in small_state().items()} for x in values]
    key = next(k for k, v in small_state().items() if v.dtype == np.float32)
    assert _trimmed(replies, 0.2)[key].flat[0] == pytest.approx(2.0)  # -50 and 100 cut
    assert _trimmed(replies, 0.0)[key].flat[0] == pytest.approx(np.mean(values))
    assert _trimmed(replies[:2], 0.49)[key].flat[0] == pytest.approx(1.5)  # floor(0.98) = 0 cut: the mean


def test_flowers_trim_mean_is_the_sorted_definition():
    """The rule uses Flower's ``trim_mean`` (partition, then mean); it equals the definition (sort,
    cut ``floor(trim * n)`` at each end, mean) up to the order of the float64 sum, for any reply count and trim."""
    rng = np.random.default_rng(0)
    for count in (1, 2, 3, 5, 8, 13):
        for trim in (0.0, 0.1, 0.2, 0.25, 0.3, 0.49):
            states = [{k: rng.standard_normal(v.shape).astype(v.dtype) * 10.0 ** rng.integers(-3, 3) if v.dtype == np.float32
                       else v for k, v in small_state().items()} for _ in range(count)]
            got = _trimmed(states, trim)
            cut = int(np.floor(trim * count))
            for key, value in got.items():
                if value.dtype != np.float32:
                    continue
                ordered = np.sort(np.stack([s[key].astype(np.float64) for s in states]), axis=0)
                expected = ordered[cut : count - cut].mean(axis=0).astype(np.float32)
                assert np.allclose(value, expected, rtol=1e-6, atol=0), (count, trim, key)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_one_attacker_among_five_moves_the_model_no_further_than_the_honest_spread(rule):
    """The attacker's update is 1e6 x an honest one; the guard is off, so only the rule protects."""
    strategy = _strategy(aggregation_rule=rule, trim=0.2, norm_factor=0)
    start = copy_state(strategy.global_state)
    honest = [_moved(strategy, seed) for seed in range(4)]
    attack = {k: (start[k] + (v - start[k]) * 1e6).astype(v.dtype) for k, v in _moved(strategy, 99).items()}
    replies = [make_reply(node, state, 10, to=strategy) for node, state in zip(NODES, [*honest, attack])]
    strategy.aggregate_train(1, replies)
    assert strategy.rejections == []
    for key, value in strategy.global_state.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        stacked = np.stack([h[key] for h in honest])
        assert (value >= stacked.min(axis=0) - 1e-6).all() and (value <= stacked.max(axis=0) + 1e-6).all(), key


def test_the_mean_rule_without_the_guard_is_moved_by_the_attacker():
    """The contrast to the test above: the same attack under the plain mean."""
    strategy = _strategy(norm_factor=0)
    start = copy_state(strategy.global_state)
    attack = {k: (start[k] + (v - start[k]) * 1e6).astype(v.dtype) for k, v in _moved(strategy, 99).items()}
    strategy.aggregate_train(1, [make_reply(n, _moved(strategy, i), 10, to=strategy) for i, n in enumerate(NODES[:4])] + [make_reply(55, attack, 10, to=strategy)])
    key = "blocks.0.conv.weight"
    assert np.abs(strategy.global_state[key] - start[key]).max() > 1e4


@pytest.mark.parametrize("values", ["huge", "scaled"])
def test_the_norm_guard_refuses_an_oversized_update(values):
    strategy = _strategy()
    honest = [_moved(strategy, seed, 0.01) for seed in range(4)]
    start = strategy.global_state
    if values == "huge":  # finite, so reply validation lets it through
        attack = {k: np.full_like(v, 3e38) if v.dtype == np.float32 else v for k, v in start.items()}
    else:
        attack = {k: (start[k] + (v - start[k]) * 1e6).astype(v.dtype) for k, v in _moved(strategy, 7, 0.01).items()}
    expected = _strategy()
    expected.aggregate_train(1, [make_reply(n, h, 10, to=expected) for n, h in zip(NODES, honest)])
    strategy.aggregate_train(1, [make_reply(n, h, 10, to=strategy) for n, h in zip(NODES, honest)] + [make_reply(55, attack, 10, to=strategy)])
    assert [r.node_id for r in strategy.rejections] == [55] and "median" in strategy.rejections[0].reason
    assert states_equal(strategy.global_state, expected.global_state)


def test_squared_norms_are_float64_sums_over_every_block():
    """The guard's norms: differences and squares in float64 (finite near the float32 limit), over
    tensors of several blocks and of none, equal to an exact sum up to float64 rounding."""
    rng = np.random.default_rng(0)
    big = np.full(150_001, 3e38, dtype=np.float32)  # 3 blocks; big - (-big) overflows float32
    mixed = rng.standard_normal((300, 401)).astype(np.float32)
    other = rng.standard_normal((300, 401)).astype(np.float32)
    exact = math.fsum((mixed.astype(np.float64).ravel() - other.astype(np.float64).ravel()) ** 2)
    assert squared_norm(mixed, other) == pytest.approx(exact, rel=1e-12)
    assert squared_norm(mixed) == pytest.approx(math.fsum(mixed.astype(np.float64).ravel() ** 2), rel=1e-12)
    assert squared_norm(big, -big) == pytest.approx(150_001 * (2 * float(big[0])) ** 2, rel=1e-12)
    assert squared_norm(np.float32(-2.0)) == 4.0 and squared_norm(np.zeros((0, 3), np.float32)) == 0.0


def test_the_guard_holds_with_as_many_oversized_updates_as_honest_ones():
    """An even split: the lower median is an honest norm, so all three oversized updates are refused
    (the midpoint median would sit halfway to the attackers and let them through)."""
    norms = {node: {"w": 1.0 + 0.1 * node} for node in (1, 2, 3)} | {node: {"w": 1e6} for node in (4, 5, 6)}
    assert sorted(oversized_updates(norms, factor=20)) == [4, 5, 6]


def test_a_merged_model_that_is_not_finite_is_dropped_and_counted():
    """LAQ steps with a sum of stored updates: two huge (finite) uploads overflow it to inf.

    With the guard off the round's update is dropped and counted; the old model stays.
    """
    from tests.test_laq import NODES as LAQ_NODES
    from tests.test_laq import _reply, _state, _upload

    strategy = LAQStrategy(_state(0), num_clients=3, alpha=1.0, norm_factor=0, bits=8)
    strategy.client_of = {node: pid for pid, node in enumerate(LAQ_NODES)}
    strategy.configure_train(1, LAQ_NODES)
    before = copy_state(strategy.global_state)
    huge, _ = _upload({k: np.full_like(v, 3e38) for k, v in before.items()})
    metrics = strategy.aggregate_train(1, [_reply(11, 0, huge, to=strategy), _reply(22, 1, huge, to=strategy)])
    assert metrics is not None and strategy.dropped_rounds == [1]
    assert states_equal(strategy.global_state, before)


def test_laq_guards_the_norm_of_the_innovations():
    from tests.test_laq import NODES as LAQ_NODES
    from tests.test_laq import _reply, _state, _upload

    strategy = LAQStrategy(_state(0), num_clients=3, alpha=0.1, bits=8)
    strategy.client_of = {node: pid for pid, node in enumerate(LAQ_NODES)}
    strategy.configure_train(1, LAQ_NODES)
    honest = [_upload(_state(seed))[0] for seed in (1, 2)]
    attack, _ = _upload({k: v * 1e6 for k, v in _state(3).items()})
    strategy.aggregate_train(1, [_reply(11, 0, honest[0], to=strategy), _reply(22, 1, honest[1], to=strategy), _reply(33, 2, attack, to=strategy)])
    assert [r.node_id for r in strategy.rejections] == [33] and sorted(strategy.qhat) == [0, 1]


def test_config_names_the_aggregation_fields():
    cfg = compose_config(["dataset=digits", "model=cnn", "aggregation.rule=mode"])
    with pytest.raises(ConfigError) as err:
        build_strategy(cfg, load_workload(cfg, 2))
    assert err.value.field == "aggregation.rule"
    cfg = compose_config(["dataset=digits", "model=linear", "strategy=laq", "aggregation.rule=median"])
    with pytest.raises(ConfigError, match="does not average layers") as err:
        build_strategy(cfg, load_workload(cfg, 2))
    assert err.value.field == "aggregation.rule"
    for field, value in (("trim", 0.5), ("norm_factor", 0.5)):
        cfg = compose_config(["dataset=digits", "model=cnn", f"aggregation.{field}={value}"])
        with pytest.raises(ConfigError) as err:
            build_strategy(cfg, load_workload(cfg, 2))
        assert err.value.field == f"aggregation.{field}"
    cfg = compose_config(["dataset=digits", "model=cnn", "aggregation.norm_guard=false"])
    assert build_strategy(cfg, load_workload(cfg, 2)).norm_factor == 0
    with pytest.raises(ParameterError):
        LAQStrategy({"w": np.zeros(3, np.float32)}, num_clients=2, aggregation_rule="trimmed_mean")
