"""pFedLA ``hn_step``: whose hypernetworks a round steps (``sampled``: the paper's rule; ``all``)."""

import numpy as np
import pytest
import torch

from benchmarks.faults import send_plans
from fedlayer.config import compose_config, resolve_resume
from fedlayer.errors import ConfigError, ParameterError
from fedlayer.methods.base import NodePlan
from fedlayer.methods.pfedla import PFedLAStrategy
from fedlayer.server.builder import build_strategy
from fedlayer.workload import load_workload
from tests.conftest import make_reply, small_state
from tests.inprocess import FIRST_NODE_ID, SimulatedCrash, run_in_process
from tests.test_pfedla import N, _strategy
from tests.test_resume import _common, assert_same_run


def _params(strategy, client):
    return {name: value.detach().clone() for name, value in strategy.hypernetwork(client).named_parameters()}


def _round(strategy, server_round, clients, seed):
    """Clients ``clients`` reply with trained models ``small_state(seed + c)``."""
    strategy.start_round(server_round)
    send_plans(strategy, server_round, {100 + c: NodePlan(send=strategy.layers.names, request=strategy.layers.names) for c in range(N)})
    replies = [make_reply(100 + c, small_state(seed + c), metrics={"partition-id": c}, to=strategy) for c in clients]
    assert strategy.aggregate_train(server_round, replies) is not None


def _hn_files(strategy):
    """Every client's current hypernetwork file, by name."""
    paths = [strategy.hn_files.current_path(c) for c in range(N)]
    return {p.name: p.read_bytes() for p in paths if p is not None}


@pytest.mark.parametrize("hn_step", ["sampled", "all"])
def test_unsampled_clients_hypernetwork_is_stepped_only_under_all(tmp_path, hn_step):
    strategy = _strategy(tmp_path, hn_lr=1e-2, hn_step=hn_step)
    _round(strategy, 1, [0, 1], seed=20)  # both train once
    before = _params(strategy, 1)
    trained = strategy.store.flatten(small_state(21))  # client 1's round-1 model: its stored Delta is against it
    hn = strategy.hypernetwork(1)
    grads = strategy.hypernetwork_gradients(1, hn, trained)  # computed from the models stored before round 2
    _round(strategy, 2, [0], seed=30)  # only client 0 is sampled
    after = _params(strategy, 1)
    changed = any(not torch.equal(before[name], after[name]) for name in before)
    record = strategy.round_record(2)
    if hn_step == "sampled":
        assert not changed
        assert "hn_steps_from_stored_delta" not in record and not (strategy.workdir / "delta").exists()
        assert strategy.state_dict()["delta_versions"] == {}  # no stored Delta of anyone
    else:
        assert changed and record["hn_steps_from_stored_delta"] == 1  # client 2 never trained: not stepped
        # the step is the paper's step with the stored Delta, against the current stored models
        # (the dot products are formed for a group of clients at once: equal up to rounding)
        for (name, value), grad in zip(hn.named_parameters(), grads):
            expected = value.detach() - strategy.hn_lr * grad if grad is not None else value.detach()
            assert torch.allclose(after[name], expected, rtol=1e-6, atol=1e-7), name
    assert strategy.hn_files.current.get(2) is None  # client 2 has never trained: its hypernetwork is untouched


def test_hn_step_is_checked_and_named():
    cfg = compose_config(["strategy=pfedla", "dataset=digits", "federation.num_clients=2", "strategy.hn_step=every"])
    with pytest.raises(ConfigError, match="strategy.hn_step"):
        build_strategy(cfg, load_workload(cfg, 2))
    with pytest.raises(ParameterError, match="sampled") as info:
        PFedLAStrategy(small_state(0), num_clients=2, hn_step="everyone")
    assert info.value.name == "hn_step"
    assert compose_config(["strategy=pfedla"]).strategy.hn_step == "sampled"  # the paper's rule by default


def test_restore_under_all_repeats_a_round_exactly(tmp_path):
    strategy = _strategy(tmp_path, hn_lr=1e-2, hn_step="all")
    _round(strategy, 1, [0, 1, 2], seed=20)
    _round(strategy, 2, [0], seed=30)
    checkpoint = strategy.state_dict()
    _round(strategy, 3, [1], seed=40)
    straight = _hn_files(strategy)
    _round(strategy, 4, [2], seed=50)  # the server dies during (after) round 4: its files must go

    resumed = PFedLAStrategy(small_state(0), num_clients=N, embedding_dim=8, hidden_dim=16, seed=1, hn_lr=1e-2, hn_step="all")
    resumed.attach_run_dir(tmp_path)  # as the round loop does before restoring
    resumed.load_state_dict(checkpoint)
    resumed.client_of = dict(strategy.client_of)
    assert not list(tmp_path.rglob("*.v000003.*")) and not list(tmp_path.rglob("*.v000004.*"))
    assert set(resumed.deltas.clients()) == {0, 1, 2}
    _round(resumed, 3, [1], seed=40)
    assert _hn_files(resumed) == straight
    assert {name for name in straight if ".v000003." in name} == {f"hn-{c:05d}.v000003.npz" for c in range(N)}


def test_crash_mid_round_then_resume_matches_uninterrupted_run_under_all(tmp_path):
    """The whole round loop, in process: 4 clients, half per round, the server dies in round 3."""
    common = [*_common(["strategy=pfedla", "strategy.hn_step=all"]), f"output_dir={tmp_path}"]
    run_in_process(compose_config([*common, f"client_state_dir={tmp_path / 'state-straight'}", "run_name=straight"]))
    crashed = [*common, f"client_state_dir={tmp_path / 'state-crashed'}", "run_name=crashed"]
    with pytest.raises(SimulatedCrash):
        run_in_process(compose_config(crashed), crash_at=(3, 1))
    run_in_process(resolve_resume(compose_config([f"resume={tmp_path / 'crashed'}"])), first_node_id=FIRST_NODE_ID + 1000)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")
    for run in ("straight", "crashed"):
        records = (tmp_path / run / "metrics.jsonl").read_text()
        assert '"hn_steps_from_stored_delta"' in records
    hn = {run: sorted((tmp_path / run / "pfedla").glob("hn-*.v000004.npz")) for run in ("straight", "crashed")}
    assert [p.name for p in hn["straight"]] == [p.name for p in hn["crashed"]] and hn["straight"]
    for a, b in zip(hn["straight"], hn["crashed"]):
        with np.load(a) as x, np.load(b) as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)


def test_stored_delta_steps_do_not_depend_on_the_group_size(tmp_path, monkeypatch):
    """Unsampled clients are stepped in groups (one pass over the store per group): the group size changes nothing."""
    import fedlayer.methods.pfedla.strategy as module

    params = []
    for group_bytes in (module.STORED_DELTA_GROUP_BYTES, 1):  # all in one group; one client per group
        monkeypatch.setattr(module, "STORED_DELTA_GROUP_BYTES", group_bytes)
        strategy = _strategy(tmp_path / str(group_bytes), hn_lr=1e-2, hn_step="all", k=1)
        _round(strategy, 1, [0, 1, 2], seed=20)
        _round(strategy, 2, [1], seed=30)
        assert strategy.round_record(2)["hn_steps_from_stored_delta"] == 2
        params.append([_params(strategy, c) for c in range(N)])
    for grouped, single in zip(*params):
        assert all(torch.allclose(grouped[name], single[name], rtol=1e-6, atol=1e-7) for name in grouped)
