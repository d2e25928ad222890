"""Server momentum, the base strategy's option (``methods.server_momentum``): FedAvgM through the real round loop."""

from __future__ import annotations

import numpy as np
import pytest

from fedlayer.client.app import make_client_app
from fedlayer.config import compose_config, resolve_resume
from fedlayer.errors import ConfigError
from fedlayer.layers import copy_state, states_equal
from fedlayer.server.builder import build_strategy
from fedlayer.server.loop import FederatedRun
from fedlayer.workload import load_workload
from tests.inprocess import FIRST_NODE_ID, InProcessGrid, SimulatedCrash, run_in_process
from tests.test_resume import assert_same_run

NUM_CLIENTS = 4
COMMON = [
    "dataset=digits", "model=cnn", f"federation.num_clients={NUM_CLIENTS}", "federation.fraction_train=0.5",
    "federation.rounds=3", "train.local_steps=3", "train.batch_size=16", "evaluation.max_examples=100",
]


def _run(tmp_path, name: str, *overrides: str) -> tuple[list[tuple[dict, dict]], dict]:
    """A whole in-process run; per round, the global model before it and the new values ``aggregate``
    released (recorded as the strategy returns them, unchanged), and the final model."""
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", f"run_name={name}",
                          f"client_state_dir={tmp_path / ('state-' + name)}", *overrides])
    run = FederatedRun(cfg)
    strategy = run.strategy
    rounds: list[tuple[dict, dict]] = []
    aggregate = strategy.aggregate

    def recorded(server_round, replies):
        released = aggregate(server_round, replies)
        rounds.append((copy_state(strategy.global_state), copy_state(released)))
        return released

    strategy.aggregate = recorded
    grid = InProcessGrid(make_client_app(cfg), NUM_CLIENTS, node_config=lambda p: {
        "partition-id": p, "num-partitions": NUM_CLIENTS, "host": "in-process"})
    run.run(grid)
    return rounds, strategy.global_state


def test_fedavg_with_momentum_moves_the_model_by_the_momentum_recursion(tmp_path):
    beta = 0.6
    rounds, final = _run(tmp_path, "momentum", f"strategy.server_momentum={beta}")
    assert len(rounds) == 3
    # v_1 = avg_1 - W_0, W_1 = avg_1; then v_t = beta v_{t-1} + (avg_t - W_{t-1}), W_t = W_{t-1} + v_t
    velocity: dict[str, np.ndarray] = {}
    expected = {k: v.astype(np.float64) for k, v in rounds[0][0].items()}
    for before, released in rounds:
        for key, value in before.items():  # each round starts from the model the recursion gave
            assert np.allclose(value, expected[key], rtol=1e-5, atol=1e-6), key
        for key, avg in released.items():
            step = avg.astype(np.float64) - expected[key]
            velocity[key] = beta * velocity[key] + step if key in velocity else step
            expected[key] = expected[key] + velocity[key]
    assert all(np.allclose(final[k], expected[k], rtol=1e-5, atol=1e-6) for k in final)
    # and it is not the plain average: from round 2 on the model is ahead of what the replies gave
    last_released = rounds[-1][1]
    assert not all(np.allclose(final[k], last_released[k]) for k in final)


def test_momentum_zero_is_plain_fedavg_bit_for_bit(tmp_path):
    plain_rounds, plain = _run(tmp_path, "plain")
    zero_rounds, zero = _run(tmp_path, "zero", "strategy.server_momentum=0.0")
    assert states_equal(plain, zero)
    assert states_equal(plain, plain_rounds[-1][1])  # FedAvg releases every layer: the model is the last average


@pytest.mark.parametrize("method", ["fedlama", "fedlp", "fll", "laq"])
def test_every_method_with_a_global_model_takes_it(method):
    cfg = compose_config([*COMMON, f"strategy={method}", "strategy.server_momentum=0.5"])
    strategy = build_strategy(cfg, load_workload(cfg, NUM_CLIENTS))
    assert strategy.momentum is not None and strategy.momentum.beta == 0.5


@pytest.mark.parametrize("method", ["pfedla", "local"])
def test_methods_without_a_global_model_refuse_it_naming_the_field(method):
    cfg = compose_config([*COMMON, f"strategy={method}", "strategy.server_momentum=0.5"])
    with pytest.raises(ConfigError) as err:
        build_strategy(cfg, load_workload(cfg, NUM_CLIENTS))
    assert err.value.field == "strategy.server_momentum"
    cfg = compose_config([*COMMON, f"strategy={method}"])  # off (the default), it builds
    assert build_strategy(cfg, load_workload(cfg, NUM_CLIENTS)).momentum is None


def test_the_velocity_is_checkpointed_so_a_resumed_run_continues_exactly(tmp_path):
    common = [*COMMON, "federation.rounds=4", "strategy.server_momentum=0.7", f"output_dir={tmp_path}"]  # assert_same_run's 4
    run_in_process(compose_config([*common, f"client_state_dir={tmp_path / 'state-straight'}", "run_name=straight"]))
    crashed = [*common, f"client_state_dir={tmp_path / 'state-crashed'}", "run_name=crashed"]
    with pytest.raises(SimulatedCrash):
        run_in_process(compose_config(crashed), crash_at=(3, 1))
    run_in_process(resolve_resume(compose_config([f"resume={tmp_path / 'crashed'}"])), first_node_id=FIRST_NODE_ID + 1000)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")
