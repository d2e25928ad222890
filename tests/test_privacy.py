"""Client-level differential privacy (issue 29, docs/privacy.md): clipping, noise, accounting, refusals, resume."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fedlayer.config import compose_config, resolve_resume
from fedlayer.errors import ConfigError
from fedlayer.layers import ModelLayers, states_equal
from fedlayer.methods import FedLAMAStrategy
from fedlayer.methods.base import NodePlan
from fedlayer.methods.fedavg import FedAvgStrategy
from fedlayer.methods.replies import TrainReply
from fedlayer.privacy import Privacy
from fedlayer.privacy.accountant import calibrate_noise_multiplier
from fedlayer.privacy.mechanism import clipped, update_norm
from fedlayer.server.checkpoint import CheckpointStore, decode_checkpoint
from fedlayer.server.loop import FederatedRun
from fedlayer.server.rundir import RunDirectory
from tests.inprocess import FIRST_NODE_ID, SimulatedCrash, run_in_process
from tests.test_resume import assert_same_run

#: 5 clients of the digits split hold 230 training examples each, so the example-weighted mean and
#: DP-FedAvg's unweighted one use the same weight (1/n), and can be compared bit for bit.
COMMON = ["dataset=digits", "model=linear", "federation.num_clients=5", "federation.fraction_train=0.6",
          "train.local_steps=3", "train.batch_size=16", "evaluation.max_examples=200"]


def _run(tmp_path, name: str, *overrides: str, **grid):
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", f"run_name={name}", *overrides])
    return run_in_process(cfg, **grid)


def _model(tmp_path, name: str):
    return CheckpointStore(tmp_path / name).latest().global_state


def _metrics(tmp_path, name: str) -> list[dict]:
    return RunDirectory(tmp_path / name).read_metrics()


# --------------------------------------------------------------- neutral settings
@pytest.mark.parametrize("strategy", [["strategy=fedavg"], ["strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0"]])
def test_noise_zero_without_clipping_equals_the_non_private_run_bitwise(tmp_path, strategy):
    overrides = [*strategy, "federation.rounds=3"]
    _run(tmp_path, "plain", *overrides)
    for mode in ("central", "local"):
        _run(tmp_path, mode, *overrides, f"privacy.mode={mode}", "privacy.clip=null", "privacy.noise_multiplier=0")
        assert states_equal(_model(tmp_path, "plain"), _model(tmp_path, mode)), mode
        assert [m["accuracy"] for m in _metrics(tmp_path, mode)] == [m["accuracy"] for m in _metrics(tmp_path, "plain")]
        assert all(m["privacy"]["epsilon"] is None for m in _metrics(tmp_path, mode))  # infinite: written as null


# --------------------------------------------------------------------- clipping
def test_clipped_updates_have_norm_at_most_clip():
    rng = np.random.default_rng(0)
    for trial in range(200):
        reference = {"w": rng.normal(size=(7, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32),
                     "n": np.array(3, dtype=np.int64)}
        scale = 10.0 ** rng.uniform(-3, 3)
        state = {k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) if k != "n" else np.array(4) for k, v in reference.items()}
        clip = float(10.0 ** rng.uniform(-2, 1))
        out = clipped(state, reference, clip)
        assert update_norm(out, reference) <= clip * (1 + 1e-5)
        assert out["w"].dtype == np.float32 and out["n"] == 4
        if update_norm(state, reference) <= clip:
            assert all(out[k] is state[k] for k in state)  # within the bound: the same arrays


@pytest.mark.parametrize("strategy", [["strategy=fedavg"], ["strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0"]])
def test_every_client_update_is_clipped_before_it_leaves_the_client(tmp_path, strategy):
    """Local mode without noise: the server takes the plain mean of what the clients sent, so the
    model moves by at most ``clip`` a round only if every client clipped its own update, against what
    it trained from (FedLAMA: a layer it kept since the block's start is measured from what it got then)."""
    clip = 0.01
    _run(tmp_path, "clipped", *strategy, "federation.rounds=3", "privacy.mode=local", f"privacy.clip={clip}",
         "privacy.noise_multiplier=0", "checkpoint_keep=3")
    _run(tmp_path, "plain", "federation.rounds=1")
    initial = _strategy(Privacy()).global_state
    states = [initial, *(decode_checkpoint(p.read_bytes()).global_state for p in CheckpointStore(tmp_path / "clipped").paths())]
    assert len(states) == 4
    plain_step = update_norm(_model(tmp_path, "plain"), initial)
    assert plain_step > 10 * clip  # clipping really binds
    steps = [update_norm(after, before) for before, after in zip(states, states[1:])]
    assert all(step <= clip * (1 + 1e-5) for step in steps) and sum(step > 0 for step in steps) >= 2, steps


@pytest.mark.parametrize("method", [
    ["strategy=fedlp", "strategy.scheme=homogeneous", "model=cnn"],
    ["strategy=fedlp", "strategy.scheme=heterogeneous", "model=cnn"],
    ["strategy=fll", "model=cnn", "strategy.rounds_per_stage=1"],
    ["strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0", "model=cnn", "codec.up_bits=4", "codec.down_bits=4"],
    ["strategy=fedavg", "codec.up_bits=4", "codec.down_bits=8"],
])
def test_every_method_and_the_codec_compose_with_central_dp(tmp_path, method):
    """Noise 0, a tight clip: whatever the method releases moves each layer by at most the clip a round
    (each carrier's update clipped, summed, divided by at least as many expected carriers; layers with
    different carriers each move by up to the clip)."""
    clip = 0.01
    _run(tmp_path, "private", *method, "federation.rounds=3", "privacy.mode=central", f"privacy.clip={clip}",
         "privacy.noise_multiplier=0", "checkpoint_keep=3")
    states = [decode_checkpoint(p.read_bytes()).global_state for p in CheckpointStore(tmp_path / "private").paths()]
    layers = ModelLayers.from_state(states[0])
    steps = [update_norm({k: after[k] for k in layer.keys}, before) for before, after in zip(states, states[1:]) for layer in layers]
    assert len(states) == 3 and all(step <= clip * (1 + 1e-4) for step in steps) and any(step > 0 for step in steps), steps


# ------------------------------------------------------------------------ noise
def _strategy(privacy: Privacy, cls=FedAvgStrategy, **kwargs):
    cfg = compose_config([*COMMON])
    from fedlayer.workload import initial_state, load_workload

    state = initial_state(cfg, load_workload(cfg, 5).pool)
    return cls(state, seed=3, privacy=privacy, **kwargs)


def test_noise_on_aggregated_layers_has_the_expected_std_with_the_fixed_denominator():
    z, clip = 1.3, 0.7
    strategy = _strategy(Privacy(mode="central", clip=clip, noise_multiplier=z))
    names = strategy.layers.names
    strategy.plans = {node: NodePlan(send=names, request=names) for node in range(4)}  # 4 planned carriers
    # one reply arrives, its update 0: what the layer moves is the noise alone, sized for 4 carriers
    reply = TrainReply(0, dict(strategy.global_state), set(names), 230)
    draws = {key: [] for key in strategy.global_state}
    for _ in range(30):
        out = strategy.average_layers([reply], names)
        for key, value in out.items():
            draws[key].append(value.astype(np.float64) - strategy.global_state[key])
    noise = np.concatenate([np.ravel(d) for d in draws.values()])
    expected = z * clip / 4
    assert noise.size > 10_000
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    assert abs(noise.std() / expected - 1) < 0.03


def test_a_layer_not_released_this_round_gets_no_noise():
    strategy = _strategy(Privacy(mode="central", clip=1.0, noise_multiplier=1.0))
    names = strategy.layers.names
    strategy.plans = {node: NodePlan(send=names, request=names[:1]) for node in range(3)}
    reply = TrainReply(0, dict(strategy.global_state), set(names[:1]), 230)
    out = strategy.average_layers([reply], names[:1])
    assert set(out) == set(strategy.layers.keys_of(names[:1]))
    assert all(not np.array_equal(out[k], strategy.global_state[k]) for k in out)


def test_one_client_moves_a_layer_by_its_clipped_update_over_the_expected_carriers():
    strategy = _strategy(Privacy(mode="central", clip=0.5, noise_multiplier=0.0))
    names = strategy.layers.names
    strategy.plans = {node: NodePlan(send=names, request=names) for node in range(4)}
    big = {k: v + np.float32(3.0) for k, v in strategy.global_state.items()}  # an update far over clip
    out = strategy.average_layers([TrainReply(0, big, set(names), 10**6)], names)  # its example count buys nothing
    assert update_norm(out, strategy.global_state) == pytest.approx(0.5 / 4, rel=1e-5)


# ------------------------------------------------------------------- accounting
def _library_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def test_epsilon_equals_the_library_and_target_epsilon_stops_the_run_cleanly(tmp_path):
    q, z, delta = 3 / 5, 1.5, 1e-4  # 3 of 5 clients a round
    target = (_library_epsilon(q, z, 2, delta) + _library_epsilon(q, z, 3, delta)) / 2
    run, summary = _run(tmp_path, "budget", "federation.rounds=5", "privacy.mode=central", f"privacy.noise_multiplier={z}",
                        f"privacy.delta={delta}", f"privacy.target_epsilon={target}")
    lines = _metrics(tmp_path, "budget")
    assert [m["round"] for m in lines] == [1, 2]  # round 3 would have exceeded the target
    for line in lines:
        assert line["privacy"]["epsilon"] == pytest.approx(_library_epsilon(q, z, line["round"], delta), rel=1e-9)
    assert summary["privacy"]["epsilon"] == lines[-1]["privacy"]["epsilon"] <= target
    assert "round 3" in summary["privacy"]["stopped"] and "target_epsilon" in summary["privacy"]["stopped"]
    assert json.loads((tmp_path / "budget" / "summary.json").read_text())["final_accuracy"] is not None


@pytest.mark.parametrize(("q", "events", "scale", "target"), [(0.1, 10, 1.0, 2.0), (0.1, 5, math.sqrt(2), 4.0), (1.0, 10, 1.0, 8.0)])
def test_a_calibrated_noise_multiplier_spends_at_most_the_target_and_a_smaller_one_spends_more(q, events, scale, target):
    delta, step = 1e-5, 0.001

    def library(z: float) -> float:
        accountant = RdpAccountant()
        gaussian = dp_accounting.GaussianDpEvent(z / scale)
        accountant.compose(gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian), events)
        return accountant.get_epsilon(delta)

    z = calibrate_noise_multiplier(target, delta, q, events, per_event_scale=scale)
    assert library(z) <= target < library(z - step)


def test_calibration_refuses_an_impossible_request():
    with pytest.raises(ValueError, match="sampling_rate"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.0, 10)


def test_fedlama_charges_each_cohort_block_once_with_its_phi_releases():
    phi, z = 3, 1.2
    strategy = _strategy(Privacy(mode="central", noise_multiplier=z), cls=FedLAMAStrategy, phi=phi, fraction_train=0.4)
    assert strategy.privacy_event(1, 10) == (0.4, pytest.approx(z / math.sqrt(phi)), 1)
    strategy.cohort = [0, 1, 2, 3]
    assert strategy.privacy_event(2, 10) is None and strategy.privacy_event(3, 10) is None
    assert strategy.privacy_event(4, 10) is not None
    local = _strategy(Privacy(mode="local", noise_multiplier=z), cls=FedLAMAStrategy, phi=phi)
    local.cohort = [0]
    assert local.privacy_event(2, 10) == (1.0, z, 1)  # no amplification: the server sees who took part


def test_noise_without_clipping_bounds_nothing_so_epsilon_is_infinite():
    strategy = _strategy(Privacy(mode="central", clip=None, noise_multiplier=5.0))
    strategy.accountant.compose(*strategy.privacy_event(1, 10))
    assert strategy.privacy_spent()["epsilon"] == math.inf


# ------------------------------------------------------------ adaptive clipping
@pytest.mark.parametrize("start, direction", [(10.0, -1), (1e-4, 1)])
def test_adaptive_clipping_moves_the_clip_towards_the_median_update_norm(tmp_path, start, direction):
    _, summary = _run(tmp_path, "adaptive", "federation.rounds=4", "privacy.mode=central", "privacy.noise_multiplier=0.1",
                      f"privacy.clip={start}", "privacy.adaptive_clip=true", "privacy.clip_count_stddev=0.1", "privacy.clip_lr=0.5")
    lines = _metrics(tmp_path, "adaptive")
    clips = [start, *(m["privacy"]["clip"] for m in lines)]
    assert all(direction * (b - a) > 0 for a, b in zip(clips, clips[1:])), clips
    assert all("dp-within-clip" not in m["train"] for m in lines)  # the clients' bits are never released unnoised
    assert summary["privacy"]["clip"] == clips[-1]


def test_adaptive_clipping_spends_the_budget_of_one_noise_multiplier():
    privacy = Privacy(mode="central", noise_multiplier=1.0, adaptive_clip=True, clip_count_stddev=2.0)
    z_updates = privacy.update_noise_multiplier()
    assert z_updates ** -2 + (2 * privacy.clip_count_stddev) ** -2 == pytest.approx(privacy.noise_multiplier ** -2)
    with pytest.raises(ConfigError) as caught:
        compose_config(["privacy.mode=central", "privacy.adaptive_clip=true", "privacy.clip_count_stddev=0.5"])
    assert caught.value.field == "privacy.clip_count_stddev"


# --------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, field, reason", [
    (["strategy=pfedla"], "strategy.name", "personalised model per client"),
    (["strategy=laq"], "strategy.name", "stale update"),
    (["strategy=local"], "strategy.name", "releases no model"),
    (["aggregation.rule=median"], "aggregation.rule", "bounded sensitivity"),
    (["aggregation.rule=trimmed_mean"], "aggregation.rule", "bounded sensitivity"),
    (["strategy=fll", "strategy.stage_rule=plateau"], "strategy.stage_rule", "validation scores"),
])
def test_a_combination_that_cannot_be_private_is_refused_naming_its_reason(tmp_path, overrides, field, reason):
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", "privacy.mode=central", *overrides])
    with pytest.raises(ConfigError) as caught:
        FederatedRun(cfg)
    assert caught.value.field == field and reason in str(caught.value) and "\n" not in str(caught.value)
    assert not any(tmp_path.iterdir())  # refused before the run directory exists


@pytest.mark.parametrize("field, value", [("mode", "on"), ("clip", -1), ("noise_multiplier", -0.5), ("delta", 1.5), ("target_epsilon", 0)])
def test_a_bad_privacy_value_is_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError) as caught:
        compose_config([f"privacy.{field}={value}"])
    assert caught.value.field == f"privacy.{field}"


# ----------------------------------------------------------------------- resume
def test_exact_resume_keeps_the_accountant_the_noise_and_the_clip(tmp_path):
    common = [*COMMON, "federation.rounds=4", "privacy.mode=central", "privacy.noise_multiplier=0.8", "privacy.clip=2.0",
              "privacy.adaptive_clip=true", "privacy.clip_count_stddev=1.0", f"output_dir={tmp_path}"]
    run_in_process(compose_config([*common, "run_name=straight", f"client_state_dir={tmp_path / 'state-straight'}"]))
    crashed = [*common, "run_name=crashed", f"client_state_dir={tmp_path / 'state-crashed'}"]
    with pytest.raises(SimulatedCrash):
        run_in_process(compose_config(crashed), crash_at=(3, 1))
    run_in_process(resolve_resume(compose_config([f"resume={tmp_path / 'crashed'}"])), first_node_id=FIRST_NODE_ID + 1000)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")  # same noised model: the noise generator resumed
    straight, resumed = (CheckpointStore(tmp_path / n).latest().strategy_state["privacy"] for n in ("straight", "crashed"))
    assert straight["accountant"] == resumed["accountant"] == {"events": [[0.6, 0.8, 4]]}
    assert straight["clip"] == resumed["clip"] != 2.0  # the adaptive clip resumed too
    assert [m["privacy"] for m in _metrics(tmp_path, "straight")] == [m["privacy"] for m in _metrics(tmp_path, "crashed")]
