"""FedLP: homogeneous pruning, heterogeneous depths, FLOP counts."""

import copy
import json

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from benchmarks.faults import send_plans, sent_message
from fedlayer.config import compose_config
from fedlayer.errors import ConfigError, ParameterError
from fedlayer.layers import from_arrayrecord, select, states_equal
from fedlayer.methods.base import NodePlan
from fedlayer.methods.client_half import load_local_model, standard_train
from fedlayer.methods.fedavg import FedAvgStrategy
from fedlayer.methods.fedlp import FedLPStrategy, fedlp_train, pruning_units
from fedlayer.models import build_model
from fedlayer.models.depth import init_level_head, level_head_name
from fedlayer.server.builder import build_strategy
from fedlayer.server.loop import central_evaluator
from fedlayer.server.rundir import RunDirectory
from fedlayer.workload import load_workload
from tests.conftest import FEDLP_OVERRIDES, make_reply, small_state
from tests.inprocess import run_in_process

def _fedlp(fedlp_initial, fedlp_runtime, **kwargs):
    """FedLP over the configured model (cnn: two blocks)."""
    return FedLPStrategy(fedlp_initial, model=fedlp_runtime.new_model(), **kwargs)


def _build(overrides):
    """The strategy the server builds from these overrides (strategy fields are checked here)."""
    cfg = compose_config(overrides)
    return build_strategy(cfg, load_workload(cfg, int(cfg.federation.num_clients)))


def _simulate(tmp_path, *overrides):
    """A whole run in process (the real ServerApp loop and ClientApp); its summary."""
    return run_in_process(compose_config([f"output_dir={tmp_path}", "run_name=run", *overrides]))[1]


def _heads(fedlp_runtime):
    model = fedlp_runtime.new_model()
    heads = {}
    for level in range(1, len(model.blocks)):
        heads.update(init_level_head(model, level, 0))
    return heads


def _configure(strategy, nodes, server_round=1):
    """``configure_train`` for ``nodes`` (identified: client id = their index), as the round loop calls it."""
    strategy.client_of.update({node: i for i, node in enumerate(nodes)})
    strategy.configure_train(server_round, list(nodes))


def _train_message(strategy, node):
    """The message the strategy pushed to ``node`` this round (``_configure`` first)."""
    return sent_message(strategy, node)


def _client_reply(fedlp_runtime, handler, message, node_config=None):
    context = Context(run_id=1, node_id=1, node_config=node_config or {}, state=RecordDict(), run_config={})
    content = handler(fedlp_runtime, message.content, context)
    return Message(content, reply_to=message)


def _noisy(state, seed):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype == np.float32 else v for k, v in state.items()}


# ------------------------------------------------------------- homogeneous
def test_p_one_requests_every_layer_and_aggregates_like_fedavg(fedlp_runtime, fedlp_initial):
    fedlp = _fedlp(fedlp_initial, fedlp_runtime, p=1.0, seed=3, freeze_dropped=True)
    fedavg = FedAvgStrategy(fedlp_initial)
    nodes = (11, 12, 13)
    _configure(fedlp, nodes)
    _configure(fedavg, nodes)
    assert all(plan.request == fedlp.layers.names for plan in fedlp.plans.values())
    for strategy in (fedlp, fedavg):
        strategy.aggregate_train(1, [make_reply(n, _noisy(fedlp_initial, n), num_examples=10 * n, to=strategy) for n in nodes])
    assert states_equal(fedlp.global_state, fedavg.global_state)


def test_p_one_client_trains_exactly_like_fedavg(fedlp_runtime, fedlp_initial):
    fedlp, fedavg = _fedlp(fedlp_initial, fedlp_runtime, p=1.0, freeze_dropped=True), FedAvgStrategy(fedlp_initial)
    _configure(fedlp, [5])
    _configure(fedavg, [5])
    ours = _client_reply(fedlp_runtime, fedlp_train, _train_message(fedlp, 5))
    theirs = _client_reply(fedlp_runtime, standard_train, _train_message(fedavg, 5))
    assert states_equal(from_arrayrecord(ours.content["arrays"]), from_arrayrecord(theirs.content["arrays"]))
    metrics = ours.content["metrics"]
    assert metrics["train-flops"] == metrics["train-flops-full"] > 0


def test_keep_rate_matches_p_and_is_reproducible(fedlp_runtime, fedlp_initial):
    strategy = _fedlp(fedlp_initial, fedlp_runtime, p=0.3, seed=1)
    draws = [strategy.keep_mask(r, n) for r in range(1, 101) for n in range(10)]
    rate = sum(len(d) for d in draws) / (len(draws) * len(strategy.layers))
    assert abs(rate - 0.3) < 0.03
    assert _fedlp(fedlp_initial, fedlp_runtime, p=0.3, seed=1).keep_mask(7, 3) == strategy.keep_mask(7, 3)


def test_batchnorm_is_kept_or_dropped_with_the_layer_it_normalises():
    model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)  # any model: homogeneous uses no depth
    strategy = FedLPStrategy(small_state(0), model=model, p=0.5)
    assert pruning_units(strategy.layers) == [["blocks.0.conv", "blocks.0.bn"], ["head.fc"]]
    masks = [set(strategy.keep_mask(r, n)) for r in range(1, 30) for n in range(5)]
    assert all(("blocks.0.conv" in m) == ("blocks.0.bn" in m) for m in masks)
    assert {frozenset(m) for m in masks} == {frozenset(), frozenset({"head.fc"}), frozenset({"blocks.0.conv", "blocks.0.bn"}),
                                             frozenset({"blocks.0.conv", "blocks.0.bn", "head.fc"})}


def test_dropped_layers_are_not_uploaded_and_get_no_gradient(fedlp_runtime, fedlp_initial):
    strategy = _fedlp(fedlp_initial, fedlp_runtime, layer_p=["blocks.0.conv=0.0", "head.fc2=0.0"], p=1.0, freeze_dropped=True)
    _configure(strategy, [4], 1)
    message = _train_message(strategy, 4)
    reply = _client_reply(fedlp_runtime, fedlp_train, message)
    sent = from_arrayrecord(reply.content["arrays"])
    assert strategy.layers.layers_in(sent) == ["blocks.1.conv", "head.fc1"]
    # frozen layers: the client's kept model still holds the downloaded values
    # and fewer FLOPs were spent than full training
    metrics = reply.content["metrics"]
    assert metrics["train-flops"] < metrics["train-flops-full"]
    strategy.aggregate_train(1, [reply])
    assert not strategy.rejections
    for key in strategy.layers.keys_of(["blocks.0.conv", "head.fc2"]):
        assert np.array_equal(strategy.global_state[key], fedlp_initial[key])
    assert not np.array_equal(strategy.global_state["head.fc1.weight"], fedlp_initial["head.fc1.weight"])


def test_freeze_dropped_false_trains_every_layer_but_uploads_kept_ones(fedlp_runtime, fedlp_initial):
    strategy = _fedlp(fedlp_initial, fedlp_runtime, layer_p=["head.fc2=0.0"], p=1.0, freeze_dropped=False)
    _configure(strategy, [4], 1)
    reply = _client_reply(fedlp_runtime, fedlp_train, _train_message(strategy, 4))
    assert "head.fc2.weight" not in reply.content["arrays"]
    metrics = reply.content["metrics"]
    assert metrics["train-flops"] == metrics["train-flops-full"]


def test_reply_carrying_a_dropped_layer_is_rejected(fedlp_runtime, fedlp_initial):
    strategy = _fedlp(fedlp_initial, fedlp_runtime, layer_p=["head.fc2=0.0"], p=1.0)
    _configure(strategy, [1], 1)
    metrics = strategy.aggregate_train(1, [make_reply(1, _noisy(fedlp_initial, 1), to=strategy)])
    assert metrics is None and "not requested" in strategy.rejections[0].reason
    assert states_equal(strategy.global_state, fedlp_initial)


def test_bad_config_names_the_field(fedlp_runtime, fedlp_initial):
    with pytest.raises(ConfigError, match="strategy.p"):
        _build([*FEDLP_OVERRIDES, "strategy.p=1.5"])
    with pytest.raises(ConfigError, match="strategy.layer_p"):
        _build([*FEDLP_OVERRIDES, "strategy.layer_p=['head.fc2=2']"])
    with pytest.raises(ConfigError, match="strategy.layer_p"):
        _build([*FEDLP_OVERRIDES, "strategy.layer_p=['head.fc2']"])
    with pytest.raises(ConfigError, match="strategy.scheme"):
        _build([*FEDLP_OVERRIDES, "strategy.scheme=deep"])
    # a BatchNorm is kept or dropped with its conv: a rate of its own would be ignored
    with pytest.raises(ConfigError, match=r"strategy.layer_p.*blocks.0.bn1.*blocks.0.conv1"):
        _build(["strategy=fedlp", "dataset=digits", "model=cnn6", "dataset.image_size=32", "strategy.layer_p=['blocks.0.bn1=0.3']"])
    assert _build(["strategy=fedlp", "dataset=digits", "model=cnn6", "dataset.image_size=32",
                   "strategy.layer_p=['blocks.0.conv1=0.3']"]).keep_rate["blocks.0.conv1"] == 0.3
    # the constructor names its own argument
    with pytest.raises(ParameterError, match="layer_p") as err:
        _fedlp(fedlp_initial, fedlp_runtime, layer_p=["nope=0.0"])
    assert err.value.name == "layer_p"
    with pytest.raises(ParameterError, match="level_preference") as err:
        _fedlp(fedlp_initial, fedlp_runtime, level_preference=[0.5, 0.2, 0.3])
    assert err.value.name == "level_preference"


@pytest.mark.slow
def test_layer_with_p_zero_never_travels_up_nor_changes(tmp_path):
    _simulate(tmp_path, *FEDLP_OVERRIDES, "federation.rounds=3", "strategy.p=0.6", "strategy.freeze_dropped=true",
              "strategy.layer_p=['head.fc2=0.0']")
    records = RunDirectory(tmp_path / "run").read_metrics()
    assert all("head.fc2" not in r["layer_bytes_up"] for r in records)
    assert all(r["layer_bytes_down"]["head.fc2"] > 0 for r in records)  # downloads stay full
    assert any(r["layer_bytes_up"] for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bytes_up"] < 0.8 * summary["fedavg_bytes_up"]
    assert all(r["strategy"]["train_flops"] < r["strategy"]["fedavg_train_flops"] for r in records)


# ---------------------------------------------------------- heterogeneous
def _hetero(fedlp_initial, fedlp_runtime, **kwargs):
    return _fedlp(fedlp_initial, fedlp_runtime, scheme="heterogeneous", **kwargs)  # heads initialised from the model and seed


def test_level_c_messages_carry_only_its_layers_both_ways(fedlp_runtime, fedlp_initial):
    strategy = _hetero(fedlp_initial, fedlp_runtime, level_preference=[1.0, 0.0])
    assert states_equal(strategy.level_heads, _heads(fedlp_runtime))  # the heads clients initialise (seed 0)
    _configure(strategy, [2], 1)
    down = _train_message(strategy, 2)
    expected_keys = {*strategy.layers.keys_of(["blocks.0.conv"]), "level-heads.1.weight", "level-heads.1.bias"}
    assert set(down.content["arrays"].keys()) == expected_keys
    reply = _client_reply(fedlp_runtime, fedlp_train, down)
    assert set(reply.content["arrays"].keys()) == expected_keys
    assert reply.content["metrics"]["train-flops"] < reply.content["metrics"]["train-flops-full"]
    strategy.aggregate_train(1, [reply])
    assert not strategy.rejections
    assert states_equal(select(strategy.global_state, strategy.layers, ["blocks.1.conv", "head.fc1", "head.fc2"]),
                        select(fedlp_initial, strategy.layers, ["blocks.1.conv", "head.fc1", "head.fc2"]))
    assert not np.array_equal(strategy.level_heads["level-heads.1.weight"], _heads(fedlp_runtime)["level-heads.1.weight"])


def test_full_depth_messages_carry_the_model_and_no_level_head(fedlp_runtime, fedlp_initial):
    strategy = _hetero(fedlp_initial, fedlp_runtime, level_preference=[0.0, 1.0])
    _configure(strategy, [2], 1)
    down = _train_message(strategy, 2)
    reply = _client_reply(fedlp_runtime, fedlp_train, down)
    assert set(down.content["arrays"].keys()) == set(reply.content["arrays"].keys()) == set(fedlp_initial)


def test_a_capped_node_returns_no_head_it_was_not_sent_and_the_server_learns_its_level(fedlp_runtime, fedlp_initial):
    """Planned at level 2, capped at 1: the level-1 head was not sent, so the node trains
    its block under a fresh head but returns the block only; the shared head stays."""
    strategy = _hetero(fedlp_initial, fedlp_runtime, level_preference=[0.0, 1.0])
    _configure(strategy, [2], 1)
    reply = _client_reply(fedlp_runtime, fedlp_train, _train_message(strategy, 2), node_config={"depth-level": 1})
    assert {k.rsplit(".", 1)[0] for k in reply.content["arrays"].keys()} == {"blocks.0.conv"}
    assert reply.content["metrics"]["depth-level"] == 1
    heads_before = {k: v.copy() for k, v in strategy.level_heads.items()}
    strategy.aggregate_train(1, [reply])
    assert not strategy.rejections and strategy.level_of(strategy.client_id(2)) == 1
    assert states_equal(strategy.level_heads, heads_before)
    assert not np.array_equal(strategy.global_state["blocks.0.conv.weight"], fedlp_initial["blocks.0.conv.weight"])
    # the next round sends the level-1 head, which then comes back trained and is averaged in
    _configure(strategy, [2], 2)
    assert strategy.plans[2].send == strategy.plans[2].request == ["blocks.0.conv", "level-heads.1"]
    reply = _client_reply(fedlp_runtime, fedlp_train, _train_message(strategy, 2), node_config={"depth-level": 1})
    strategy.aggregate_train(2, [reply])
    assert not strategy.rejections
    assert not np.array_equal(strategy.level_heads["level-heads.1.weight"], heads_before["level-heads.1.weight"])


def test_a_level_head_the_node_was_not_sent_is_refused(fedlp_runtime, fedlp_initial):
    """A reply at a lower level than planned carrying that level's head (which the
    node cannot have received) is refused: the head would be a fresh one."""
    strategy = _hetero(fedlp_initial, fedlp_runtime, level_preference=[0.0, 1.0])
    _configure(strategy, [2], 1)
    fresh = _heads(fedlp_runtime)
    state = {**select(_noisy(fedlp_initial, 1), strategy.layers, ["blocks.0.conv"]), **_noisy(fresh, 2)}
    heads_before = {k: v.copy() for k, v in strategy.level_heads.items()}
    assert strategy.aggregate_train(1, [make_reply(2, state, metrics={"depth-level": 1}, to=strategy)]) is None
    assert len(strategy.rejections) == 1 and "level-heads.1" in strategy.rejections[0].reason
    assert states_equal(strategy.level_heads, heads_before) and states_equal(strategy.global_state, fedlp_initial)
    assert strategy.level_of(2) == 2


@pytest.mark.parametrize("scheme", ["homogeneous", "heterogeneous"])
def test_fedlp_clients_keep_their_model_only_when_the_server_says_so(fedlp_runtime, fedlp_initial, scheme):
    """FedLP sends every layer a node trains each round, so it asks nodes to keep nothing."""
    strategy = _fedlp(fedlp_initial, fedlp_runtime, scheme=scheme, level_preference=[1.0, 0.0])
    assert not strategy.client_keeps_model
    _configure(strategy, [3], 1)
    message = _train_message(strategy, 3)
    assert message.content["config"]["keep-model"] is False
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    fedlp_train(fedlp_runtime, message.content, context)
    assert load_local_model(context) is None
    message.content["config"]["keep-model"] = True
    fedlp_train(fedlp_runtime, message.content, context)
    assert load_local_model(context) is not None


def test_reply_with_layers_beyond_its_level_is_rejected(fedlp_runtime, fedlp_initial):
    strategy = _hetero(fedlp_initial, fedlp_runtime, level_preference=[1.0, 0.0])
    _configure(strategy, [1], 1)
    state = {**select(_noisy(fedlp_initial, 1), strategy.layers, ["blocks.0.conv", "blocks.1.conv"]), **_heads(fedlp_runtime)}
    state = {k: v for k, v in state.items() if not k.startswith("level-heads.2")}
    metrics = strategy.aggregate_train(1, [make_reply(1, state, metrics={"depth-level": 1}, to=strategy)])
    assert metrics is None and len(strategy.rejections) == 1
    assert states_equal(strategy.global_state, fedlp_initial)


def test_each_layer_is_averaged_over_its_holders(fedlp_runtime, fedlp_initial):
    """Hand-made: node 1 at level 1 (30 examples), nodes 2 and 3 at level 2 (10 and 20).

    The layers are filled with constants, far from the model's scale: the norm guard (which would
    refuse such a merged model) is off, this is about the arithmetic."""
    strategy = _hetero(fedlp_initial, fedlp_runtime, norm_factor=0)
    strategy.client_of = {1: 1, 2: 2, 3: 3}
    send_plans(strategy, 1, {
        1: NodePlan(send=strategy.level_layers(1), request=strategy.level_layers(1), config={"depth-level": 1}),
        2: NodePlan(send=strategy.level_layers(2), request=strategy.level_layers(2), config={"depth-level": 2}),
        3: NodePlan(send=strategy.level_layers(2), request=strategy.level_layers(2), config={"depth-level": 2}),
    })
    heads = _heads(fedlp_runtime)

    def filled(value, names):
        layers = strategy.all_layers
        source = {**fedlp_initial, **heads}
        return {k: np.full_like(source[k], value) for k in layers.keys_of(names)}

    replies = [
        make_reply(1, filled(1.0, strategy.level_layers(1)), 30, {"depth-level": 1}, to=strategy),
        make_reply(2, filled(2.0, strategy.level_layers(2)), 10, {"depth-level": 2}, to=strategy),
        make_reply(3, filled(5.0, strategy.level_layers(2)), 20, {"depth-level": 2}, to=strategy),
    ]
    strategy.aggregate_train(1, replies)
    assert not strategy.rejections
    g = strategy.global_state
    assert np.allclose(g["blocks.0.conv.weight"], (30 * 1 + 10 * 2 + 20 * 5) / 60)  # everyone holds block 0
    assert np.allclose(g["blocks.1.conv.weight"], (10 * 2 + 20 * 5) / 30)  # level 2 only
    assert np.allclose(g["head.fc2.weight"], 4.0)  # the model's head: full depth only
    assert np.allclose(strategy.level_heads["level-heads.1.weight"], 1.0)  # level-1 head: node 1 only
    assert strategy.round_record(1)["level_counts"] == {"1": 1, "2": 2}


def test_levels_are_stable_per_node_and_follow_the_preference(fedlp_runtime, fedlp_initial):
    strategy = _hetero(fedlp_initial, fedlp_runtime, level_preference=[0.25, 0.75], seed=4)
    levels = [strategy.level_of(n) for n in range(400)]
    assert levels == [strategy.level_of(n) for n in range(400)]
    assert abs(levels.count(2) / 400 - 0.75) < 0.07


def test_central_evaluation_reports_every_depth(fedlp_runtime, fedlp_initial):
    strategy = _hetero(fedlp_initial, fedlp_runtime)
    result = strategy.evaluate_central(central_evaluator(fedlp_runtime.cfg, fedlp_runtime.test_data))
    assert {"accuracy", "accuracy-depth-1", "accuracy-depth-2"} <= result.keys()
    assert result["accuracy-depth-2"] == result["accuracy"]
    assert 0.0 <= result["accuracy-depth-1"] <= 1.0


def test_checkpoint_round_trip(fedlp_runtime, fedlp_initial):
    strategy = _hetero(fedlp_initial, fedlp_runtime)
    strategy.node_levels = {7: 1}
    strategy.level_heads["level-heads.1.bias"][:] = 3.0
    state = strategy.state_dict()
    fresh = _hetero(fedlp_initial, fedlp_runtime)
    fresh.load_state_dict(state)
    assert fresh.level_of(7) == 1 and np.all(fresh.level_heads["level-heads.1.bias"] == 3.0)
    assert isinstance(state["level_heads"]["level-heads.1.bias"], np.ndarray)
    assert level_head_name(1) == "level-heads.1"


def test_a_bad_flop_count_is_refused_and_never_sticks_in_the_totals(fedlp_runtime, fedlp_initial):
    """Issue 24, item 7: one NaN (or absurd) ``train-flops`` would keep the run's total NaN for good."""
    fedlp = _fedlp(fedlp_initial, fedlp_runtime, p=1.0, seed=3)
    fedlp.client_of = {11: 0, 12: 1}
    totals = []
    for server_round, bad in ((1, float("nan")), (2, 1e308)):
        fedlp.configure_train(server_round, [11, 12])
        replies = [
            make_reply(node, _noisy(fedlp_initial, node), metrics={"train-flops": flops, "train-flops-full": 100.0}, to=fedlp)
            for node, flops in ((11, bad), (12, 50.0))
        ]
        fedlp.aggregate_train(server_round, replies)
        totals.append(fedlp.round_record(server_round)["total_train_flops"])
    assert totals == [50.0, 100.0]
    assert [r.node_id for r in fedlp.rejections] == [11, 11] and "train-flops" in fedlp.rejections[0].reason


def test_flop_totals_are_running_totals_and_the_checkpoint_keeps_one_round(fedlp_runtime, fedlp_initial):
    """Issue 25: the totals are kept, not re-summed over a per-round history that grows every round;
    the checkpoint holds the totals and the latest round's numbers only, and a restored strategy continues."""
    fedlp = _fedlp(fedlp_initial, fedlp_runtime, p=1.0, seed=3)
    fedlp.client_of = {11: 0, 12: 1}
    flops = {11: [10.0, 20.0, 30.0, 40.0], 12: [1.0, 2.0, 3.0, 4.0]}
    for server_round in range(1, 5):
        if server_round == 3:  # a resumed run: a fresh strategy from the checkpoint
            restored = _fedlp(fedlp_initial, fedlp_runtime, p=1.0, seed=3)
            restored.load_state_dict(copy.deepcopy(fedlp.state_dict()))
            restored.global_state, restored.client_of = fedlp.global_state, fedlp.client_of
            fedlp = restored
        fedlp.configure_train(server_round, [11, 12])
        replies = [
            make_reply(node, _noisy(fedlp_initial, node), metrics={
                "train-flops": flops[node][server_round - 1], "train-flops-full": 100.0}, to=fedlp)
            for node in (11, 12)
        ]
        fedlp.aggregate_train(server_round, replies)
        record = fedlp.round_record(server_round)
        assert record["train_flops"] == flops[11][server_round - 1] + flops[12][server_round - 1]
        assert record["total_train_flops"] == sum(flops[11][:server_round]) + sum(flops[12][:server_round])
        assert record["total_fedavg_train_flops"] == 200.0 * server_round
        assert list(fedlp.state_dict()["round_info"]) == [str(server_round)]
