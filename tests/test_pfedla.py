"""pFedLA: hypernetwork sign, fallbacks, HeurpFedLA, personalisation, disk store, rejection."""

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from benchmarks.faults import send_plans
from fedlayer.config import compose_config
from fedlayer.errors import ConfigError, ParameterError
from fedlayer.layers import copy_state, select, states_equal, torch_state_to_numpy
from fedlayer.methods.base import NodePlan
from fedlayer.methods.pfedla import PFedLAStrategy
from fedlayer.methods.pfedla.hypernetwork import aggregation_weights
from fedlayer.methods.pfedla.store import ClientModelStore
from fedlayer.models import build_model
from fedlayer.server.builder import build_strategy
from fedlayer.server.rundir import RunDirectory
from fedlayer.workload import load_workload
from tests.conftest import make_reply, small_state

N = 3


def _strategy(tmp_path, num_clients=N, **kwargs):
    strategy = PFedLAStrategy(small_state(0), num_clients=num_clients, embedding_dim=8, hidden_dim=16, seed=1, **kwargs)
    strategy.attach_run_dir(tmp_path)
    strategy.client_of = {100 + c: c for c in range(num_clients)}  # node 100 + i is client i
    for c in range(num_clients):
        strategy.store.write(c, strategy.store.flatten(small_state(10 + c)))
    return strategy


def _sent(strategy, client):
    """What ``build_messages`` would put in the node's train message."""
    return strategy.node_state(100 + client, strategy.layers.names, MessageType.TRAIN)


def _distance(a, b):
    return float(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a if a[k].dtype.kind == "f"))


def test_hypernetwork_step_moves_personalised_model_towards_trained_model(tmp_path):
    strategy = _strategy(tmp_path, hn_lr=1e-3)
    thetabar = _sent(strategy, 0)
    trained = small_state(10 + 2)  # client 0 "trained" towards client 2's model
    before = _distance(thetabar, trained)
    strategy.hypernetwork_step(0, strategy.store.flatten(trained), 1)
    after = _distance(_sent(strategy, 0), trained)
    assert after < before
    # and a step with the opposite sign would have moved it away: the test tells the signs apart
    strategy.hn_files.current.pop(0)  # back to the initial hypernetwork
    assert states_equal(_sent(strategy, 0), thetabar)
    strategy.hn_lr = -1e-3
    strategy.hypernetwork_step(0, strategy.store.flatten(trained), 1)
    assert _distance(_sent(strategy, 0), trained) > before


def test_streamed_gradient_equals_autograd_through_the_personalised_model(tmp_path):
    strategy = _strategy(tmp_path)
    _sent(strategy, 1)
    trained = small_state(7)
    hn = strategy.hypernetwork(1)
    ours = strategy.hypernetwork_gradients(1, hn, strategy.store.flatten(trained))
    # direct: thetabar as a torch function of the weights, autograd with grad_outputs = -Delta
    weights, _ = strategy.weights(1, hn)
    outputs, minus_delta = [], []
    for index, name in enumerate(strategy.layers.names):
        for key in strategy.layers[name].keys:
            if small_state(0)[key].dtype.kind != "f":
                continue
            stacked = torch.stack([torch.from_numpy(small_state(10 + j)[key].astype(np.float64)) for j in range(N)])
            mixed = torch.tensordot(weights[index].double(), stacked, dims=1)
            outputs.append(mixed)
            minus_delta.append(mixed.detach() - torch.from_numpy(trained[key].astype(np.float64)))
    direct = torch.autograd.grad(outputs, list(hn.parameters()), grad_outputs=minus_delta)
    for a, b in zip(ours, direct):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_all_zero_weights_fall_back_to_own_layer(tmp_path):
    alpha = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    weights = aggregation_weights(alpha, own=2)
    assert weights.tolist() == [[0.0, 0.0, 1.0], [0.25, 0.75, 0.0]]
    strategy = _strategy(tmp_path)
    hn = strategy.hypernetwork(1)
    with torch.no_grad():
        for head in hn.heads:
            head.bias.fill_(-1e6)  # every alpha_1j^l = ReLU(negative) = 0
    strategy.save_hypernetwork(1, hn, 1)
    assert states_equal(_sent(strategy, 1), small_state(11))
    # no gradient reaches a hypernetwork whose alpha are all zero: the step changes nothing
    grads = strategy.hypernetwork_gradients(1, hn, strategy.store.flatten(small_state(5)))
    assert all(g is None or not g.any() for g in grads)


def test_clients_that_never_trained_get_no_weight(tmp_path):
    """Untrained clients hold the initial model: it must not be mixed into anyone's model."""
    strategy = PFedLAStrategy(small_state(0), num_clients=4, embedding_dim=8, hidden_dim=16, seed=1)
    strategy.attach_run_dir(tmp_path)
    strategy.client_of = {100 + c: c for c in range(4)}
    assert states_equal(_sent(strategy, 0), small_state(0))  # nobody trained: the initial model
    strategy.store.write(2, strategy.store.flatten(small_state(12)), 1)
    # client 0 (untrained) gets client 2's model whole; so does client 2
    for client in (0, 2):
        assert states_equal(_sent(strategy, client), small_state(12)), client
        assert set(np.flatnonzero(strategy.round_weights[client].sum(axis=0))) == {2}
    strategy.store.write(3, strategy.store.flatten(small_state(13)), 1)
    _sent(strategy, 0)
    assert set(np.flatnonzero(strategy.round_weights[0].sum(axis=0))) == {2, 3}
    # and the hypernetwork gradient is that of the masked weights (the untrained weigh 0)
    hn = strategy.hypernetwork(0)
    grads = strategy.hypernetwork_gradients(0, hn, strategy.store.flatten(small_state(5)))
    assert any(g is not None and g.any() for g in grads)


def test_k_layers_with_largest_self_weight_stay_local(tmp_path):
    strategy = _strategy(tmp_path, k=2)
    sent = _sent(strategy, 0)
    local = strategy.round_local[0]
    weights = strategy.round_weights[0]
    self_weight = {name: weights[i, 0] for i, name in enumerate(strategy.layers.names)}
    assert len(local) == 2
    assert min(self_weight[n] for n in local) == 1.0
    own = small_state(10)
    for name in strategy.layers.names:
        same = states_equal(select(sent, strategy.layers, [name]), select(own, strategy.layers, [name]))
        assert same == (name in local), name
    # the local rows get no gradient
    hn = strategy.hypernetwork(0)
    grads = dict(zip((n for n, _ in hn.named_parameters()), strategy.hypernetwork_gradients(0, hn, strategy.store.flatten(small_state(4)))))
    for index, name in enumerate(strategy.layers.names):
        grad = grads[f"heads.{index}.weight"]
        assert (grad is None or not grad.any()) == (name in local), name


def test_personalised_models_follow_clients_with_similar_data(tmp_path):
    """Clients 0 and 1 share a data distribution (their training pulls towards the same
    optimum A), client 2 has another (B). A few rounds of pFedLA make personalised models
    differ by client, and each client's weights favour the client like it."""
    strategy = _strategy(tmp_path, hn_lr=0.05)
    optimum_a, optimum_b = small_state(20), small_state(21)
    for c in range(N):
        strategy.store.write(c, strategy.store.flatten(small_state(0)))
    target = {0: optimum_a, 1: optimum_a, 2: optimum_b}
    for server_round in range(1, 31):
        sent = {c: _sent(strategy, c) for c in range(N)}
        trained = {c: {k: v + 0.5 * (target[c][k] - v) if v.dtype.kind == "f" else v for k, v in sent[c].items()} for c in range(N)}
        for c in range(N):
            strategy.hypernetwork_step(c, strategy.store.flatten(trained[c]), server_round)
        for c in range(N):
            strategy.store.write(c, strategy.store.flatten(trained[c]), server_round)
    final = {c: _sent(strategy, c) for c in range(N)}
    assert _distance(final[0], final[2]) > 1.0
    assert _distance(final[0], optimum_a) < _distance(final[0], optimum_b)
    assert _distance(final[2], optimum_b) < _distance(final[2], optimum_a)
    weights = {c: strategy.round_weights[c] for c in range(N)}
    assert (weights[0][:, 2] < weights[0][:, 1]).all()  # client 0 leans on 1, not on 2
    assert (weights[2][:, 2] > weights[2][:, 0]).all()


def test_store_reads_layers_without_loading_whole_models(tmp_path):
    layers = PFedLAStrategy(small_state(0), num_clients=2).layers
    store = ClientModelStore(tmp_path, layers, small_state(0))
    store.write(1, store.flatten(small_state(3)))
    assert store.clients() == [1]
    assert 0 not in store.versions.current  # a client that never trained reads as the initial model
    for name in layers.names:
        assert states_equal(store.unflatten_layer(name, store.read_layer(0, name)), select(small_state(0), layers, [name]))
        assert states_equal(store.unflatten_layer(name, store.read_layer(1, name)), select(small_state(3), layers, [name]))
    mixed = store.unflatten_layer("blocks.0.bn", store.mix_layer([0, 1], np.array([0.25, 0.75]), "blocks.0.bn"))
    expected = 0.25 * small_state(0)["blocks.0.bn.weight"] + 0.75 * small_state(3)["blocks.0.bn.weight"]
    assert np.allclose(mixed["blocks.0.bn.weight"], expected)
    assert mixed["blocks.0.bn.num_batches_tracked"].dtype == np.int64 and int(mixed["blocks.0.bn.num_batches_tracked"]) == 2


def _files(strategy):
    return {p.name: p.read_bytes() for p in strategy.workdir.rglob("*") if p.is_file() and "sent" not in p.parts}


def test_bad_replies_are_rejected_and_touch_nothing(tmp_path):
    strategy = _strategy(tmp_path)
    plans = {100 + c: NodePlan(send=strategy.layers.names, request=strategy.layers.names) for c in range(N)}
    send_plans(strategy, 1, plans)
    before = _files(strategy)
    global_before = copy_state(strategy.global_state)
    poisoned = small_state(5)
    poisoned["head.fc.weight"][0, 0] = np.inf
    impostor = make_reply(101, small_state(6), metrics={"partition-id": 2}, to=strategy)  # node of client 1 claims client 2
    metrics = strategy.aggregate_train(1, [make_reply(100, poisoned, to=strategy), impostor])
    assert metrics is None and len(strategy.rejections) == 2
    assert states_equal(strategy.global_state, global_before)  # no new global model
    assert "registered client 1" in strategy.rejections[1].reason
    assert _files(strategy) == before
    # a good reply updates exactly its client's model and hypernetwork
    send_plans(strategy, 2, plans)
    strategy.aggregate_train(2, [make_reply(102, small_state(6), metrics={"partition-id": 2, "local-test-accuracy": 0.5}, to=strategy)])
    after = _files(strategy)
    assert {name for name in after if after[name] != before.get(name)} == {"client-00002.v000002.f32", "hn-00002.v000002.npz"}
    assert strategy.round_record(2)["personal_accuracy"]["mean"] == 0.5


def test_state_dict_round_trip_keeps_the_store_in_a_moved_run_directory(tmp_path):
    strategy = _strategy(tmp_path / "before")
    state, sent = strategy.state_dict(), _sent(strategy, 2)
    (tmp_path / "before").rename(tmp_path / "after")  # the run directory moved between crash and resume
    restored = PFedLAStrategy(small_state(0), num_clients=N, embedding_dim=8, hidden_dim=16, seed=1)
    restored.attach_run_dir(tmp_path / "after")  # as the round loop does before restoring
    restored.load_state_dict(state)
    assert restored.workdir == tmp_path / "after" / "pfedla"
    restored.client_of = dict(strategy.client_of)  # node ids are relearned in every run
    assert states_equal(_sent(restored, 2), sent)
    assert not (tmp_path / "before").exists()


def test_config_checks_name_the_field():
    for field, bad in (("hn_lr", 0.0), ("k", -1), ("embedding_dim", 0)):
        cfg = compose_config(["strategy=pfedla", "dataset=digits", "federation.num_clients=2", f"strategy.{field}={bad}"])
        with pytest.raises(ConfigError, match=f"strategy.{field}"):
            build_strategy(cfg, load_workload(cfg, 2))
    with pytest.raises(ParameterError, match="k") as info:
        PFedLAStrategy(small_state(0), num_clients=2, k=5)
    assert info.value.name == "k"


@pytest.mark.slow
def test_pfedla_in_flower_simulation(tmp_path):
    """Nodes register through the query handler, get their own models, and the artifacts appear.

    The whole run goes in process: the real round loop and ClientApp, one node per client.
    """

    from tests.inprocess import run_in_process

    cfg = compose_config([
        f"output_dir={tmp_path}", "run_name=run",
        "strategy=pfedla", "dataset=digits", "federation.num_clients=3", "federation.rounds=2",
        "dataset.partition.scheme=pathological", "dataset.partition.classes_per_client=2", "train.local_steps=3",
        "strategy.alpha_every=2",
    ])
    _, summary = run_in_process(cfg)
    run = tmp_path / "run"
    records = RunDirectory(run).read_metrics()
    assert summary["rejected_replies"] == 0 and all(r["replies"] == 3 for r in records)
    last = records[-1]["strategy"]
    assert last["registered_clients"] == 3 and last["personal_accuracy"]["clients"] == 3
    assert "alpha" not in last  # L x N^2 floats stay out of the metrics lines...
    with np.load(run / "pfedla" / "alpha" / "round-000002.npz") as alpha:  # ...and go to their own file
        assert alpha["clients"].tolist() == [0, 1, 2] and alpha["weights"].shape == (3, 4, 3)
    assert not (run / "pfedla" / "alpha" / "round-000001.npz").exists()
    sent = [np.fromfile(run / "pfedla" / "sent" / f"client-{c:05d}.v000000.f32", dtype=np.float32) for c in range(3)]
    assert not np.array_equal(sent[0], sent[1]) and not np.array_equal(sent[1], sent[2])
    assert np.load(run / "pfedla_alpha.npy").shape == (4, 3, 3)
    assert (run / "pfedla_alpha.png").stat().st_size > 1000


def test_resume_reads_the_checkpointed_round_and_discards_later_files(tmp_path):
    strategy = _strategy(tmp_path)
    plans = {100 + c: NodePlan(send=strategy.layers.names, request=strategy.layers.names) for c in range(N)}
    send_plans(strategy, 1, plans)
    strategy.aggregate_train(1, [make_reply(100, small_state(6), metrics={"partition-id": 0}, to=strategy)])
    checkpoint = strategy.state_dict()
    expected = _sent(strategy, 0)
    send_plans(strategy, 2, plans)
    strategy.aggregate_train(2, [make_reply(100, small_state(7), metrics={"partition-id": 0}, to=strategy)])  # then the server dies
    assert not states_equal(_sent(strategy, 0), expected)

    resumed = PFedLAStrategy(small_state(0), num_clients=N, embedding_dim=8, hidden_dim=16, seed=1)
    resumed.attach_run_dir(tmp_path)  # as the round loop does before restoring
    resumed.load_state_dict(checkpoint)
    resumed.client_of = dict(strategy.client_of)
    assert states_equal(_sent(resumed, 0), expected)
    assert not list(tmp_path.rglob("*.v000002.*"))  # round 2 never happened for the resumed run


def test_store_keeps_only_the_newest_versions_of_a_client(tmp_path):
    layers = PFedLAStrategy(small_state(0), num_clients=2).layers
    store = ClientModelStore(tmp_path, layers, small_state(0))
    for version in range(1, 6):
        store.write(0, store.flatten(small_state(version)), version)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"client-00000.v{v:06d}.f32" for v in (3, 4, 5)]
    assert states_equal(store.unflatten_layer("head.fc", store.read_layer(0, "head.fc")), select(small_state(5), layers, ["head.fc"]))


def test_round_records_hold_only_that_rounds_clients(tmp_path):
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    strategy = PFedLAStrategy(torch_state_to_numpy(model.state_dict()), num_clients=4, fraction_train=0.5, seed=1)
    strategy.attach_run_dir(tmp_path)
    strategy.client_of = {node: node - 10 for node in (10, 11, 12, 13)}
    sampled = []
    for server_round in (1, 2):
        messages = strategy.configure_train(server_round, [10, 11, 12, 13])
        sampled.append({strategy.client_of[m.metadata.dst_node_id] for m in messages})
        assert set(strategy.round_weights) == sampled[-1]  # not the clients of earlier rounds
    assert sampled[0] != sampled[1]  # the check above could have failed
