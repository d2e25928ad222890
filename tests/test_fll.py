"""Federated layer-wise learning with depth dropout: stages, frozen blocks, traffic, memory."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict

from benchmarks.faults import push
from fedlayer.config import compose_config
from fedlayer.contrastive import augment_pair, nt_xent
from fedlayer.errors import ConfigError
from fedlayer.layers import (
    ModelLayers,
    select,
    states_equal,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.memory import LiveTensorMeter, measure_step, resident_tensors
from fedlayer.methods.client_half import ClientRuntime, load_local_model
from fedlayer.methods.fll import (
    MAX_STEP_FACTOR,
    OBJECTIVES,
    STEP_FACTOR,
    FLLStrategy,
    client_validation_seed,
    fll_evaluate,
    fll_train,
    linear_probe,
    train_stage,
    validation_split,
)
from fedlayer.models import build_model
from fedlayer.models.staged import StagedModel, StageSpec, stage_layer_names, stage_step_flops
from fedlayer.server.builder import build_strategy
from fedlayer.server.loop import FederatedRun, central_evaluator
from fedlayer.server.rundir import RunDirectory
from fedlayer.traffic.size import trained_model_bytes
from fedlayer.training import evaluate
from fedlayer.workload import load_workload
from tests.conftest import make_reply
from tests.inprocess import run_in_process

#: What ``train_stage`` tests train with (on top of ``_runtime``'s ``train.local_steps=2``).
TRAIN = "train.batch_size=16"


def _resnet(seed=0):
    return build_model("resnet20", input_shape=(1, 28, 28), num_classes=10, seed=seed)


def _strategy(model_name="cnn", **kwargs):
    model = build_model(model_name, input_shape=(1, 28, 28), num_classes=10, seed=0)
    state = torch_state_to_numpy(model.state_dict())
    strategy = FLLStrategy(state, model=model, min_train_nodes=1, **kwargs)
    strategy.client_of = {7: 0, 11: 1, 12: 2, 3: 3}  # the nodes the tests use, identified (7: the runtime's partition)
    return strategy


def _runtime(*overrides):
    cfg = compose_config(["dataset=mnist5k", "model=cnn", "strategy=fll", "train.local_steps=2", *overrides])
    return ClientRuntime(cfg=cfg, partition_id=0, num_partitions=5, data_path=None, device=torch.device("cpu"))


def _runtime_on(train_data, *overrides):
    """A runtime whose training split is ``train_data``."""
    runtime = _runtime(*overrides)
    runtime.data = (train_data, runtime.test_data)  # fills the cached property
    return runtime


def _simulate(tmp_path, *overrides):
    """A whole run in process (the real ServerApp loop and ClientApp); its summary."""
    return run_in_process(compose_config([f"output_dir={tmp_path}", "run_name=run", *overrides]))[1]


def _reply_to(sent: Message, content: RecordDict) -> Message:
    """``content`` as the reply of the node ``sent`` went to (``sent`` pushed first, as the round loop does)."""
    push([sent])
    return Message(content, reply_to=sent)


def test_stage_spec_groups_blocks_and_one_stage_is_end_to_end():
    spec = StageSpec(10, 3)
    assert spec.num_stages == 4
    assert [list(spec.blocks(s)) for s in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    whole = StageSpec(10, 10)
    assert whole.num_stages == 1 and list(whole.blocks(0)) == list(range(10)) and whole.is_last(0)
    with pytest.raises(ValueError):
        spec.blocks(4)


def test_global_state_holds_stage_heads_as_layers():
    strategy = _strategy("resnet20", blocks_per_stage=3)
    names = strategy.layers.names
    assert [n for n in names if n.startswith("stage_heads")] == ["stage_heads.0", "stage_heads.1", "stage_heads.2"]
    # head_pool=2: a stage head sees C x 2 x 2 features of its stage's last block
    assert strategy.global_state["stage_heads.0.weight"].shape == (10, 16 * 4)
    assert strategy.global_state["stage_heads.2.weight"].shape == (10, 64 * 4)
    assert stage_layer_names(strategy.spec, names, 3) == ["blocks.9.conv1", "blocks.9.bn1", "blocks.9.conv2", "blocks.9.bn2", "head.fc"]
    # the same seed gives the clients the same stage heads as the server
    client = StagedModel(_resnet(), StageSpec(10, 3), 2, seed=0)
    assert states_equal(torch_state_to_numpy(client.state_dict()), strategy.global_state)


def test_stages_advance_every_rounds_per_stage_and_frozen_blocks_are_sent_once():
    strategy = _strategy("cnn", rounds_per_stage=2)
    nodes = [11, 12]
    stages, sends = [], []
    for server_round in range(1, 6):
        messages = list(strategy.configure_train(server_round, nodes))
        stages.append(strategy.stage)
        sends.append({m.metadata.dst_node_id: sorted(m.content["arrays"].keys()) for m in messages})
        assert all(int(m.content["config"]["fll-stage"]) == strategy.stage for m in messages)
        # every node answers with its stage layers (values unchanged)
        replies = [
            _reply_to(m, RecordDict({
                "arrays": to_arrayrecord(select(strategy.global_state, strategy.layers, strategy.plans[m.metadata.dst_node_id].request)),
                "metrics": MetricRecord({"num-examples": 5, "peak-train-memory-bytes": 100.0 * server_round}),
            }))
            for m in messages
        ]
        strategy.aggregate_train(server_round, replies)
        assert strategy.round_record(server_round)["peak-train-memory-bytes"] == 100.0 * server_round
    assert stages == [0, 0, 1, 1, 1]  # the last stage (cnn has 2 blocks) lasts to the end
    stage0 = ["blocks.0.conv.bias", "blocks.0.conv.weight", "stage_heads.0.bias", "stage_heads.0.weight"]
    stage1 = ["blocks.1.conv.bias", "blocks.1.conv.weight", "head.fc1.bias", "head.fc1.weight", "head.fc2.bias", "head.fc2.weight"]
    assert sends[0][11] == sends[1][11] == stage0
    assert sends[2][11] == sorted(["blocks.0.conv.bias", "blocks.0.conv.weight", *stage1])  # frozen block once
    assert sends[3][11] == sends[4][11] == stage1
    # state needed to resume is JSON-serialisable and restores the schedule
    saved = json.loads(json.dumps(strategy.state_dict()))
    fresh = _strategy("cnn", rounds_per_stage=2)
    fresh.load_state_dict(saved)
    assert fresh.stage == 1 and fresh.delivered == strategy.delivered


def test_frozen_block_is_resent_to_a_node_whose_reply_never_arrived():
    strategy = _strategy("cnn", rounds_per_stage=1)
    nodes = [11, 12]
    strategy.configure_train(1, nodes)
    messages = list(strategy.configure_train(2, nodes))
    ok = next(m for m in messages if m.metadata.dst_node_id == 11)
    reply = _reply_to(ok, RecordDict({
        "arrays": to_arrayrecord(select(strategy.global_state, strategy.layers, strategy.plans[11].request)),
        "metrics": MetricRecord({"num-examples": 5}),
    }))
    strategy.aggregate_train(2, [reply])  # node 12 never answered
    strategy.configure_train(3, nodes)
    assert "blocks.0.conv" not in strategy.plans[11].send
    assert "blocks.0.conv" in strategy.plans[12].send


def test_bad_replies_are_rejected_and_leave_the_model_alone():
    strategy = _strategy("cnn", rounds_per_stage=1)
    nodes = [11]
    for server_round in (1, 2):
        (message,) = strategy.configure_train(server_round, nodes)
    before = {k: v.copy() for k, v in strategy.global_state.items()}
    # a frozen block was not requested: the whole reply is refused
    sneaky = select(strategy.global_state, strategy.layers, ["blocks.0.conv", *strategy.plans[11].request])
    sneaky = {k: v + 1 for k, v in sneaky.items()}
    strategy.aggregate_train(2, [_reply_to(message, RecordDict({"arrays": to_arrayrecord(sneaky), "metrics": MetricRecord({"num-examples": 5})}))])
    assert len(strategy.rejections) == 1 and "not requested" in strategy.rejections[0].reason
    assert states_equal(strategy.global_state, before) and strategy.delivered == {}


def test_a_node_that_lost_its_frozen_blocks_refuses_and_gets_them_again():
    runtime = _runtime()
    strategy = _strategy("cnn", rounds_per_stage=1)
    nodes = [7]
    (first,) = strategy.configure_train(1, nodes)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    strategy.aggregate_train(1, [_reply_to(first, fll_train(runtime, first.content, context))])
    (second,) = strategy.configure_train(2, nodes)
    strategy.aggregate_train(2, [_reply_to(second, fll_train(runtime, second.content, context))])
    assert strategy.delivered == {0: {"blocks.0.conv"}}  # by client id
    (third,) = strategy.configure_train(3, nodes)
    assert "blocks.0.conv" not in strategy.plans[7].send
    restarted = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})  # state lost
    with pytest.raises(RuntimeError, match=r"no copy of the frozen layers \['blocks.0.conv'\]"):
        fll_train(runtime, third.content, restarted)
    error = Message(Error(code=0, reason="ClientApp raised: no copy of the frozen layers"), reply_to=push([third])[0])
    before = {k: v.copy() for k, v in strategy.global_state.items()}
    strategy.aggregate_train(3, [error])
    assert states_equal(strategy.global_state, before) and strategy.delivered == {}
    strategy.configure_train(4, nodes)
    assert "blocks.0.conv" in strategy.plans[7].send  # sent again


def test_client_changes_and_returns_only_the_stage_layers():
    runtime = _runtime()
    strategy = _strategy("cnn", rounds_per_stage=1)
    node = 7
    context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
    nodes = [node]
    (first,) = strategy.configure_train(1, nodes)
    strategy.aggregate_train(1, [_reply_to(first, fll_train(runtime, first.content, context))])
    kept_after_stage0 = load_local_model(context)
    (second,) = strategy.configure_train(2, nodes)
    assert strategy.stage == 1
    global_before = {k: v.copy() for k, v in strategy.global_state.items()}
    reply = fll_train(runtime, second.content, context)
    stage1 = strategy.stage_layers(1)
    assert sorted(reply["arrays"].keys()) == sorted(strategy.layers.keys_of(stage1))
    kept = load_local_model(context)
    changed = {strategy.layers.layer_of(k) for k in kept if not np.array_equal(kept[k], kept_after_stage0[k])}
    # the frozen block 0 changed only by being replaced with the global one; nothing else moved
    assert changed - set(stage1) <= {"blocks.0.conv"}
    for key in strategy.layers.keys_of(["blocks.0.conv"]):
        assert np.array_equal(kept[key], global_before[key])
    assert all(not np.array_equal(kept[k], global_before[k]) for k in strategy.layers.keys_of(stage1) if k.endswith("weight"))
    assert np.array_equal(kept["stage_heads.0.weight"], kept_after_stage0["stage_heads.0.weight"])
    metrics = reply["metrics"]
    assert metrics["fll-stage"] == 1 and metrics["peak-train-memory-bytes"] > 0
    strategy.aggregate_train(2, [_reply_to(second, reply)])
    moved = {strategy.layers.layer_of(k) for k in global_before if not np.array_equal(global_before[k], strategy.global_state[k])}
    assert moved == set(stage1)


@pytest.mark.parametrize(
    ("stage", "peak_ratio"), [(1, 0.8), (4, 1.0)]  # a full-resolution block; a downsampling one (projection shortcut)
)
def test_checkpointed_stage_trains_bitwise_the_same_with_a_lower_peak(stage, peak_ratio):
    """Activation checkpointing recomputes conv + BN outputs in backward: the trained
    weights and BatchNorm running statistics are bitwise those of plain training."""
    runtime = _runtime(TRAIN, "model=resnet20")
    results = {}
    for checkpoint in (False, True):
        net = StagedModel(_resnet(), StageSpec(10, 1), 2, seed=0, checkpoint=checkpoint)
        metrics = train_stage(net, stage, runtime, seed=3, p_drop=0.0, objective="supervised", temperature=0.5)
        results[checkpoint] = (torch_state_to_numpy(net.state_dict()), metrics)
    (plain, plain_metrics), (checkpointed, checkpointed_metrics) = results[False], results[True]
    assert states_equal(plain, checkpointed)
    assert checkpointed_metrics["train-loss"] == plain_metrics["train-loss"]
    assert checkpointed_metrics["peak-train-memory-bytes"] < peak_ratio * plain_metrics["peak-train-memory-bytes"]


def test_conv_stage_heads_are_trained_layers_of_their_stage():
    model = _resnet()
    net = StagedModel(model, StageSpec(10, 1), 2, seed=0, head="conv")
    names = ModelLayers.from_state(torch_state_to_numpy(net.state_dict())).names
    assert stage_layer_names(net.spec, names, 1) == ["blocks.1.conv1", "blocks.1.bn1", "blocks.1.conv2", "blocks.1.bn2",
                                                     "stage_heads.1.conv", "stage_heads.1.bn", "stage_heads.1.fc"]
    net.prepare(1)
    logits = net.forward_stage(torch.randn(4, 1, 28, 28), 1)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert net.stage_heads[1].conv.weight.grad is not None and net.stage_heads[0].conv.weight.grad is None
    # the head's convolution runs on the block output pooled to 8x8, whatever its size
    assert net.stage_heads[1].size == (8, 8) and net.stage_heads[8].size == (7, 7)


def test_equal_flops_gives_cheap_early_stages_more_steps_up_to_the_cap():
    strategy = _strategy("resnet20", stage_steps="equal_flops")
    flops = stage_step_flops(strategy.net)
    assert flops[:9] == sorted(flops[:9])  # a deeper stage runs a longer frozen prefix
    factors = strategy.step_factors
    assert factors[0] == MAX_STEP_FACTOR and factors[-1] == 1 and factors == sorted(factors, reverse=True)
    assert strategy.plan(1, 7).config[STEP_FACTOR] == MAX_STEP_FACTOR
    assert STEP_FACTOR not in _strategy("resnet20").plan(1, 7).config  # fixed: messages as before
    runtime = _runtime(TRAIN, "model=resnet20")
    net = StagedModel(_resnet(), StageSpec(10, 1), 2, seed=0)
    metrics = train_stage(net, 1, runtime, seed=0, p_drop=0.0, objective="supervised", temperature=0.5, step_factor=3)
    assert metrics["local-steps"] == 3 * runtime.cfg.train.local_steps


def test_frozen_blocks_run_without_autograd_graph():
    net = StagedModel(_resnet(), StageSpec(10, 1), 2, seed=0)
    stage = 4
    params = net.prepare(stage)
    seen = {}
    for index, block in enumerate(net.blocks):
        block.register_forward_hook(lambda mod, inp, out, index=index: seen.__setitem__(index, out))
    logits = net.forward_stage(torch.randn(8, 1, 28, 28), stage)
    assert sorted(seen) == [0, 1, 2, 3, 4]  # later blocks do not run
    for index in range(stage):
        assert not seen[index].requires_grad and seen[index].grad_fn is None
    assert seen[stage].grad_fn is not None
    logits.sum().backward()
    assert all(p.grad is None for b in range(stage) for p in net.blocks[b].parameters())
    assert {id(p) for p in params} == {id(p) for m in net.active_modules(stage) for p in m.parameters()}
    assert all(p.grad is not None for p in params)
    # frozen BatchNorms use (and keep) their running statistics
    assert not net.blocks[0].training and net.blocks[stage].training


def test_p_drop_zero_forward_equals_plain_prefix_forward():
    model = _resnet()
    net = StagedModel(model, StageSpec(10, 2), 2, seed=0)
    net.eval()
    x = torch.randn(4, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    for stage in range(net.spec.num_stages):
        skip = net.sample_skips(stage, 0.0, generator)
        assert skip == set()
        expected = model.forward_features(x, net.spec.blocks(stage).stop)
        assert torch.equal(net.features(x, stage, skip), expected)
    assert torch.equal(net.forward_stage(x, net.spec.num_stages - 1), model(x))


def test_depth_dropout_skips_only_frozen_shape_preserving_blocks():
    net = StagedModel(_resnet(), StageSpec(10, 1), 2, seed=0)
    generator = torch.Generator().manual_seed(1)
    stage = 9
    identity = {b for b in range(stage) if net.blocks[b].is_identity_compatible}
    assert identity == {1, 2, 3, 5, 6, 8}  # not the stem, not the downsampling blocks 4 and 7
    draws = [net.sample_skips(stage, 0.5, generator) for _ in range(200)]
    assert all(d <= identity for d in draws)
    rate = np.mean([len(d) for d in draws]) / len(identity)
    assert 0.4 < rate < 0.6
    # a skipped block is replaced by identity
    net.eval()
    x = torch.randn(2, 1, 28, 28)
    out = net.features(x, 3, skip={1, 2})
    expected = net.blocks[3](net.blocks[0](x))
    assert torch.equal(out, expected)


def test_meter_counts_live_bytes_and_frees():
    meter = LiveTensorMeter()
    with meter:
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # 8000 B live
        del a  # 4000 B
        c = torch.ones(250).view(5, 50)  # views share one storage: 5000 B
    assert meter.peak == 8000 and meter.current == 5000
    del b, c
    assert meter.current == 0


def test_layerwise_step_needs_much_less_memory_than_end_to_end():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    peaks = {}
    for blocks_per_stage in (10, 1):
        net = StagedModel(_resnet(), StageSpec(10, blocks_per_stage), 2, seed=0)
        stage = 0 if blocks_per_stage == 10 else 1
        optimizer = torch.optim.SGD(net.prepare(stage), lr=0.1)
        running = [*net.blocks[: net.spec.blocks(stage).stop], net.stage_head(stage)]

        def step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net.forward_stage(x, stage), y).backward()
            optimizer.step()

        _, memory = measure_step(step, resident_tensors(running, x, y), torch.device("cpu"))
        peaks[blocks_per_stage] = memory["peak-train-memory-bytes"]
    activation = 32 * 16 * 28 * 28 * 4  # one full-resolution feature map of the batch
    assert peaks[1] > 2 * activation  # saved activations of block 1's two convs are counted
    # ResNet-20 keeps 3 of its 10 blocks at full resolution, so one full-resolution
    # block needs about a third of the end-to-end memory
    assert peaks[10] > 3 * peaks[1]


def test_train_stage_reports_memory_and_respects_frozen_blocks():
    net = StagedModel(_resnet(), StageSpec(10, 1), 2, seed=0)
    before = torch_state_to_numpy(net.state_dict())
    runtime = _runtime(TRAIN)
    metrics = train_stage(net, 5, runtime, seed=3, p_drop=0.5, objective="supervised", temperature=0.5)
    after = torch_state_to_numpy(net.state_dict())
    layers = ModelLayers.from_state(after)
    changed = {layers.layer_of(k) for k in after if not np.array_equal(after[k], before[k])}
    assert changed == set(stage_layer_names(net.spec, layers.names, 5))
    assert all(np.array_equal(after[k], before[k]) for k in after if k.startswith(("blocks.0.", "blocks.4.", "blocks.6.", "head.")))
    assert metrics["peak-train-memory-bytes"] > 0 and metrics["local-steps"] == 2


def test_depth_dropout_recalibrates_the_stage_batch_norm_on_full_depth_inputs():
    """Trained with most frozen blocks skipped, the stage's BatchNorm ends with the
    statistics of full-depth inputs (what evaluation runs), not of the shortened paths."""
    data = _runtime().train_data.subset(np.arange(32))  # two batches of 16: the running mean is the data mean
    net = StagedModel(_resnet(), StageSpec(10, 1), 2, seed=0)
    train_stage(net, 3, _runtime_on(data, TRAIN), seed=3, p_drop=0.95, objective="supervised", temperature=0.5)
    block = net.blocks[3]
    with torch.no_grad():
        full = block.conv1(net.features(torch.from_numpy(data.x), 2))  # frozen blocks 0-2, no skip
        shortened = block.conv1(net.blocks[0](torch.from_numpy(data.x)))  # blocks 1 and 2 skipped
    expected = full.mean(dim=(0, 2, 3))
    assert torch.allclose(block.bn1.running_mean, expected, atol=1e-5)
    assert not torch.allclose(block.bn1.running_mean, shortened.mean(dim=(0, 2, 3)), atol=1e-3)


def test_contrastive_objective():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    first, second = augment_pair(x, generator)
    assert first.shape == x.shape and not torch.equal(first, second)
    z = torch.randn(8, 16)
    aligned = nt_xent(torch.cat([z, z]), 0.5)
    unrelated = nt_xent(torch.cat([z, torch.randn(8, 16)]), 0.5)
    assert aligned < unrelated
    runtime = _runtime("strategy.objective=contrastive", TRAIN)
    net = StagedModel(runtime.new_model(), StageSpec(2, 1), 2, seed=0)
    before = torch_state_to_numpy(net.state_dict())
    metrics = train_stage(net, 0, runtime, seed=0, p_drop=0.0, objective="contrastive", temperature=0.5)
    after = torch_state_to_numpy(net.state_dict())
    assert {k for k in after if not np.array_equal(after[k], before[k])} == {
        "blocks.0.conv.weight", "blocks.0.conv.bias", "stage_heads.0.weight", "stage_heads.0.bias"
    }
    assert np.isfinite(metrics["train-loss"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("strategy.rounds_per_stage=0", "strategy.rounds_per_stage"),
        ("strategy.blocks_per_stage=0", "strategy.blocks_per_stage"),
        ("strategy.p_drop=1.0", "strategy.p_drop"),
        ("strategy.objective=byol", "strategy.objective"),
        ("strategy.stage_rule=never", "strategy.stage_rule"),
        ("strategy.head_pool=-1", "strategy.head_pool"),
        ("strategy.stage_head=mlp", "strategy.stage_head"),
        ("strategy.stage_steps=more", "strategy.stage_steps"),
        ("strategy.checkpoint_activations=maybe", "strategy.checkpoint_activations"),
        ("strategy.validation_fraction=0", "strategy.validation_fraction"),
        ("strategy.validation_fraction=1.0", "strategy.validation_fraction"),
    ],
)
def test_bad_config_names_the_field(override, field):
    cfg = compose_config(["strategy=fll", override])  # strategy fields are checked when the strategy is built
    with pytest.raises(ConfigError) as err:
        build_strategy(cfg, load_workload(cfg, int(cfg.federation.num_clients)))
    assert err.value.field == field


@pytest.mark.slow
def test_fll_simulation_sends_frozen_blocks_once_and_records_memory(tmp_path):
    summary = _simulate(
        tmp_path, "strategy=fll", "strategy.rounds_per_stage=1", "model=cnn", "dataset=digits",
        "federation.num_clients=3", "federation.rounds=3", "train.local_steps=3",
    )
    records = RunDirectory(tmp_path / "run").read_metrics()
    assert [r["strategy"]["stage"] for r in records] == [0, 1, 1]
    assert all(r["replies"] == 3 and r["rejected"] == 0 for r in records)
    assert set(records[0]["layer_bytes_up"]) == {"blocks.0.conv", "stage_heads.0"}
    assert set(records[1]["layer_bytes_up"]) == set(records[2]["layer_bytes_up"]) == {"blocks.1.conv", "head.fc1", "head.fc2"}
    assert "blocks.0.conv" in records[1]["layer_bytes_down"] and "blocks.0.conv" not in records[2]["layer_bytes_down"]
    assert [r["strategy"]["frozen-layers-sent"] for r in records] == [0, 3, 0]
    assert all(r["strategy"]["peak-train-memory-bytes"] > 0 for r in records)
    assert records[0]["strategy"]["peak-train-memory-bytes"] < records[1]["strategy"]["peak-train-memory-bytes"]
    assert summary["bytes_total"] < summary["fedavg_bytes_total"]


@pytest.mark.slow
def test_fll_plateau_simulation_validates_on_held_out_training_data(tmp_path):
    _simulate(
        tmp_path, "strategy=fll", "strategy.stage_rule=plateau", "model=cnn", "dataset=digits",
        "federation.num_clients=3", "federation.rounds=3", "train.local_steps=3",
    )
    records = RunDirectory(tmp_path / "run").read_metrics()
    assert all(r["replies"] == 3 and r["rejected"] == 0 for r in records)
    assert all(0.0 <= r["strategy"]["val-accuracy"] <= 1.0 for r in records)
    assert all(r["train"]["val-examples"] > 0 for r in records)


def _validated_replies(strategy, messages, accuracy, examples=50.0):
    """Replies with the stage's layers unchanged and the given validation score."""
    return [
        _reply_to(m, RecordDict({
            "arrays": to_arrayrecord(select(strategy.global_state, strategy.layers, strategy.plans[m.metadata.dst_node_id].request)),
            "metrics": MetricRecord({"num-examples": 5, "val-accuracy": accuracy, "val-examples": examples}),
        }))
        for m in messages
    ]


@pytest.mark.parametrize(
    ("accuracies", "expected"),
    [([0.5, 0.5, 0.5, 0.5], [0, 0, 1, 1]), ([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0])],
)
def test_plateau_rule_ends_a_stage_when_validation_accuracy_stops_improving(accuracies, expected):
    stages = {}
    for rule in ("fixed", "plateau"):
        strategy = _strategy("cnn", rounds_per_stage=5, stage_rule=rule, plateau_patience=1)
        seen = []
        for server_round, accuracy in enumerate(accuracies, start=1):
            messages = strategy.configure_train(server_round, [11, 12])
            seen.append(strategy.stage)
            strategy.aggregate_train(server_round, _validated_replies(strategy, messages, accuracy))
            assert not strategy.rejections
        stages[rule] = seen
    assert stages == {"fixed": [0, 0, 0, 0], "plateau": expected}


def test_plateau_rule_never_looks_at_the_test_set():
    """Central evaluation only reports: a flat central test accuracy ends no stage."""
    runtime = _runtime()
    evaluator = central_evaluator(runtime.cfg, runtime.test_data)
    strategy = _strategy("cnn", rounds_per_stage=5, stage_rule="plateau", plateau_patience=1)
    for server_round in range(1, 5):
        strategy.configure_train(server_round, [11])
        strategy.evaluate_central(evaluator)  # no training: accuracy does not move
        assert strategy.stage == 0
    assert (strategy.best_accuracy, strategy.stale_evaluations) == (-1.0, 0)


def test_validation_accuracy_is_the_example_weighted_mean_of_the_replies():
    strategy = _strategy("cnn", stage_rule="plateau")
    messages = strategy.configure_train(1, [11, 12])
    replies = [*_validated_replies(strategy, messages[:1], 0.2, examples=30.0),
               *_validated_replies(strategy, messages[1:], 0.6, examples=10.0)]
    strategy.aggregate_train(1, replies)
    assert strategy.best_accuracy == pytest.approx(0.3)
    assert strategy.round_record(1)["val-accuracy"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "metrics",
    [{"val-accuracy": 1.5, "val-examples": 10.0}, {"val-accuracy": 0.5, "val-examples": -1.0},
     {"val-accuracy": 0.5, "val-examples": 2.5}, {"val-accuracy": float("nan"), "val-examples": 10.0}, {}],
)
def test_plateau_rule_refuses_a_reply_with_a_bad_validation_score(metrics):
    strategy = _strategy("cnn", stage_rule="plateau")
    (message,) = strategy.configure_train(1, [11])
    reply = _reply_to(message, RecordDict({
        "arrays": to_arrayrecord(select(strategy.global_state, strategy.layers, strategy.plans[11].request)),
        "metrics": MetricRecord({"num-examples": 5, **metrics}),
    }))
    assert strategy.aggregate_train(1, [reply]) is None
    assert len(strategy.rejections) == 1 and strategy.best_accuracy == -1.0


def test_validation_split_is_seeded_disjoint_and_the_same_every_round():
    data = _runtime().train_data
    train, held = validation_split(data, 0.1, seed=5)
    again_train, again_held = validation_split(data, 0.1, seed=5)
    assert len(held) == round(0.1 * len(data)) and len(train) + len(held) == len(data)
    assert np.array_equal(held.x, again_held.x) and np.array_equal(train.x, again_train.x)
    rows = {row.tobytes() for row in data.x.reshape(len(data), -1)}
    held_rows = {row.tobytes() for row in held.x.reshape(len(held), -1)}
    train_rows = {row.tobytes() for row in train.x.reshape(len(train), -1)}
    assert held_rows | train_rows == rows and not held_rows & train_rows
    assert not np.array_equal(validation_split(data, 0.1, seed=6)[1].x, held.x)
    tiny_train, tiny_held = validation_split(data.subset(np.arange(1)), 0.1, seed=5)
    assert (len(tiny_train), len(tiny_held)) == (1, 0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_plateau_clients_score_the_received_model_on_held_out_training_data(objective):
    runtime = _runtime(f"strategy.objective={objective}")
    strategy = _strategy("cnn", stage_rule="plateau", validation_fraction=0.2, objective=objective, probe_epochs=5)
    (message,) = strategy.configure_train(1, [7])
    assert message.content["config"]["fll-validation-fraction"] == 0.2
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    metrics = fll_train(runtime, message.content, context)["metrics"]
    held = round(0.2 * len(runtime.train_data))
    assert metrics["val-examples"] == held and metrics["num-examples"] == len(runtime.train_data) - held
    train, validation = validation_split(runtime.train_data, 0.2, client_validation_seed(runtime))
    net = StagedModel(runtime.new_model(), StageSpec(2, 1), 2, seed=0)  # the received (initial) model
    if objective == "supervised":
        expected = evaluate(net, validation, torch.device("cpu"), forward=lambda x: net.forward_stage(x, 0))["accuracy"]
    else:
        expected = linear_probe(net, 0, train, validation, epochs=5, seed=client_validation_seed(runtime))["accuracy"]
    assert metrics["val-accuracy"] == pytest.approx(expected)


def test_fixed_rule_clients_train_on_their_whole_split_and_report_no_validation():
    runtime = _runtime()
    strategy = _strategy("cnn")
    (message,) = strategy.configure_train(1, [7])
    assert "fll-validation-fraction" not in message.content["config"]
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    metrics = fll_train(runtime, message.content, context)["metrics"]
    assert metrics["num-examples"] == len(runtime.train_data) and "val-accuracy" not in metrics


def test_fll_clients_keep_their_model_only_when_the_server_says_so():
    """FLL needs the frozen blocks kept between rounds, so its server asks for it."""
    runtime = _runtime()
    strategy = _strategy("cnn")
    assert strategy.client_keeps_model
    (message,) = strategy.configure_train(1, [7])
    assert message.content["config"]["keep-model"] is True
    kept = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    fll_train(runtime, message.content, kept)
    assert load_local_model(kept) is not None
    message.content["config"]["keep-model"] = False
    not_kept = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    fll_train(runtime, message.content, not_kept)
    assert load_local_model(not_kept) is None


def test_federated_evaluation_scores_the_current_stage():
    runtime = _runtime()
    strategy = _strategy("cnn", fraction_evaluate=1.0)
    (message,) = strategy.configure_evaluate(1, [3])
    assert int(message.content["config"]["fll-stage"]) == 0
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    result = fll_evaluate(runtime, message.content, context)["metrics"]
    strategy.net.load_state_dict({k: torch.from_numpy(v) for k, v in strategy.global_state.items()})
    expected = evaluate(strategy.net, runtime.test_data, torch.device("cpu"), forward=lambda x: strategy.net.forward_stage(x, 0))
    assert result["accuracy"] == pytest.approx(expected["accuracy"]) and result["num-examples"] == len(runtime.test_data)


def test_an_absurd_memory_peak_is_refused_and_a_round_without_replies_reports_none():
    """Issue 24, items 7-8: the run's peak is a maximum, so a reported 1e308 would stay it for good."""
    strategy = _strategy("cnn", rounds_per_stage=5)
    strategy.client_of = {11: 0, 12: 1}

    def answer(node, peak):
        state = select(strategy.global_state, strategy.layers, strategy.plans[node].request)
        return make_reply(node, state, metrics={"peak-train-memory-bytes": peak}, to=strategy)

    strategy.configure_train(1, [11, 12])
    strategy.aggregate_train(1, [answer(11, 1e308), answer(12, 300.0)])
    assert [r.node_id for r in strategy.rejections] == [11] and "peak-train-memory-bytes" in strategy.rejections[0].reason
    record = strategy.round_record(1)
    assert record["peak-train-memory-bytes"] == record["peak-train-memory-bytes-run"] == 300.0
    strategy.configure_train(2, [11, 12])
    strategy.aggregate_train(2, [answer(11, float("nan"))])  # no accepted reply this round
    record = strategy.round_record(2)
    assert "peak-train-memory-bytes" not in record and record["peak-train-memory-bytes-run"] == 300.0


def test_fedavg_equivalent_is_the_configured_model_without_stage_heads(tmp_path):
    """Issue 24, item 8: FedAvg would send the configured model, not FLL's stage heads too."""
    cfg = compose_config(["strategy=fll", "dataset=mnist5k", "model=cnn", f"output_dir={tmp_path}"])
    run = FederatedRun(cfg)
    model = {k: v for k, v in run.strategy.global_state.items() if not k.startswith("stage_heads.")}
    assert len(model) < len(run.strategy.global_state)
    assert run.ledger.full_model_bytes == trained_model_bytes(model) < trained_model_bytes(run.strategy.global_state)
