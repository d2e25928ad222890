"""FedLAMA: the interval rule, phi=1 == FedAvg, partial messages, stateful clients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict

from benchmarks.faults import push, sent_message
from fedlayer.client.app import make_client_app
from fedlayer.config import compose_config
from fedlayer.errors import ConfigError
from fedlayer.layers import (
    ModelLayers,
    from_arrayrecord,
    merge,
    select,
    states_equal,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.methods import METHODS
from fedlayer.methods.client_half import ClientRuntime, load_local_model
from fedlayer.methods.fedavg import FedAvgStrategy
from fedlayer.methods.fedlama import (
    FedLAMAStrategy,
    fedlama_train,
    layer_discrepancy,
    long_interval_layers,
)
from fedlayer.methods.replies import validate_train_reply
from fedlayer.server.builder import build_strategy
from fedlayer.server.loop import FederatedRun
from fedlayer.server.rundir import RunDirectory
from fedlayer.traffic import ByteLedger
from fedlayer.traffic.size import object_tree_bytes
from fedlayer.training import train_steps
from fedlayer.workload import load_workload
from tests.conftest import make_reply, small_state
from tests.inprocess import FIRST_NODE_ID, InProcessGrid, run_in_process

ALL = ["blocks.0.conv", "blocks.0.bn", "head.fc"]


def _messages(strategy, server_round, node_ids):
    """Round ``server_round``'s train messages by node, pushed (the nodes identified: client id = node id)."""
    strategy.client_of.update({node: node for node in node_ids})
    return {m.metadata.dst_node_id: m for m in push(strategy.configure_train(server_round, list(node_ids)))}


def _arrays(message):
    return set(message.content["arrays"].keys()) if "arrays" in message.content else set()


# ------------------------------------------------------------------ interval rule
def test_interval_rule_hand_computed():
    # d*dim = 100, 200, 300, 1000 (total 1600); sorted by d: a, b, c, d.
    # k=1: delta 0.0625 < 1-0.25; k=2: 0.1875 < 0.5; k=3: 0.375 >= 0.25 -> a, b, c long.
    discrepancy = {"d": 10.0, "c": 3.0, "a": 1.0, "b": 2.0}
    sizes = {"a": 100, "b": 100, "c": 100, "d": 100}
    assert long_interval_layers(discrepancy, sizes) == ["a", "b", "c"]
    # One big quiet layer (a dense head): delta 100/450 = 0.22 >= 1 - 10000/10150 -> only it.
    assert long_interval_layers({"conv": 1.0, "fc1": 0.01, "fc2": 5.0}, {"conv": 100, "fc1": 10_000, "fc2": 50}) == ["fc1"]
    # The crossing layer is included: 'small' first (delta 5/1005 < 1 - 10/1010), then 'big' crosses.
    assert long_interval_layers({"big": 1.0, "small": 0.5}, {"big": 1000, "small": 10}) == ["small", "big"]
    # No discrepancy anywhere: every layer may wait.
    assert long_interval_layers({"x": 0.0, "y": 0.0}, {"x": 5, "y": 7}) == ["x", "y"]


def test_discrepancy_is_weighted_squared_norm_per_step_and_scalar():
    layers = ModelLayers.from_state(small_state())
    base = small_state(0)
    a = {k: v + np.float32(1.0) if v.dtype == np.float32 else v for k, v in base.items()}
    b = {k: v - np.float32(2.0) if v.dtype == np.float32 else v for k, v in base.items()}
    replies = [validate_train_reply(make_reply(1, a, 20), layers), validate_train_reply(make_reply(2, b, 10), layers)]
    average = select(base, layers, ["head.fc"])  # (20 a + 10 b) / 30 = base
    # ||u - a||^2 / dim = 1, ||u - b||^2 / dim = 4; p = 2/3, 1/3 -> 2; over 5 steps -> 0.4
    assert layer_discrepancy(average, replies, layers, "head.fc", steps=5) == pytest.approx(0.4, rel=1e-6)
    # bn: only its 8 trainable floats count (not the running statistics, not the int counter)
    average = select(base, layers, ["blocks.0.bn"])
    assert layer_discrepancy(average, replies, layers, "blocks.0.bn", steps=1) == pytest.approx(2.0, rel=1e-6)
    assert layer_discrepancy(average, [], layers, "blocks.0.bn", steps=1) is None


def test_discrepancy_and_dim_leave_batchnorm_statistics_out():
    """d_l and dim_l cover trainable parameters (the reference's trainable variables), not BatchNorm buffers."""
    layers = ModelLayers.from_state(small_state())
    base = small_state(0)
    average = select(base, layers, ["blocks.0.bn"])

    def replies(keys, shift):
        shifted = [{k: v + np.float32(sign * shift) if k in keys else v for k, v in base.items()} for sign in (1, -1)]
        return [validate_train_reply(make_reply(node, state, 10), layers) for node, state in enumerate(shifted, 1)]

    statistics = ["blocks.0.bn.running_mean", "blocks.0.bn.running_var"]
    assert layer_discrepancy(average, replies(statistics, 3.0), layers, "blocks.0.bn", steps=1) == 0.0
    # weight and bias off by +-1: ||u - x||^2 = 8 over dim_l = 8 (4 weights, 4 biases)
    affine = ["blocks.0.bn.weight", "blocks.0.bn.bias"]
    assert layer_discrepancy(average, replies(affine, 1.0), layers, "blocks.0.bn", steps=1) == pytest.approx(1.0, rel=1e-6)
    assert FedLAMAStrategy(base).sizes == {"blocks.0.conv": 40, "blocks.0.bn": 8, "head.fc": 51}


def test_layer_of_buffers_only_is_averaged_every_round_and_never_measured():
    base = small_state(0)
    rng = np.random.default_rng(5)
    statistics = {
        "blocks.1.norm.running_mean": rng.standard_normal(4).astype(np.float32),
        "blocks.1.norm.running_var": rng.random(4).astype(np.float32),
        "blocks.1.norm.num_batches_tracked": np.array(0, dtype=np.int64),
    }
    keys = list(base)
    initial = {**{k: base[k] for k in keys[:7]}, **statistics, **{k: base[k] for k in keys[7:]}}
    lama = FedLAMAStrategy(initial, phi=2, local_steps=1, min_round_to_adjust=0)
    assert lama.sizes["blocks.1.norm"] == 0
    for server_round in (1, 2):
        _messages(lama, server_round, [1, 2, 3])
        replies = _replies(lama, server_round)
        lama.aggregate_train(server_round, replies)
        states = [(from_arrayrecord(r.content["arrays"]), r.content["metrics"]["num-examples"]) for r in replies]
        mean = sum(s["blocks.1.norm.running_mean"] * n for s, n in states) / sum(n for _, n in states)
        np.testing.assert_allclose(lama.global_state["blocks.1.norm.running_mean"], mean, rtol=1e-5)
    record = lama.round_record(2)
    assert record["reassigned"] and record["discrepancy"]["blocks.1.norm"] is None
    assert lama.intervals["blocks.1.norm"] == 1 and max(lama.intervals.values()) == 2
    assert "blocks.1.norm" in lama.plan(3, 1).request and "blocks.1.norm" in lama.plan(4, 1).send


# ------------------------------------------------------------------ phi = 1 is FedAvg
def _replies(strategy, server_round):
    """Every planned node's reply to ``strategy``: its requested layers of the global model, moved at random."""
    replies = []
    for node, plan in strategy.plans.items():
        rng = np.random.default_rng(1000 * server_round + node)
        state = {
            k: (v + rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype == np.float32 else v + node
            for k, v in strategy.global_state.items()
        }
        replies.append(make_reply(node, select(state, strategy.layers, plan.request), num_examples=7 + 5 * node, to=strategy))
    return replies


def test_phi_one_reproduces_fedavg_bitwise():
    grid = list(range(1, 9))
    kwargs = {"fraction_train": 0.5, "seed": 3}
    fedavg = FedAvgStrategy(small_state(0), **kwargs)
    lama = FedLAMAStrategy(small_state(0), phi=1, local_steps=4, min_round_to_adjust=0, **kwargs)
    for server_round in range(1, 7):
        sent_a, sent_b = _messages(fedavg, server_round, grid), _messages(lama, server_round, grid)
        assert sent_a.keys() == sent_b.keys()  # same cohort each round
        assert all(_arrays(sent_b[n]) == set(lama.layers.keys) for n in sent_b)
        fedavg.aggregate_train(server_round, _replies(fedavg, server_round))
        lama.aggregate_train(server_round, _replies(lama, server_round))
        assert states_equal(fedavg.global_state, lama.global_state)
        assert lama.round_record(server_round)["synced"] == ALL
    assert set(lama.intervals.values()) == {1}
    assert all(d is not None and d > 0 for d in lama.discrepancy.values())


# ------------------------------------------------------------------ schedule, messages, ledger
def _lama_after_first_block(local_steps=10):
    """phi=2, adjusted after round 2 from replies where bn differs most, head.fc not at all."""
    lama = FedLAMAStrategy(small_state(0), phi=2, local_steps=local_steps, min_round_to_adjust=0, fraction_train=0.5, seed=1)
    grid = list(range(1, 11))
    offsets = {"blocks.0.conv": 1.0, "blocks.0.bn": np.sqrt(10.0), "head.fc": 0.0}
    cohorts = []
    for server_round in (1, 2):
        cohorts.append(sorted(_messages(lama, server_round, grid)))
        replies = []
        for i, node in enumerate(sorted(lama.plans)):
            sign = 1.0 if i % 2 == 0 else -1.0
            state = {
                k: (v + np.float32(sign * offsets[lama.layers.layer_of(k)])) if v.dtype == np.float32 else v
                for k, v in lama.global_state.items()
            }
            replies.append(make_reply(node, state, num_examples=10, to=lama))
        lama.aggregate_train(server_round, replies)
    return lama, grid, cohorts


def test_intervals_reassigned_from_discrepancies_at_block_end():
    lama, _, cohorts = _lama_after_first_block()
    assert cohorts[0] == cohorts[1] and len(cohorts[0]) == 5  # the cohort is kept for the block
    record = lama.round_record(2)
    # 5 clients, +e/-e alternating: u = base + e/5, so sum_i p_i ||u - x_i||^2 / dim = 24/25 e^2; tau_l = 10 steps
    assert record["discrepancy"]["blocks.0.conv"] == pytest.approx(0.96 * 1.0 / 10, rel=1e-5)
    assert record["discrepancy"]["blocks.0.bn"] == pytest.approx(0.96 * 10.0 / 10, rel=1e-5)
    assert record["discrepancy"]["head.fc"] == pytest.approx(0.0, abs=1e-12)
    # sorted: head.fc (0), conv (0.096, 40 floats), bn (0.96, 16 floats): after conv delta 40/(40+160) = 0.2
    # >= 1 - 91/107 = 0.15, so head.fc and conv get phi, bn stays at 1
    assert record["reassigned"] and record["intervals"] == {name: 1 for name in ALL}
    assert lama.intervals == {"blocks.0.conv": 2, "blocks.0.bn": 1, "head.fc": 2}


def test_not_due_layer_is_absent_both_ways_and_in_the_ledger():
    lama, grid, _ = _lama_after_first_block()
    ledger = ByteLedger(lama.layers, object_tree_bytes(to_arrayrecord(lama.global_state)))
    long_keys = set(lama.layers.keys_of(["blocks.0.conv", "head.fc"]))
    bn_keys = set(lama.layers.keys_of(["blocks.0.bn"]))

    # Round 3 opens a block: a new cohort gets every layer, but only bn comes back.
    sent = _messages(lama, 3, grid)
    assert all(_arrays(m) == set(lama.layers.keys) for m in sent.values())
    assert all(list(m.content["config"]["request"]) == ["blocks.0.bn"] for m in sent.values())
    for message in sent.values():
        ledger.record_down(3, message)
    before = {k: v.copy() for k, v in lama.global_state.items()}
    nodes = sorted(sent)
    # A reply carrying a layer that is not due is rejected and changes nothing.
    lama.aggregate_train(3, [make_reply(nodes[0], select(lama.global_state, lama.layers, ALL), to=lama)])
    assert states_equal(lama.global_state, before) and "not requested" in lama.rejections[-1].reason
    replies = [make_reply(n, select({k: v + 1 for k, v in lama.global_state.items()}, lama.layers, ["blocks.0.bn"]), to=lama) for n in nodes]
    for reply in replies:
        ledger.record_up(3, reply)
    lama.aggregate_train(3, replies)
    assert all(np.array_equal(lama.global_state[k], before[k]) for k in long_keys)
    assert lama.round_record(3)["synced"] == ["blocks.0.bn"]

    # Round 4 closes it: only bn goes down, every layer comes back.
    sent = _messages(lama, 4, grid)
    assert sorted(sent) == nodes
    assert all(_arrays(m) == bn_keys for m in sent.values())
    assert all(list(m.content["config"]["request"]) == ALL for m in sent.values())
    for message in sent.values():
        ledger.record_down(4, message)
    for n in nodes:
        ledger.record_up(4, make_reply(n, lama.global_state))

    r3, r4 = ledger.rounds[3], ledger.rounds[4]
    assert set(r3.layer_bytes_down) == set(ALL) and set(r3.layer_bytes_up) == {"blocks.0.bn"}
    assert set(r4.layer_bytes_down) == {"blocks.0.bn"} and set(r4.layer_bytes_up) == set(ALL)
    assert r3.bytes_up < r3.fedavg_bytes_up and r4.bytes_down < r4.fedavg_bytes_down


def test_checkpoint_round_trip_keeps_schedule_and_cohort():
    lama, grid, _ = _lama_after_first_block()
    _messages(lama, 3, grid)
    state = json.loads(json.dumps(lama.state_dict()))
    restored = FedLAMAStrategy(small_state(0), phi=2, local_steps=10, min_round_to_adjust=0, fraction_train=0.5, seed=1)
    restored.load_state_dict(state)
    assert restored.intervals == lama.intervals and restored.cohort == lama.cohort
    assert restored.discrepancy == lama.discrepancy
    assert sorted(_messages(restored, 4, grid)) == sorted(_messages(lama, 4, grid))


def test_config_checks_name_the_field():
    # one FedLAMA round is train.local_steps steps: tau' comes from there, not from a strategy field of its own
    cfg = compose_config(["strategy=fedlama", "dataset=digits", "train.local_steps=10"])
    assert "tau_prime" not in cfg.strategy
    assert build_strategy(cfg, load_workload(cfg, int(cfg.federation.num_clients))).tau_prime == 10
    # the strategy's own ranges are checked when the server builds it
    for overrides, field in (
        (["strategy.phi=0"], "strategy.phi"),
        (["strategy.min_round_to_adjust=-1"], "strategy.min_round_to_adjust"),
        (["+strategy.local_steps=3"], "strategy.local_steps"),  # set by train.local_steps, not by the strategy
    ):
        cfg = compose_config(["strategy=fedlama", "dataset=digits", *overrides])
        with pytest.raises(ConfigError) as err:
            build_strategy(cfg, load_workload(cfg, int(cfg.federation.num_clients)))
        assert err.value.field == field


def _error_reply(node: int, strategy=None) -> Message:
    """What the server pulls when a node's ClientApp raised (answering ``strategy``'s train message to it, if given)."""
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) if strategy is None else sent_message(strategy, node)
    return Message(Error(code=0, reason="RuntimeError: FedLAMA: this node holds no model of its own"), reply_to=sent)


def test_a_node_whose_reply_is_refused_gets_every_layer_next_time():
    lama = FedLAMAStrategy(small_state(0), phi=4, local_steps=1)
    lama.intervals["head.fc"] = 4
    every, partial = set(lama.layers.keys), set(lama.layers.keys_of(["blocks.0.conv", "blocks.0.bn"]))

    def train_round(server_round, refused=()):
        sent = _messages(lama, server_round, [1, 2, 3])
        replies = [r for r in _replies(lama, server_round) if r.metadata.src_node_id not in refused]
        lama.aggregate_train(server_round, replies + [_error_reply(node, lama) for node in refused])
        return {node: _arrays(message) for node, message in sent.items()}

    assert train_round(1) == {1: every, 2: every, 3: every}  # block start
    assert train_round(2, refused=[2]) == {1: partial, 2: partial, 3: partial}
    assert lama.rejections[-1].node_id == 2 and "client error" in lama.rejections[-1].reason
    checkpoint = json.loads(json.dumps(lama.state_dict()))
    assert train_round(3) == {1: partial, 2: every, 3: partial}
    assert checkpoint["resend"] == [2]  # a resumed run still resends
    assert train_round(4) == {1: partial, 2: partial, 3: partial}  # node 2 is back to normal


# ------------------------------------------------------------------ client side
def test_client_keeps_unsynchronised_layer_across_rounds():
    assert METHODS["fedlama"].train is fedlama_train
    cfg = compose_config(["strategy=fedlama", "dataset=digits", "federation.num_clients=10", "train.local_steps=2"])
    runtime = ClientRuntime(cfg=cfg, partition_id=0, num_partitions=10, data_path=None, device=torch.device("cpu"))
    initial = torch_state_to_numpy(runtime.new_model().state_dict())
    lama = FedLAMAStrategy(initial, phi=2, local_steps=2)
    lama.intervals["head.fc1"] = 2
    lama.client_of = {7: 0}  # identified as the runtime's partition
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    fc1 = runtime.layers.keys_of(["head.fc1"])

    def train(server_round):
        (message,) = lama.build_messages(server_round, {7: lama.plan(server_round, 7)}, MessageType.TRAIN)
        return message.content, fedlama_train(runtime, message.content, context)

    sent, reply = train(3)  # block start: everything down, fc1 not asked back
    assert set(fc1) <= set(sent["arrays"].keys()) and not set(fc1) & set(reply["arrays"].keys())
    kept = load_local_model(context)
    assert not np.array_equal(kept[fc1[0]], initial[fc1[0]])  # it trained on the device

    sent, reply = train(4)  # fc1 not sent down; the client continues from its own copy
    assert not set(fc1) & set(sent["arrays"].keys()) and set(fc1) <= set(reply["arrays"].keys())
    replica = runtime.model_with(merge(kept, from_arrayrecord(sent["arrays"])))
    train_steps(replica, runtime.train_data, cfg.train, runtime.device, runtime.round_seed(4))
    expected = torch_state_to_numpy(replica.state_dict())
    returned = from_arrayrecord(reply["arrays"])
    assert all(np.array_equal(returned[k], expected[k]) for k in fc1)
    from_server = runtime.model_with(merge(kept, {**from_arrayrecord(sent["arrays"]), **select(initial, runtime.layers, ["head.fc1"])}))
    train_steps(from_server, runtime.train_data, cfg.train, runtime.device, runtime.round_seed(4))
    assert not np.array_equal(returned[fc1[0]], from_server.state_dict()[fc1[0]].numpy())


# ------------------------------------------------------------------ whole runs
def _sim(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, list[dict]]:
    """A whole run in process (the real ServerApp loop and ClientApp, one node per client)."""
    run_in_process(compose_config([f"output_dir={tmp_path}", f"run_name={name}", *overrides]))
    run = tmp_path / name
    records = RunDirectory(run).read_metrics()
    return json.loads((run / "summary.json").read_text()), records


@pytest.mark.slow
def test_simulation_phi1_equals_fedavg(tmp_path):
    common = ["dataset=digits", "federation.num_clients=4", "federation.rounds=3", "train.local_steps=5"]
    fedavg, _ = _sim(tmp_path, "avg", "strategy=fedavg", *common)
    phi1, _ = _sim(tmp_path, "phi1", "strategy=fedlama", "strategy.phi=1", *common)
    assert phi1["final_accuracy"] == fedavg["final_accuracy"]
    assert phi1["bytes_up"] == phi1["fedavg_bytes_up"]


@pytest.mark.slow
def test_simulation_phi2_keeps_long_layers_on_the_devices(tmp_path):
    summary, records = _sim(
        tmp_path, "phi2", "strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0",
        "dataset=digits", "federation.num_clients=4", "federation.rounds=4", "train.local_steps=5",
    )
    intervals = records[2]["strategy"]["intervals"]
    long = {name for name, interval in intervals.items() if interval == 2}
    assert long and records[1]["strategy"]["reassigned"]
    assert all(r["rejected"] == 0 and r["replies"] == 4 for r in records)
    assert not long & set(records[2]["layer_bytes_up"])  # round 3: long layers stay on the devices
    assert not long & set(records[3]["layer_bytes_down"])  # round 4: ...and get nothing from the server
    assert long <= set(records[3]["layer_bytes_up"])  # round 4 closes the block: all layers back
    assert summary["traffic_ratio_vs_fedavg"] < 1.0
    assert (tmp_path / "phi2" / "intervals.png").stat().st_size > 1000


class _RestartingClient:
    """The real ClientApp whose node ``node`` loses ``context.state`` (a restart without
    its state folder) before round ``restart``; notes what every train call started from."""

    def __init__(self, app, node: int, restart: int, model_keys: frozenset[str]) -> None:
        self.app, self.node, self.restart, self.model_keys = app, node, restart, model_keys
        #: (round, node, held a kept model, received every layer, refused)
        self.calls: list[tuple[int, int, bool, bool, bool]] = []

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type != MessageType.TRAIN:
            return self.app(message, context)
        server_round = int(message.content["config"]["server-round"])
        if context.node_id == self.node and server_round == self.restart:
            context.state = RecordDict()
        kept = load_local_model(context) is not None
        whole = "arrays" in message.content and set(message.content["arrays"].keys()) == self.model_keys
        try:
            reply = self.app(message, context)
        except RuntimeError:
            self.calls.append((server_round, context.node_id, kept, whole, True))
            raise
        self.calls.append((server_round, context.node_id, kept, whole, False))
        return reply


def test_restarted_client_refuses_then_gets_every_layer_and_never_trains_initial_values(tmp_path):
    """phi=3: intervals set at round 3; round 4 opens a block; node 1 restarts before round 5 (mid-block)."""
    cfg = compose_config([
        "strategy=fedlama", "strategy.phi=3", "strategy.min_round_to_adjust=0", "dataset=digits", "model=cnn",
        "federation.num_clients=3", "federation.rounds=6", "train.local_steps=2", "train.batch_size=16",
        "evaluation.max_examples=100", f"output_dir={tmp_path}", "run_name=restart",
    ])
    run = FederatedRun(cfg)
    restarted = FIRST_NODE_ID + 1
    client = _RestartingClient(make_client_app(cfg), restarted, restart=5, model_keys=run.strategy.layers.keys_set)
    run.run(InProcessGrid(client, 3, node_config=lambda p: {"partition-id": p, "num-partitions": 3}))
    records = RunDirectory(tmp_path / "restart").read_metrics()

    mine = {r: (kept, whole, refused) for r, node, kept, whole, refused in client.calls if node == restarted}
    assert mine[5] == (False, False, True)  # a partial model and nothing kept: refused
    assert mine[6] == (False, True, False)  # next round: every layer
    assert records[4]["rejected"] == 1 and "holds no model" in run.strategy.rejections[-1].reason
    assert all(r["rejected"] == 0 for i, r in enumerate(records) if i != 4)
    # no node ever trained without a full model of its own or from the server
    assert all(kept or whole for _, _, kept, whole, refused in client.calls if not refused)


def test_a_refused_reply_from_a_node_not_asked_to_train_changes_no_resend_set():
    """Issue 24, item 8: an unknown or unsampled sender never joins the resend set (it would stay for good)."""
    lama = FedLAMAStrategy(small_state(0), phi=4, local_steps=1, fraction_train=0.5, min_train_nodes=1, seed=0)
    lama.client_of = {1: 0, 2: 1}
    (sent,) = lama.configure_train(1, [1, 2])
    asked = sent.metadata.dst_node_id
    other = 3 - asked
    crashed = Message(Error(code=2, reason="RuntimeError: no model of its own"), reply_to=sent_message(lama, asked))
    replies = [_error_reply(999), _error_reply(other), crashed]
    lama.aggregate_train(1, replies)
    assert len(lama.rejections) == 3
    assert lama.resend == {lama.client_of[asked]}  # only the node asked to train, by its client id
