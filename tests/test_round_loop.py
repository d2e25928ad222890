"""The round loop's bookkeeping: replies that count, metrics that are JSON, cohorts, identities."""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import traceback
from queue import Queue

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from sklearn.datasets import load_digits

from fedlayer.client.app import make_client_app
from fedlayer.config import compose_config
from fedlayer.layers import states_equal
from fedlayer.methods.base import LayerwiseStrategy
from fedlayer.methods.pfedla import PFedLAStrategy
from fedlayer.wire.records import ASSIGNED_BASE
from fedlayer.server.loop import FederatedRun, RunStopped, duration, progress_line, time_left
from fedlayer.server.rundir import RunDirectory
from benchmarks.faults import sent_message
from tests.conftest import small_state
from tests.inprocess import FIRST_NODE_ID, InProcessGrid

COMMON = ["dataset=digits", "model=linear", "train.local_steps=2", "evaluation.max_examples=100"]


def _strict(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_min_replies_counts_only_replies_without_error(tmp_path):
    """Of two nodes one fails (a bad device in its node config): 1 good reply < min_replies=2."""
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", "run_name=run", "federation.num_clients=2",
                          "federation.rounds=1", "federation.min_replies=2"])
    run = FederatedRun(cfg)
    before = dict(run.strategy.global_state)
    node_config = lambda p: {"partition-id": p, "num-partitions": 2, **({"device": "tpu"} if p == 1 else {})}  # noqa: E731
    run.run(InProcessGrid(make_client_app(cfg), 2, node_config=node_config))
    (record,) = RunDirectory(tmp_path / "run").read_metrics()
    assert record["replies"] == 2 and record["error_replies"] == 1 and record["train"] is None
    assert states_equal(run.strategy.global_state, before)


def test_non_finite_metrics_are_written_as_null_and_counted(tmp_path):
    rundir = RunDirectory(tmp_path)
    replaced = rundir.append_metrics({"round": 1, "train": {"train-loss": float("nan"), "x": np.float32("inf")}, "ok": 1.0})
    assert replaced == ["train.train-loss", "train.x"]
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = _strict(line)
    assert record["train"] == {"train-loss": None, "x": None} and record["nonfinite"] == replaced


def test_federated_evaluation_does_not_change_the_training_cohorts():
    nodes = list(range(100, 110))
    cohorts = []
    for fraction_evaluate in (0.0, 0.5):
        strategy = LayerwiseStrategy(small_state(), fraction_train=0.3, fraction_evaluate=fraction_evaluate, seed=3)
        strategy.client_of = {n: i for i, n in enumerate(nodes)}
        rounds = []
        for server_round in range(1, 5):
            rounds.append(sorted(m.metadata.dst_node_id for m in strategy.configure_train(server_round, nodes)))
            strategy.configure_evaluate(server_round, nodes)
        cohorts.append(rounds)
    assert cohorts[0] == cohorts[1]


def test_constructing_pfedla_creates_no_directory():
    before = set(os.listdir(tempfile.gettempdir()))
    PFedLAStrategy(small_state(), num_clients=3)
    assert set(os.listdir(tempfile.gettempdir())) == before


def test_nodes_without_partition_ids_get_server_assigned_ids_they_keep(tmp_path):
    """Two devices with their own data and their own state folders, no partition ids.

    They get server-assigned client ids (distinct, outside the partition ids),
    keep their state under those ids, and after a restart (new node ids)
    answer the query with them.
    """
    digits = load_digits()
    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.images.astype(np.float32), y=digits.target)
    overrides = [*COMMON, "dataset=local", f"dataset.path={data}", f"output_dir={tmp_path}",
                 "federation.num_clients=2", "federation.rounds=2", "strategy=laq", "strategy.mode=delta", "strategy.alpha=0.5"]
    node_config = lambda p: {"data-path": str(data), "state-dir": str(tmp_path / f"device-{p}")}  # noqa: E731
    identities = []
    for run_name, first_node in (("first", 5_000_000_000_000), ("restarted", 7_000_000_000_000)):
        cfg = compose_config([*overrides, f"run_name={run_name}"])
        run = FederatedRun(cfg)
        summary = run.run(InProcessGrid(make_client_app(cfg), 2, node_config=node_config, first_node_id=first_node))
        assert summary["rejected_replies"] == 0
        identities.append({node - first_node: client for node, client in run.strategy.client_of.items()})
        assert run.strategy.round_record(2)["uploads"] + run.strategy.round_record(2)["skips"] == 2
    assert identities[0] == identities[1] and sorted(identities[0].values()) == [ASSIGNED_BASE, ASSIGNED_BASE + 1]
    for device, client in identities[0].items():
        folder = tmp_path / f"device-{device}"
        assert (folder / "client-id").read_text() == str(client)
        assert (folder / f"client-{client:05d}").is_dir() and not (folder / "partition-00000").exists()


# ------------------------------------------------- no node can stop or stall the run (issue 24, item 6)
def _config(tmp_path, *overrides: str):
    return compose_config([*COMMON, f"output_dir={tmp_path}", "run_name=run", *overrides])


def _node_config(num_nodes: int, **extra: dict):
    """Node configs of ``num_nodes`` partitions; ``extra[p]`` adds to partition ``p``'s."""
    return lambda p: {"partition-id": p, "num-partitions": num_nodes, **extra.get(f"p{p}", {})}


def test_a_client_exception_naming_ActorDiedError_does_not_stop_the_run(tmp_path):
    """In deployment a ClientApp's exception text is the error's reason: it stops nothing."""
    cfg = _config(tmp_path, "federation.num_clients=2", "federation.rounds=2")
    node_config = _node_config(2, p1={"device": "ActorDiedError"})  # its ClientApp raises "... got 'ActorDiedError'"
    summary = FederatedRun(cfg).run(InProcessGrid(make_client_app(cfg), 2, node_config=node_config))
    records = RunDirectory(tmp_path / "run").read_metrics()
    assert [r["round"] for r in records] == [1, 2] and summary["rounds"] == 2
    assert all(r["error_replies"] == 1 and r["train"] is not None for r in records)
    assert not (tmp_path / "run" / "error.txt").exists()


def _engine_error_reply(raised: Exception) -> Message:
    """The reply Flower's simulation engine makes when running a message raised ``raised``
    (its own vce ``worker`` builds it; the backend stands in for the Ray actor pool)."""
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.server.superlink.fleet.vce.vce_api import worker

    class Backend:
        def process_message(self, message, context):
            raise raised

    class Contexts:
        def retrieve_context(self, run_id):
            return Context(run_id=run_id, node_id=7, node_config={}, state=RecordDict(), run_config={})

    sent = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    inbox, outbox, stop = Queue(), Queue(), threading.Event()
    inbox.put(sent)
    thread = threading.Thread(target=worker, args=(inbox, outbox, {7: Contexts()}, Backend(), stop, VceMetrics()))
    thread.start()
    reply = outbox.get(timeout=30)
    stop.set()
    thread.join()
    return reply


def test_only_the_simulation_engines_own_actor_death_stops_the_run(tmp_path):
    import ray.exceptions
    from flwr.clientapp.client_app import ClientAppException

    run = FederatedRun(_config(tmp_path, "federation.num_clients=2"))
    died = _engine_error_reply(ray.exceptions.ActorDiedError())  # what ray.get raises when the actor's node left
    # a ClientApp exception, as the engine's actor wraps it and Ray delivers it
    raised = ClientAppException("RuntimeError: <class 'ray.exceptions.ActorDiedError'>:<'The actor died'>")
    delivered = ray.exceptions.RayTaskError("run", "".join(traceback.format_exception(raised)), raised)
    forged = _engine_error_reply(delivered.as_instanceof_cause())
    assert "ActorDiedError" in died.error.reason and "ActorDiedError" in forged.error.reason
    with pytest.raises(RunStopped, match="Ray actors of 1 clients died"):
        run.stop_if_ray_nodes_died(2, [died, forged], simulation=True)
    run.stop_if_ray_nodes_died(2, [forged], simulation=True)
    run.stop_if_ray_nodes_died(2, [died, forged], simulation=False)  # deployment: never on an error's text


def _run_in_thread(run: FederatedRun, grid: InProcessGrid, timeout: float = 120.0) -> None:
    """``run.run(grid)``; fails the test if it is still running (waiting) after ``timeout`` s."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run.run(grid)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the run still waits after {timeout} s"
    if errors:
        raise errors[0]


def test_a_node_that_dies_after_round_1_does_not_stall_the_run(tmp_path):
    """Default federation settings (wait for every client before round 1, min_train_nodes 2)."""
    cfg = _config(tmp_path, "federation.num_clients=3", "federation.rounds=3")
    grid = InProcessGrid(make_client_app(cfg), 3, node_config=_node_config(3), leave_after={FIRST_NODE_ID + 2: 1})
    _run_in_thread(FederatedRun(cfg), grid)
    records = RunDirectory(tmp_path / "run").read_metrics()
    assert [r["replies"] for r in records] == [3, 2, 2]


def test_waiting_for_nodes_has_a_deadline(tmp_path):
    # before round 1: min_available_nodes (default: every client)
    cfg = _config(tmp_path / "first", "federation.num_clients=3", "federation.wait_timeout=0.5")
    with pytest.raises(RunStopped, match=r"only 2 of the 3 nodes needed \(federation.min_available_nodes\) connected within federation.wait_timeout=0.5 s"):
        FederatedRun(cfg).run(InProcessGrid(make_client_app(cfg), 2, node_config=_node_config(3)))
    assert "federation.wait_timeout" in (tmp_path / "first" / "run" / "error.txt").read_text()
    # later: min_train_nodes (default 2); two of three nodes are gone after round 1
    cfg = _config(tmp_path / "later", "federation.num_clients=3", "federation.rounds=3", "federation.wait_timeout=0.5")
    grid = InProcessGrid(make_client_app(cfg), 3, node_config=_node_config(3), leave_after={FIRST_NODE_ID + 1: 1, FIRST_NODE_ID + 2: 1})
    with pytest.raises(RunStopped, match=r"only 1 of the 2 nodes needed \(federation.min_train_nodes\)"):
        FederatedRun(cfg).run(grid)
    assert [r["round"] for r in RunDirectory(tmp_path / "later" / "run").read_metrics()] == [1]


def test_min_replies_counts_accepted_replies(tmp_path):
    """Two replies without error, one refused (its device's data holds NaN): 1 accepted < min_replies=2."""
    digits = load_digits()
    good, bad = tmp_path / "digits.npz", tmp_path / "nan.npz"
    np.savez(good, x=digits.images.astype(np.float32), y=digits.target)
    np.savez(bad, x=np.full_like(digits.images, np.nan, dtype=np.float32), y=digits.target)
    cfg = _config(tmp_path, "dataset=local", f"dataset.path={good}", "federation.num_clients=2", "federation.rounds=1",
                  "federation.min_replies=2")
    run = FederatedRun(cfg)
    before = dict(run.strategy.global_state)
    run.run(InProcessGrid(make_client_app(cfg), 2, node_config=_node_config(2, p1={"data-path": str(bad)})))
    (record,) = RunDirectory(tmp_path / "run").read_metrics()
    assert record["error_replies"] == 0 and record["rejected"] == 1 and record["train"] is None
    assert "non-finite" in run.strategy.rejections[0].reason
    assert states_equal(run.strategy.global_state, before)


def test_evaluation_replies_are_validated_like_training_replies():
    """Issue 24, item 7: a bad evaluation reply is refused, logged and counted; the mean is the good ones'."""
    strategy = LayerwiseStrategy(small_state(), fraction_evaluate=1.0)
    nodes = list(range(100, 106))
    strategy.client_of = {n: i for i, n in enumerate(nodes)}
    strategy.configure_evaluate(1, nodes)
    good = {"accuracy": 0.5, "loss": 1.0, "num-examples": 10}
    sent = {n: sent_message(strategy, n, MessageType.EVALUATE) for n in nodes}
    bad = [
        {**good, "accuracy": float("nan")},
        {**good, "loss": float("inf")},
        {**good, "accuracy": 7.0},
        {**good, "num-examples": 0},
        {"accuracy": 0.9, "num-examples": 10},  # no loss
    ]
    contents = [good, *bad]
    replies = [Message(RecordDict({"metrics": MetricRecord(c)}), reply_to=sent[n]) for n, c in zip(nodes, contents)]
    assert strategy.aggregate_evaluate(1, replies) == {"accuracy": 0.5, "loss": 1.0, "num-examples": 10.0}
    assert [r.node_id for r in strategy.rejections] == nodes[1:]


def test_the_progress_line_shows_round_k_of_n_elapsed_time_and_time_left():
    record = {"round": 3, "accuracy": 0.5, "bytes_up": 2e6, "bytes_down": 4e6, "replies": 4, "rejected": 1, "seconds": 1.24}
    totals = {"bytes_up": 6e6, "bytes_down": 12e6, "fedavg_bytes_up": 12e6, "fedavg_bytes_down": 24e6}
    line = progress_line(record, 10, totals, elapsed=125.4, eta=3725)
    assert line.startswith("[round 3/10] acc 0.5000") and "50.0% of FedAvg" in line
    assert line.endswith("| 1.2 s | elapsed 2m05s, ETA 1h02m")
    assert [duration(s) for s in (0.4, 59.6, 60, 3599, 7260)] == ["0s", "1m00s", "1m00s", "59m59s", "2h01m"]
    # after round 1 its own pace; then the pace of the rounds after it (round 1 also starts the clients)
    assert time_left([100.0, 147.0], 7) == 7 * 47.0
    assert time_left([100.0, 147.0, 148.0, 150.0], 4) == 4 * 1.5


def test_a_run_logs_its_progress_with_an_estimate_of_the_time_left(tmp_path, caplog):
    cfg = compose_config([*COMMON, f"output_dir={tmp_path}", "run_name=run", "federation.num_clients=2", "federation.rounds=2"])
    node_config = lambda p: {"partition-id": p, "num-partitions": 2}  # noqa: E731
    with caplog.at_level("INFO", logger="flwr"):
        FederatedRun(cfg).run(InProcessGrid(make_client_app(cfg), 2, node_config=node_config))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[round ")]
    assert [line.split("]")[0] for line in lines] == ["[round 1/2", "[round 2/2"]
    assert all(re.search(r"\| elapsed \d+s, ETA \d+s$", line) for line in lines) and lines[-1].endswith("ETA 0s")
