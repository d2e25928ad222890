"""FedLP's levers for hard splits (issue #19): per-tensor draw, damped average, and with them server
momentum (an option of every method, ``methods.server_momentum``; FedAvg's own test: test_server_momentum.py)."""

import json

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from benchmarks.faults import send_plans
from benchmarks.fedlp_report import main as report_main
from fedlayer.config import compose_config, resolve_resume
from fedlayer.errors import ConfigError, ParameterError
from fedlayer.layers import from_arrayrecord, states_equal, torch_state_to_numpy
from fedlayer.methods.base import NodePlan
from fedlayer.methods.fedlp import DRAW_KEY, FedLPStrategy, fedlp_train
from fedlayer.models import build_model
from fedlayer.server.builder import build_strategy
from fedlayer.workload import load_workload
from tests.conftest import FEDLP_OVERRIDES, make_reply
from tests.inprocess import FIRST_NODE_ID, SimulatedCrash, run_in_process
from tests.test_resume import assert_same_run

@pytest.fixture(scope="module")
def cnn6():
    """cnn6 (BatchNorm after every conv) and its initial state."""
    model = build_model("cnn6", input_shape=(3, 32, 32), num_classes=10, seed=0)
    return model, torch_state_to_numpy(model.state_dict())


def _fedlp(fedlp_initial, fedlp_runtime, **kwargs):
    return FedLPStrategy(fedlp_initial, model=fedlp_runtime.new_model(), **kwargs)


def _reply_to(fedlp_runtime, strategy, node, plan, server_round=1):
    """``node``'s real reply to the train message of ``plan`` (identify ``node`` as client 0, the runtime's partition)."""
    message = send_plans(strategy, server_round, {node: plan})[node]
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return message, Message(fedlp_train(fedlp_runtime, message.content, context), reply_to=message)


def _filled(state, keys, value):
    return {k: np.full_like(state[k], value) for k in keys}


# ------------------------------------------------------------------ defaults
def test_defaults_are_the_paper_and_add_nothing_to_the_messages(fedlp_runtime, fedlp_initial):
    strategy = _fedlp(fedlp_initial, fedlp_runtime)
    assert (strategy.options.draw, strategy.options.dropped, strategy.server_momentum) == ("unit", "keepers", 0.0)
    strategy.client_of = {3: 0}
    plan = strategy.plan(1, 3)
    assert DRAW_KEY not in plan.config and set(plan.request) <= set(strategy.layers.names)
    cfg = compose_config(FEDLP_OVERRIDES)
    assert (cfg.strategy.draw, cfg.strategy.dropped, cfg.strategy.server_momentum) == ("unit", "keepers", 0.0)


def test_bad_lever_values_name_the_field(fedlp_runtime, fedlp_initial):
    def build(*extra):
        cfg = compose_config([*FEDLP_OVERRIDES, *extra])
        return build_strategy(cfg, load_workload(cfg, 3))

    for override, field in [
        ("strategy.draw=layer", "strategy.draw"),
        ("strategy.dropped=zero", "strategy.dropped"),
        ("strategy.server_momentum=1.0", "strategy.server_momentum"),
        ("strategy.server_momentum=-0.1", "strategy.server_momentum"),
    ]:
        with pytest.raises(ConfigError, match=field):
            build(override)
    with pytest.raises(ConfigError, match="strategy.draw.*homogeneous"):
        build("strategy.scheme=heterogeneous", "strategy.draw=tensor")
    with pytest.raises(ParameterError) as err:
        _fedlp(fedlp_initial, fedlp_runtime, server_momentum=True)
    assert err.value.name == "server_momentum"


# --------------------------------------------------------------- tensor draw
def test_tensor_draw_keeps_and_drops_tensors_independently(cnn6):
    model, state = cnn6
    unit = FedLPStrategy(state, model=model, p=0.5, seed=2)
    tensor = FedLPStrategy(state, model=model, p=0.5, seed=2, draw="tensor")
    bn = [k for k in state if k.startswith("blocks.0.bn1.")]
    unit_masks = [set(unit.keep_mask(r, c)) for r in range(1, 40) for c in range(5)]
    tensor_masks = [set(tensor.keep_mask(r, c)) for r in range(1, 40) for c in range(5)]
    # per unit: a conv and its BatchNorm travel whole and together
    assert all(("blocks.0.conv1" in m) == ("blocks.0.bn1" in m) for m in unit_masks)
    # per tensor: masks name keys, and a BatchNorm's tensors are split from each other and from the conv
    assert all(m <= set(state) for m in tensor_masks)
    assert any(("blocks.0.conv1.weight" in m) != ("blocks.0.bn1.weight" in m) for m in tensor_masks)
    assert any(0 < len(m & set(bn)) < len(bn) for m in tensor_masks)
    rate = sum(len(m) for m in tensor_masks) / (len(tensor_masks) * len(state))
    assert abs(rate - 0.5) < 0.05
    assert tensor.keep_mask(7, 3) == FedLPStrategy(state, model=model, p=0.5, seed=2, draw="tensor").keep_mask(7, 3)


def test_tensor_draw_uploads_exactly_the_kept_tensors_and_averages_each_over_its_holders(fedlp_runtime, fedlp_initial):
    strategy = _fedlp(fedlp_initial, fedlp_runtime, p=0.5, draw="tensor", seed=5)
    keep = ["blocks.0.conv.weight", "head.fc2.bias"]  # a conv's weight without its bias
    strategy.client_of = {4: 0}
    message, reply = _reply_to(fedlp_runtime, strategy, 4, NodePlan(send=strategy.layers.names, request=keep, config=strategy.plan(1, 4).config))
    assert message.content["config"][DRAW_KEY] == "tensor"
    assert sorted(from_arrayrecord(reply.content["arrays"])) == sorted(keep)
    strategy.aggregate_train(1, [reply])
    assert not strategy.rejections
    sent = from_arrayrecord(reply.content["arrays"])
    for key in fedlp_initial:
        expected = sent[key] if key in keep else fedlp_initial[key]
        assert np.array_equal(strategy.global_state[key], expected), key
    assert "blocks.0.conv.bias" in strategy.round_record(1)["layers_kept_by_nobody"]


def test_tensor_draw_refuses_a_whole_layer_when_one_tensor_was_asked_for(fedlp_runtime, fedlp_initial):
    strategy = _fedlp(fedlp_initial, fedlp_runtime, draw="tensor")
    strategy.client_of = {1: 0}
    send_plans(strategy, 1, {1: NodePlan(send=strategy.layers.names, request=["head.fc2.weight"])})
    whole = {k: fedlp_initial[k] for k in ("head.fc2.weight", "head.fc2.bias")}
    assert strategy.aggregate_train(1, [make_reply(1, whole, to=strategy)]) is None
    assert "not requested" in strategy.rejections[0].reason
    assert states_equal(strategy.global_state, fedlp_initial)


# ------------------------------------------------------------- damped average
def test_damped_average_counts_droppers_with_the_value_they_were_sent(fedlp_runtime, fedlp_initial):
    """Hand-made: nodes 1 and 3 keep head.fc2 (value 1 and 5; 30 and 20 examples), node 2 drops it
    (10 examples); nobody keeps blocks.0.conv."""
    fc2 = ["head.fc2.weight", "head.fc2.bias"]
    others = ["blocks.1.conv", "head.fc1"]

    def run(dropped):
        strategy = _fedlp(fedlp_initial, fedlp_runtime, dropped=dropped)
        strategy.client_of = {1: 0, 2: 1, 3: 2}
        send_plans(strategy, 1, {
            1: NodePlan(send=strategy.layers.names, request=["head.fc2", *others]),
            2: NodePlan(send=strategy.layers.names, request=others),
            3: NodePlan(send=strategy.layers.names, request=["head.fc2", *others]),
        })
        body = strategy.layers.keys_of(others)
        replies = [
            make_reply(1, {**_filled(fedlp_initial, fc2, 1.0), **_filled(fedlp_initial, body, 0.1)}, 30, to=strategy),
            make_reply(2, _filled(fedlp_initial, body, 0.2), 10, to=strategy),
            make_reply(3, {**_filled(fedlp_initial, fc2, 5.0), **_filled(fedlp_initial, body, 0.3)}, 20, to=strategy),
        ]
        strategy.aggregate_train(1, replies)
        assert not strategy.rejections
        return strategy.global_state

    damped, keepers = run("damped"), run("keepers")
    sent = fedlp_initial["head.fc2.weight"]
    assert np.allclose(damped["head.fc2.weight"], (30 * 1.0 + 10 * sent + 20 * 5.0) / 60)
    assert np.allclose(keepers["head.fc2.weight"], (30 * 1.0 + 20 * 5.0) / 50)
    # a layer every replier kept is the plain mean either way; one nobody kept stays bit for bit
    assert np.allclose(damped["head.fc1.weight"], (30 * 0.1 + 10 * 0.2 + 20 * 0.3) / 60)
    for key in ("blocks.0.conv.weight", "blocks.0.conv.bias"):
        assert np.array_equal(damped[key], fedlp_initial[key])


# ------------------------------------------------------------ server momentum
def _momentum_round(strategy, server_round, value, nodes=(1, 2)):
    names = strategy.layers.names
    strategy.client_of.update({n: i for i, n in enumerate(nodes)})
    send_plans(strategy, server_round, {n: NodePlan(send=names, request=names) for n in nodes})
    floats = [k for k, v in strategy.global_state.items() if np.issubdtype(v.dtype, np.floating)]
    replies = [make_reply(n, {**strategy.global_state, **_filled(strategy.global_state, floats, value)}, to=strategy) for n in nodes]
    strategy.aggregate_train(server_round, replies)
    assert not strategy.rejections


def test_server_momentum_is_applied_from_the_second_round_and_spares_batchnorm_statistics(cnn6):
    model, state = cnn6
    beta = 0.5
    strategy = FedLPStrategy(state, model=model, p=1.0, server_momentum=beta)
    plain = FedLPStrategy(state, model=model, p=1.0)
    key, w0 = "head.fc2.weight", state["head.fc2.weight"]
    _momentum_round(strategy, 1, 1.0)
    _momentum_round(plain, 1, 1.0)
    assert np.allclose(strategy.global_state[key], 1.0)  # round 1: v = avg - W, so W + v = avg
    assert states_equal(strategy.global_state, plain.global_state)
    _momentum_round(strategy, 2, 2.0)
    # round 2: v = beta (1 - w0) + (2 - 1), W = 1 + v
    assert np.allclose(strategy.global_state[key], 1.0 + beta * (1.0 - w0) + 1.0, atol=1e-6)
    assert "blocks.0.bn1.running_mean" not in strategy.momentum.keys
    assert np.all(strategy.global_state["blocks.0.bn1.running_mean"] == 2.0)  # BatchNorm statistics: the plain average
    assert "blocks.0.bn1.weight" in strategy.momentum.keys


def test_server_momentum_keeps_layers_nobody_kept_and_their_velocity(fedlp_runtime, fedlp_initial):
    strategy = _fedlp(fedlp_initial, fedlp_runtime, server_momentum=0.9)
    names = strategy.layers.names
    strategy.client_of = {1: 0}
    send_plans(strategy, 1, {1: NodePlan(send=names, request=names)})
    strategy.aggregate_train(1, [make_reply(1, _filled(fedlp_initial, fedlp_initial, 1.0), to=strategy)])
    velocity = strategy.momentum.velocity["head.fc2.weight"].copy()
    after_one = dict(strategy.global_state)
    send_plans(strategy, 2, {1: NodePlan(send=names, request=["head.fc1"])})
    strategy.aggregate_train(2, [make_reply(1, _filled(fedlp_initial, strategy.layers.keys_of(["head.fc1"]), 3.0), to=strategy)])
    assert np.array_equal(strategy.global_state["head.fc2.weight"], after_one["head.fc2.weight"])
    assert np.array_equal(strategy.momentum.velocity["head.fc2.weight"], velocity)
    assert not np.array_equal(strategy.global_state["head.fc1.weight"], after_one["head.fc1.weight"])


def test_server_momentum_state_round_trips_through_a_checkpoint(fedlp_runtime, fedlp_initial):
    def two_rounds(strategy, restore=False):
        _momentum_round(strategy, 1, 1.0)
        if restore:
            fresh = _fedlp(fedlp_initial, fedlp_runtime, server_momentum=0.7)
            fresh.load_state_dict(strategy.state_dict())
            fresh.global_state = dict(strategy.global_state)
            strategy = fresh
        _momentum_round(strategy, 2, 2.0)
        return strategy.global_state

    straight = two_rounds(_fedlp(fedlp_initial, fedlp_runtime, server_momentum=0.7))
    resumed = two_rounds(_fedlp(fedlp_initial, fedlp_runtime, server_momentum=0.7), restore=True)
    assert states_equal(straight, resumed)


def test_levers_together_resume_exactly_after_a_crash(tmp_path):
    """Server momentum, damped average and tensor draw through the real round loop: crash, resume, same model."""
    common = [
        "dataset=digits", "model=cnn", "federation.num_clients=4", "federation.fraction_train=0.5",
        "federation.rounds=4", "train.local_steps=5", "train.batch_size=16", "strategy=fedlp",
        "strategy.draw=tensor", "strategy.dropped=damped", "strategy.server_momentum=0.9",
        f"output_dir={tmp_path}",
    ]
    run_in_process(compose_config([*common, f"client_state_dir={tmp_path / 'state-straight'}", "run_name=straight"]))
    crashed = [*common, f"client_state_dir={tmp_path / 'state-crashed'}", "run_name=crashed"]
    with pytest.raises(SimulatedCrash):
        run_in_process(compose_config(crashed), crash_at=(3, 1))
    resumed = resolve_resume(compose_config([f"resume={tmp_path / 'crashed'}"]))
    run_in_process(resumed, first_node_id=FIRST_NODE_ID + 1000)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")


# ------------------------------------------------------------------ the report
def test_report_averages_the_last_evaluations_over_seeds_against_the_same_seeds_fedavg(tmp_path):
    results = []
    for variant, seed, accuracies, up in [
        ("fedavg", 0, [0.5, 0.8, 0.9], 100), ("fedavg", 1, [0.5, 0.6, 0.7], 200),
        ("fedlp", 0, [0.1, 0.7, 0.8], 50), ("fedlp", 1, [0.9, 0.5, 0.6], 110), ("fedlp-damped", 1, [0.6, 0.7, 0.8], 100),
    ]:
        run_dir = tmp_path / f"{variant}-{seed}"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": i + 1, "accuracy": a}) + "\n" for i, a in enumerate(accuracies)))
        results.append({"variant": f"{variant}@dirichlet-s{seed}", "setting": "default", "dataset": "animal10k",
                        "partition": "dirichlet(0.3)", "seed": seed, "run_dir": str(run_dir), "final_accuracy": accuracies[-1],
                        "bytes_up": up, "bytes_total": 2 * up, "wall_seconds": 1.0})
    (tmp_path / "results.json").write_text(json.dumps(results))
    report_main([str(tmp_path), "--last", "2"])
    table = {row["variant"]: row for row in json.loads((tmp_path / "fedlp_levers.json").read_text())["table"]}
    assert table["fedavg"]["accuracy_mean"] == pytest.approx((0.85 + 0.65) / 2)
    assert table["fedlp"]["accuracy_mean"] == pytest.approx((0.75 + 0.55) / 2)
    assert (table["fedlp"]["accuracy_min"], table["fedlp"]["accuracy_max"]) == pytest.approx((0.55, 0.75))
    assert table["fedlp"]["uplink_share"] == pytest.approx((0.5 + 0.55) / 2)  # each seed against its own FedAvg run
    assert table["fedlp"]["vs_fedavg_pt"] == pytest.approx(-10.0)
    assert table["fedlp-damped"]["vs_fedavg_pt"] == pytest.approx(10.0)  # seed 1 only: against FedAvg's seed 1, not its mean
    assert (tmp_path / "accuracy_vs_uplink.png").stat().st_size > 0
    assert (tmp_path / "fedlp_levers.csv").read_text().count("\n") == 6
