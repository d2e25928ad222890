"""LAQ: the lazy rule, the server's sums and step, hostile payloads, client/server agreement."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from benchmarks.faults import LAQ_MALFORMED as MALFORMED
from benchmarks.faults import laq_reply as _reply
from benchmarks.faults import laq_state as _state
from benchmarks.faults import laq_upload as _upload
from benchmarks.faults import push
from fedlayer.config import compose_config
from fedlayer.errors import ConfigError, ParameterError
from fedlayer.layers import from_arrayrecord, states_equal, torch_state_to_numpy
from fedlayer.methods import METHODS
from fedlayer.methods.client_half import ClientRuntime
from fedlayer.methods.laq import (
    ERROR_WEIGHT,
    QHAT,
    LAQStrategy,
    laq_train,
    lazy_decision,
    update_records,
)
from fedlayer.wire.records import CODED, PAYLOAD
from fedlayer.server.builder import build_strategy
from fedlayer.server.rundir import RunDirectory
from fedlayer.traffic.ledger import FOREIGN_KEYS
from fedlayer.traffic.size import message_bytes, payload_bytes
from fedlayer.training import train_steps
from fedlayer.workload import load_workload
from tests.conftest import make_reply, small_state
from tests.inprocess import run_in_process

NODES = (11, 22, 33)


def _strategy(**kwargs) -> LAQStrategy:
    strategy = LAQStrategy(_state(0), num_clients=3, **{"alpha": 0.1, "bits": 8, **kwargs})
    strategy.client_of = {node: pid for pid, node in enumerate(NODES)}  # what the identity query learns
    strategy.configure_train(1, list(NODES))
    return strategy


def _snapshot(strategy):
    return copy.deepcopy(strategy.global_state), copy.deepcopy(strategy.state_dict())


def _same(a, b):
    (state_a, dict_a), (state_b, dict_b) = a, b
    assert states_equal(state_a, state_b)
    assert dict_a.keys() == dict_b.keys()
    assert dict_a["versions"] == dict_b["versions"] and dict_a["history"] == dict_b["history"]
    qhat_a, qhat_b = dict_a["qhat"]["arrays"], dict_b["qhat"]["arrays"]  # a store without a folder: in memory
    assert qhat_a.keys() == qhat_b.keys()
    for client in qhat_a:
        assert states_equal(qhat_a[client], qhat_b[client])


# ------------------------------------------------------------------ lazy rule
def test_skip_rule_on_a_constructed_case():
    qhat = {"w": np.zeros(100, np.float32)}
    rule = dict(bits=4, ehat=0.0, tbar=5, drift=1.0, drift_scale=1.0)
    tiny = lazy_decision({"w": np.full(100, 1e-3, np.float32)}, qhat, clock=0, **rule)
    assert not tiny.upload and tiny.innovation < tiny.threshold  # 1e-4 < 1
    large = lazy_decision({"w": np.full(100, 1.0, np.float32)}, qhat, clock=0, **rule)
    assert large.upload and large.innovation >= 1.0
    forced = lazy_decision({"w": np.full(100, 1e-3, np.float32)}, qhat, clock=5, **rule)
    assert forced.upload  # the clock reached tbar
    # the 3(e + ehat) term: a large past quantization error holds back a medium innovation
    medium = {"w": np.full(100, 0.2, np.float32)}
    assert lazy_decision(medium, qhat, clock=0, **rule).upload
    assert not lazy_decision(medium, qhat, clock=0, **{**rule, "ehat": 10.0}).upload
    # drift scales the bound
    assert not lazy_decision(medium, qhat, clock=0, **{**rule, "drift": 100.0}).upload


def test_quantized_upload_is_within_delta_of_the_gradient():
    rng = np.random.default_rng(3)
    g = {"w": rng.standard_normal(257).astype(np.float32)}
    qhat = {"w": rng.standard_normal(257).astype(np.float32)}
    decision = lazy_decision(g, qhat, bits=3, ehat=0.0, clock=0, tbar=9, drift=0.0, drift_scale=1.0)
    radius = float(np.max(np.abs(g["w"] - qhat["w"])))
    assert np.max(np.abs(decision.q["w"] - g["w"])) <= radius / 7 * (1 + 1e-5)
    assert decision.error == pytest.approx(float(np.sum((decision.q["w"].astype(np.float64) - g["w"]) ** 2)))



def test_quantization_allowance_is_blind_to_the_innovations_size():
    """Issue #4: ``3 (e + ehat)`` scales with the innovation, so it skips a heavy-tailed one of any size.

    One large coordinate and many small ones (a CNN delta's shape): every small
    coordinate lands on a grid point ``R / 15`` away, so ``3e`` exceeds ``||Q - Qhat||^2``
    however large ``R`` is. The paper's rule keeps it for gradient mode; delta
    mode drops the allowance and bounds a skip by the drift alone.
    """
    qhat = {"w": np.zeros(1000, np.float32)}
    rule = dict(bits=4, ehat=0.0, clock=0, tbar=100, drift=1e-6, drift_scale=1.0)
    for size in (1e-2, 1.0, 1e2):
        g = {"w": np.full(1000, 1e-4 * size, np.float32)}
        g["w"][0] = size
        paper = lazy_decision(g, qhat, error_weight=ERROR_WEIGHT["gradient"], **rule)
        assert not paper.upload and paper.innovation > 5 * size**2  # skipped, however large
        delta = lazy_decision(g, qhat, error_weight=ERROR_WEIGHT["delta"], **rule)
        assert delta.upload and delta.threshold == pytest.approx(rule["drift"])


# ------------------------------------------------------------------ server
def test_uploads_and_skips_step_the_model_with_the_stale_sum():
    strategy = _strategy()
    theta0 = copy.deepcopy(strategy.global_state)
    p1, q1 = _upload(_state(1))
    p2, q2 = _upload(_state(2))
    strategy.aggregate_train(1, [_reply(11, 0, p1, to=strategy), _reply(22, 1, p2, to=strategy)])
    for key in theta0:
        expected = theta0[key] - np.float32(0.1) * (q1[key] + q2[key])
        assert np.allclose(strategy.global_state[key], expected, atol=1e-6)
        assert np.array_equal(strategy.qhat[0][key], q1[key])  # server rebuilt exactly the client's Q
    record = strategy.round_record(1)
    assert (record["uploads"], record["skips"]) == (2, 0)
    assert record["bits_sent"] == 2 * sum(v.size * 8 + 32 for v in theta0.values())
    assert strategy.versions == {0: 1, 1: 1}
    # round 2: both skip; the server still steps with grad = Q1 + Q2
    skip = update_records(1, None)
    theta1 = copy.deepcopy(strategy.global_state)
    strategy.configure_train(2, list(NODES))
    strategy.aggregate_train(2, [_reply(11, 0, skip, to=strategy), _reply(22, 1, skip, to=strategy)])
    assert strategy.round_record(2)["skips"] == 2 and strategy.round_record(2)["uploads"] == 0
    for key in theta1:
        assert np.allclose(strategy.global_state[key], theta1[key] - np.float32(0.1) * (q1[key] + q2[key]), atol=1e-6)
    assert strategy.history[0] > 0 and len(strategy.history) == 2
    # the plan tells known nodes the server's version and the drift
    plan = strategy.plan(3, 11)
    assert plan.request == [] and plan.send == strategy.layers.names
    assert plan.config["laq-version"] == 1 and strategy.plan(3, 33).config["laq-version"] == 0
    assert strategy.plan(3, 44).config["laq-version"] == -1  # a node of unknown identity
    assert plan.config["laq-drift"] == pytest.approx(0.08 * sum(strategy.history))


def test_innovation_is_decoded_against_the_last_upload():
    strategy = _strategy(bits=4)
    p1, q1 = _upload(_state(1), bits=4)
    strategy.aggregate_train(1, [_reply(11, 0, p1, to=strategy)])
    p2, q2 = _upload(_state(5), qhat=q1, bits=4, base=1)
    strategy.configure_train(2, list(NODES))
    strategy.aggregate_train(2, [_reply(11, 0, p2, to=strategy)])
    assert states_equal(strategy.qhat[0], q2) and strategy.versions[0] == 2
    # a stale base is refused; base 0 (a client that lost its Qhat) replaces Qhat
    stale, _ = _upload(_state(6), qhat=q1, bits=4, base=1)
    before = _snapshot(strategy)
    strategy.configure_train(3, list(NODES))
    strategy.aggregate_train(3, [_reply(11, 0, stale, to=strategy)])
    _same(before, _snapshot(strategy))
    assert "version 1" in strategy.rejections[-1].reason
    fresh, q3 = _upload(_state(7), bits=4, base=0)
    strategy.configure_train(4, list(NODES))
    strategy.aggregate_train(4, [_reply(11, 0, fresh, to=strategy)])
    assert states_equal(strategy.qhat[0], q3) and strategy.versions[0] == 1
    assert strategy.round_record(4)["resyncs"] == 1
    assert all(np.array_equal(strategy.gradient_sum()[k], q3[k]) for k in q3)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_payload_is_rejected_and_leaves_state_unchanged(kind):
    strategy = _strategy()
    good, _ = _upload(_state(1))
    strategy.aggregate_train(1, [_reply(11, 0, good, to=strategy)])  # some state to protect
    before = _snapshot(strategy)
    bad = MALFORMED[kind](good)
    strategy.configure_train(2, list(NODES))
    metrics = strategy.aggregate_train(2, [_reply(22, 1, bad, to=strategy)])
    assert metrics is None and len(strategy.rejections) == 1
    assert strategy.rejections[0].node_id == 22 and "malformed LAQ update" in strategy.rejections[0].reason
    _same(before, _snapshot(strategy))
    # the run goes on: a good reply is still accepted
    again, _ = _upload(_state(2))
    strategy.configure_train(3, list(NODES))
    strategy.aggregate_train(3, [_reply(22, 1, again, to=strategy)])
    assert strategy.versions[1] == 1 and len(strategy.rejections) == 1


@pytest.mark.parametrize(
    "kind", ["no-payload", "coded-not-arrays", "bad-base", "pid-range", "pid-nan", "unregistered", "dense-arrays", "duplicate-pid"]
)
def test_bad_reply_envelope_is_rejected(kind):
    strategy = _strategy()
    good, _ = _upload(_state(1))
    replies = {
        "no-payload": make_reply(11, None, metrics={"partition-id": 0}, to=strategy),
        "coded-not-arrays": _reply(11, 0, {**good, CODED: ConfigRecord({"x": 1})}, to=strategy),
        "bad-base": _reply(11, 0, update_records(-1, good[CODED]), to=strategy),
        "pid-range": _reply(11, 3, good, to=strategy),
        "pid-nan": _reply(11, float("nan"), good, to=strategy),
        "unregistered": make_reply(44, None, payload=dict(good[PAYLOAD]), records={CODED: good[CODED]}),
        "dense-arrays": _reply(11, 0, good, state=_state(1), to=strategy),
    }
    before = _snapshot(strategy)
    if kind == "duplicate-pid":
        strategy.aggregate_train(1, [_reply(11, 0, good, to=strategy), _reply(22, 0, good, to=strategy)])
        assert len(strategy.rejections) == 1 and strategy.rejections[0].node_id in NODES
        assert strategy.round_record(1)["uploads"] == 1
        return
    metrics = strategy.aggregate_train(1, [replies[kind]])
    assert metrics is None and len(strategy.rejections) == 1
    _same(before, _snapshot(strategy))


def test_updates_are_keyed_by_the_registered_client_not_the_reply():
    strategy = _strategy()
    strategy.client_of = {11: 2, 22: 0, 33: 1}
    good, q = _upload(_state(1))
    no_pid = make_reply(11, None, payload=dict(good[PAYLOAD]), records={CODED: good[CODED]}, to=strategy)
    strategy.aggregate_train(1, [no_pid])  # no partition-id in the reply
    assert strategy.rejections == [] and sorted(strategy.qhat) == [2] and states_equal(strategy.qhat[2], q)
    strategy.configure_train(2, list(NODES))
    strategy.aggregate_train(2, [_reply(22, 2, good, to=strategy)])  # claims client 2, registered as 0: refused
    assert len(strategy.rejections) == 1 and "registered client 0" in strategy.rejections[0].reason
    assert sorted(strategy.qhat) == [2] and strategy.client_limit == 3


def test_an_unsampled_clients_update_is_dropped_after_tbar_rounds():
    """Partial participation: the server's clock drops a stored update no one refreshed for tbar rounds."""
    strategy = _strategy(tbar=2)
    good, q = _upload(_state(1))
    strategy.aggregate_train(1, [_reply(11, 0, good, to=strategy), _reply(22, 1, good, to=strategy)])
    for server_round in (2, 3):  # client 0 is not sampled; client 1 keeps uploading
        strategy.configure_train(server_round, [22])
        fresh, _ = _upload(_state(server_round), qhat=strategy.qhat[1], base=strategy.versions[1])
        strategy.aggregate_train(server_round, [_reply(22, 1, fresh, to=strategy)])
        assert 0 in strategy.qhat and strategy.round_record(server_round)["stale_dropped"] == 0
    strategy.configure_train(4, [22])
    fresh, _ = _upload(_state(4), qhat=strategy.qhat[1], base=strategy.versions[1])
    theta = copy.deepcopy(strategy.global_state)
    strategy.aggregate_train(4, [_reply(22, 1, fresh, to=strategy)])
    assert 0 not in strategy.qhat and strategy.round_record(4)["stale_dropped"] == 1
    for key in theta:  # round 4 steps with client 1's update alone
        assert np.allclose(strategy.global_state[key], theta[key] - np.float32(0.1) * strategy.qhat[1][key], atol=1e-6)
    assert strategy.plan(5, 11).config["laq-version"] == 0  # client 0 resyncs when sampled again


def test_state_dict_round_trip_resumes_identically():
    a = _strategy(bits=4)
    p1, q1 = _upload(_state(1), bits=4)
    a.aggregate_train(1, [_reply(11, 0, p1, to=a)])
    p2, _ = _upload(_state(2), qhat=q1, bits=4, base=1)
    a.configure_train(2, list(NODES))
    a.aggregate_train(2, [_reply(11, 0, p2, to=a)])
    b = _strategy(bits=4)
    b.global_state = copy.deepcopy(a.global_state)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    skip = update_records(2, None)
    for strategy in (a, b):
        strategy.configure_train(3, list(NODES))
        strategy.aggregate_train(3, [_reply(11, 0, skip, to=strategy)])
    assert states_equal(a.global_state, b.global_state) and a.history == b.history
    assert a.plan(4, 11).config["laq-drift"] == b.plan(4, 11).config["laq-drift"]


def _build(overrides):
    """The strategy the server builds from these overrides (strategy fields are checked here)."""
    cfg = compose_config(overrides)
    return build_strategy(cfg, load_workload(cfg, int(cfg.federation.num_clients)))


def test_config_and_model_checks_name_the_field():
    for override, field in (
        ("strategy.bits=9", "strategy.bits"), ("strategy.bits=0", "strategy.bits"),
        ("strategy.mode=sgd", "strategy.mode"), ("strategy.alpha=0", "strategy.alpha"),
        ("strategy.D=0", "strategy.D"), ("strategy.tbar=0", "strategy.tbar"), ("strategy.xi=-1", "strategy.xi"),
        ("model=cnn6", "model.name"),
    ):
        # the strategy is built on the configured model, and cnn6 takes 32x32 inputs only:
        # pad mnist5k's 28x28 images, so that cnn6 is refused for its buffers, not its input size
        extra = ["dataset.image_size=32"] if override == "model=cnn6" else []
        with pytest.raises(ConfigError) as err:
            _build(["strategy=laq", "model=linear", *extra, override])
        assert err.value.field == field
    with pytest.raises(ParameterError) as err:
        LAQStrategy(small_state(0), num_clients=3)  # BatchNorm statistics are not gradients
    assert err.value.name == "initial_state"  # the builder reports it as model.name (above)
    _build(["strategy=laq", "model=cnn"])  # no buffers: accepted


# ------------------------------------------------------------------ client + server in process
def _clients(mode: str, *extra: str):
    cfg = compose_config(["strategy=laq", "dataset=digits", "model=linear", "federation.num_clients=3",
                          f"strategy.mode={mode}", *extra])
    runtimes = [ClientRuntime(cfg=cfg, partition_id=i, num_partitions=3, data_path=None, device=torch.device("cpu"))
                for i in range(3)]
    contexts = [Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in NODES]
    initial = torch_state_to_numpy(runtimes[0].new_model().state_dict())
    strategy = build_strategy(cfg, load_workload(cfg, 3))
    strategy.client_of = {node: pid for pid, node in enumerate(NODES)}
    assert states_equal(strategy.global_state, initial)  # clients start from the server's model
    return strategy, runtimes, contexts


def _round(strategy, runtimes, contexts, server_round, drop=()):
    messages = {m.metadata.dst_node_id: m for m in push(strategy.configure_train(server_round, list(NODES)))}
    replies = []
    for node, runtime, context in zip(NODES, runtimes, contexts):
        sent = messages[node]
        content = METHODS["laq"].train(runtime, sent.content, context)
        if node not in drop:
            replies.append(Message(content, reply_to=sent))
    strategy.aggregate_train(server_round, replies)
    return replies


def test_client_and_server_keep_the_same_qhat_and_recover_from_a_lost_upload():
    assert METHODS["laq"].train is laq_train
    strategy, runtimes, contexts = _clients("gradient", "strategy.bits=4", "strategy.alpha=0.05")
    losses = []
    for server_round in range(1, 7):
        replies = _round(strategy, runtimes, contexts, server_round, drop=(22,) if server_round == 3 else ())
        losses.append(np.mean([r.content["metrics"]["train-loss"] for r in replies]))
        for pid, context in enumerate(contexts):
            if pid == 1 and server_round == 3:
                continue  # its upload was lost: client and server disagree until it resyncs
            client_qhat = from_arrayrecord(context.state[QHAT])
            assert states_equal(client_qhat, strategy.qhat[pid]), (server_round, pid)
        for reply in replies:
            assert "arrays" not in reply.content  # only the coded update goes up
    assert losses[-1] < losses[0]
    assert strategy.totals["uploads"] + strategy.totals["skips"] == 17
    assert strategy.rejections == []  # the lost upload was repaired by a resync, not rejected


def test_delta_mode_with_8_bits_matches_fedavg():
    strategy, runtimes, contexts = _clients("delta", "strategy.bits=8", "strategy.alpha=0.3333333", "strategy.xi=0",
                                            "train.local_steps=3")
    theta = copy.deepcopy(strategy.global_state)
    _round(strategy, runtimes, contexts, 1)
    local = []
    for runtime in runtimes:  # the same local training, done densely
        model = runtime.model_with(theta)
        train_steps(model, runtime.train_data, runtime.cfg.train, runtime.device, runtime.round_seed(1))
        local.append(torch_state_to_numpy(model.state_dict()))
    for key in theta:
        mean = np.mean([s[key] for s in local], axis=0)
        # each client's Q is within R/255 of its delta per coordinate (R its largest |delta|)
        bound = max(np.abs(theta[key] - s[key]).max() for s in local) / 255 + 1e-6
        assert np.abs(strategy.global_state[key] - mean).max() <= bound
        assert not np.allclose(mean, theta[key])  # the models did move



def test_delta_mode_without_drift_allowance_steps_with_every_rounds_deltas():
    """Issue #4: with ``xi = 0`` no stale delta may be re-applied; each step is this round's mean delta.

    Before the fix the quantization allowance let all three clients skip from
    round 2 on (at 3 bits, 10 local steps), and the server kept stepping with
    their round-1 deltas. Each round is checked against dense local training
    from the same model, so quantization errors do not accumulate in the check.
    """
    bits = 3
    strategy, runtimes, contexts = _clients("delta", f"strategy.bits={bits}", "strategy.alpha=0.3333333",
                                            "strategy.xi=0", "train.local_steps=10")
    for server_round in (1, 2, 3):
        theta = copy.deepcopy(strategy.global_state)
        qhat = {pid: copy.deepcopy(strategy.qhat.get(pid)) for pid in range(3)}
        _round(strategy, runtimes, contexts, server_round)
        assert strategy.round_record(server_round)["uploads"] == 3, server_round
        deltas = []
        for pid, runtime in enumerate(runtimes):  # this round's local training, done densely
            model = runtime.model_with(theta)
            train_steps(model, runtime.train_data, runtime.cfg.train, runtime.device, runtime.round_seed(server_round))
            local = torch_state_to_numpy(model.state_dict())
            deltas.append({key: theta[key] - local[key] for key in theta})
        alpha = np.float32(strategy.options.alpha)
        for key in theta:
            expected = theta[key] - alpha * sum(delta[key] for delta in deltas)
            # each Q is within R / (2^b - 1) of its delta, R = ||delta - Qhat_before||_inf
            radii = [np.abs(delta[key] - (0 if qhat[pid] is None else qhat[pid][key])).max()
                     for pid, delta in enumerate(deltas)]
            bound = alpha * sum(radii) / (2**bits - 1) + 1e-6
            assert np.abs(strategy.global_state[key] - expected).max() <= bound, (server_round, key)


def test_skip_replies_are_tiny():
    strategy, runtimes, contexts = _clients("gradient", "strategy.tbar=100", "strategy.xi=1e9")
    first = _round(strategy, runtimes, contexts, 1)  # everyone uploads (no Qhat yet)
    second = _round(strategy, runtimes, contexts, 2)  # a huge drift weight: everyone skips
    assert strategy.round_record(2)["skips"] == 3
    assert max(payload_bytes(m) for m in second) < min(payload_bytes(m) for m in first) / 3
    assert max(message_bytes(m) for m in second) < min(message_bytes(m) for m in first)


# ------------------------------------------------------------------ a whole run, in process
def test_simulation_three_rounds_three_clients(tmp_path: Path):
    """The real server loop and ClientApp over ``tests.inprocess.InProcessGrid`` (no Ray, no subprocess)."""
    cfg = compose_config([f"output_dir={tmp_path}", "run_name=run", "strategy=laq", "model=linear",
                          "dataset=mnist5k", "federation.num_clients=3", "federation.rounds=3"])
    run_in_process(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    records = RunDirectory(tmp_path / "run").read_metrics()
    assert summary["rejected_replies"] == 0 and summary["final_accuracy"] > 0.3
    assert records[0]["strategy"]["uploads"] == 3  # nobody has a Qhat yet
    assert all(r["strategy"]["uploads"] + r["strategy"]["skips"] == 3 for r in records)
    # 4-bit codes: the uplink is a small fraction of FedAvg's dense float32 uplink
    assert summary["bytes_up"] < 0.25 * summary["fedavg_bytes_up"]
    assert summary["bytes_down"] <= 1.01 * summary["fedavg_bytes_down"]
    # the coded update travels one Array per tensor, so the ledger files its bytes under their layers
    first = records[0]
    assert set(first["layer_bytes_up"]) == set(first["layer_bytes_down"]) and FOREIGN_KEYS not in first["layer_bytes_up"]
    assert sum(first["layer_bytes_up"].values()) < 0.25 * sum(first["layer_bytes_down"].values())


def test_a_returning_clients_resync_is_measured_like_the_other_uploads():
    """Issue 24, item 8: the norm guard compared a resync's full ``Q`` with the others' small
    innovations ``Q - Qhat``, so a client returning without its version was refused every round."""
    strategy = _strategy()
    (p1, q1), (p2, q2) = _upload(_state(1)), _upload(_state(2))
    strategy.aggregate_train(1, [_reply(11, 0, p1, to=strategy), _reply(22, 1, p2, to=strategy)])
    strategy.configure_train(2, list(NODES))
    near = lambda q, seed: {k: v + np.float32(1e-3) * _state(seed)[k] for k, v in q.items()}  # noqa: E731
    small1, _ = _upload(near(q1, 7), qhat=q1, base=1)
    small2, _ = _upload(near(q2, 8), qhat=q2, base=1)
    resync, q3 = _upload(_state(3))  # client 2's first upload (or one after its stored update was dropped)
    strategy.aggregate_train(2, [_reply(11, 0, small1, to=strategy), _reply(22, 1, small2, to=strategy), _reply(33, 2, resync, to=strategy)])
    assert strategy.rejections == [] and strategy.round_record(2)["uploads"] == 3
    assert states_equal(strategy.qhat[2], q3)
    # an outsized upload is still refused
    strategy.configure_train(3, list(NODES))
    uploads = [_upload(_state(5 + c), qhat=strategy.qhat[c], base=strategy.versions[c])[0] for c in (0, 1)]
    huge, _ = _upload({k: 1e4 * v for k, v in _state(4).items()}, qhat=q3, base=strategy.versions[2])
    strategy.aggregate_train(3, [_reply(11, 0, uploads[0], to=strategy), _reply(22, 1, uploads[1], to=strategy),
                                 _reply(33, 2, huge, to=strategy)])
    assert [r.node_id for r in strategy.rejections] == [33]


def test_the_step_uses_a_running_sum_of_the_stored_updates():
    """The server keeps ``sum_m Qhat_m`` as a running total (checkpointed) instead of re-summing every
    stored update each round: a round reads the stored updates of its uploaders and dropped clients
    only; through uploads that replace updates, skips and stale drops the total stays the sum of
    what is stored; a strategy restored from ``state_dict`` continues with the same sum."""
    strategy = _strategy(tbar=2)
    rng = np.random.default_rng(0)
    reads: list[int] = []
    get = strategy.qhat.get
    strategy.qhat.get = lambda client: reads.append(client) or get(client)  # counts the store's reads
    for server_round in range(1, 8):
        nodes = [n for n in NODES if rng.random() < 0.6] or [NODES[0]]
        strategy.configure_train(server_round, nodes)
        replies, uploaders = [], set()
        for node in nodes:
            client = NODES.index(node)
            if client in strategy.qhat and rng.random() < 0.3:
                update = update_records(strategy.versions[client], None)  # a skip
            else:
                qhat = strategy.qhat[client] if client in strategy.qhat else None
                update, _ = _upload(_state(10 * server_round + client), qhat=qhat, base=strategy.versions.get(client, 0))
                uploaders.add(client)
            replies.append(_reply(node, client, update, to=strategy))
        stored_before = set(strategy.qhat)
        reads.clear()
        strategy.aggregate_train(server_round, replies)
        assert not strategy.rejections
        assert set(reads) <= uploaders | (stored_before - set(strategy.qhat)), (server_round, reads)
        stored = [strategy.qhat[c] for c in strategy.qhat]
        for key, total in strategy.gradient_sum().items():
            assert np.allclose(total, sum((q[key].astype(np.float64) for q in stored), np.zeros(total.shape)), atol=1e-6)
    assert strategy.totals["stale_dropped"] > 0 and strategy.totals["skips"] > 0
    restored = _strategy(tbar=2)
    restored.load_state_dict(copy.deepcopy(strategy.state_dict()))
    assert all(np.array_equal(restored.gradient_sum()[k], v) for k, v in strategy.gradient_sum().items())
