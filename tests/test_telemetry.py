"""TensorBoard events and clients.csv of real in-process runs, read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedlayer.client.app import make_client_app
from fedlayer.config import compose_config, resolve_resume
from fedlayer.errors import ConfigError
from fedlayer.server.loop import FederatedRun
from fedlayer.server.rundir import RunDirectory
from fedlayer.methods.base import Rejection
from fedlayer.server.health import ClientHealth
from fedlayer.server.telemetry import flatten
from tests.conftest import make_reply
from tests.inprocess import InProcessGrid, SimulatedCrash, run_in_process

COMMON = ["dataset=digits", "model=cnn", "train.local_steps=2", "evaluation.max_examples=100", "federation.num_clients=3"]
#: partition 2 names a device that does not exist: every message to it comes back as an error reply
BROKEN = 2


def node_config(p: int) -> dict:
    return {"partition-id": p, "num-partitions": 3, "host": "in-process", **({"device": "tpu"} if p == BROKEN else {})}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``log_dir``: tag -> [(step, value)]."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def f32(pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """``(step, value)`` pairs with each value as TensorBoard stores it (float32)."""
    return [(step, float(np.float32(value))) for step, value in pairs]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run(cfg, **grid_options):
    federated = FederatedRun(cfg)
    federated.run(InProcessGrid(make_client_app(cfg), 3, node_config=node_config, **grid_options))
    return federated


@pytest.fixture(scope="module")
def fedlama_run(tmp_path_factory):
    """A finished 2-round FedLAMA run (client 2 broken): the run and its directory."""
    root = tmp_path_factory.mktemp("fedlama")
    cfg = compose_config([*COMMON, "strategy=fedlama", "strategy.min_round_to_adjust=1", f"output_dir={root}",
                          "run_name=run", "federation.rounds=2", "federation.min_replies=1"])
    return run(cfg), root / "run"


def test_events_and_clients_csv_equal_the_metrics_and_the_ledger(fedlama_run):
    federated, run_dir = fedlama_run
    lines = RunDirectory(run_dir).read_metrics()
    tb = scalars(run_dir / "tb")

    def series(tag: str) -> list[tuple[int, float]]:
        return tb[tag]

    rounds = [line["round"] for line in lines]
    assert series("accuracy/central") == f32([(r["round"], r["accuracy"]) for r in lines])
    assert series("loss/central") == f32([(r["round"], r["loss"]) for r in lines])
    up = [r["bytes_up"] for r in lines]
    down = [r["bytes_down"] for r in lines]
    assert series("traffic/bytes_up") == f32(list(zip(rounds, up)))
    assert series("traffic/bytes_down_cumulative") == f32([(rounds[0], down[0]), (rounds[1], down[0] + down[1])])
    for layer, nbytes in lines[1]["layer_bytes_up"].items():
        assert series(f"layer_bytes_up/{layer}")[1:] == f32([(2, nbytes)])
        assert series(f"layer_bytes_up_cumulative/{layer}")[1:] == f32([(2, nbytes + lines[0]["layer_bytes_up"].get(layer, 0))])
    fedavg = sum(r["fedavg_bytes_up"] + r["fedavg_bytes_down"] for r in lines)
    assert series("traffic/share_of_fedavg_cumulative")[-1:] == f32([(2, (sum(up) + sum(down)) / fedavg)])
    assert series("replies/error_replies") == [(r["round"], r["error_replies"]) for r in lines] and lines[0]["error_replies"] == 1
    assert series("replies/rejected") == [(r["round"], r["rejected"]) for r in lines]
    # FedLAMA's own numbers, flattened under its name
    method = flatten(lines[1]["strategy"], "fedlama")
    assert method and {tag: series(tag)[-1:] for tag in method} == {tag: f32([(2, value)]) for tag, value in method.items()}
    # each client's training loss is its reply's
    assert {tag for tag in tb if tag.startswith("client_train_loss/")} == {"client_train_loss/0", "client_train_loss/1"}
    # and its training time, as the client measured it
    assert {tag for tag in tb if tag.startswith("client_train_seconds/")} == {"client_train_seconds/0", "client_train_seconds/1"}
    assert all(seconds > 0 for _, seconds in series("client_train_seconds/0"))
    # accuracy against cumulative bytes: the step is the traffic so far
    by_bytes = scalars(run_dir / "tb" / "by_bytes")["accuracy_vs_bytes/central"]
    assert by_bytes == f32([(up[0] + down[0], lines[0]["accuracy"]), (sum(up) + sum(down), lines[1]["accuracy"])])

    rows = {int(row["client"]): row for row in read_csv(run_dir / "clients.csv")}
    assert sorted(rows) == [0, 1, 2]
    totals = federated.ledger.totals()
    assert sum(int(r["bytes_up"]) for r in rows.values()) == totals["bytes_up"]
    assert sum(int(r["bytes_down"]) for r in rows.values()) == totals["bytes_down"]
    assert [(rows[c]["rounds_sampled"], rows[c]["replies"], rows[c]["error_replies"]) for c in (0, 1, 2)] == [
        ("2", "2", "0"), ("2", "2", "0"), ("2", "0", "2")]
    refused = [r for r in federated.strategy.rejections if federated.strategy.client_id(r.node_id) == BROKEN]
    assert int(rows[BROKEN]["refusals"]) == len(refused) == 2 and refused[0].reason in rows[BROKEN]["refusal_reasons"]
    assert rows[0]["host"] == "in-process" and float(rows[0]["median_round_trip_seconds"]) > 0
    assert rows[BROKEN]["median_round_trip_seconds"] == ""
    for client in (0, 1):  # the median of the client's two rounds, as TensorBoard shows them
        trained = [seconds for _, seconds in series(f"client_train_seconds/{client}")]
        assert float(rows[client]["median_train_seconds"]) == pytest.approx(np.median(trained), rel=1e-5)
    assert rows[BROKEN]["median_train_seconds"] == ""
    # the run's metrics do not average the training time: two equal runs write equal lines
    assert all("train-seconds" not in line["train"] for line in lines)


def test_only_accepted_replies_training_time_counts():
    health = ClientHealth()
    for node, seconds in ((11, 0.5), (12, 9.0)):
        health.sent(Message(RecordDict(), dst_node_id=node, message_type="train"), 100)
        health.replied(make_reply(node, None, metrics={"train-seconds": seconds}), 50, 0.75)
    refused = Rejection(round=1, node_id=12, reason="layers not requested")
    steps = health.end_round({11: 0, 12: 1}, [refused])
    assert (steps[0].train_seconds, steps[1].train_seconds) == (0.5, None)
    rows = health.rows({})
    assert [(r["median_train_seconds"], r["median_round_trip_seconds"], r["refusals"]) for r in rows] == [
        (0.5, 0.75, 0), (None, 0.75, 1)]


def test_a_tensorboard_server_serves_the_runs_scalars(fedlama_run):
    """The real ``tensorboard`` (its default data loader) on a loopback port, read through its HTTP API."""
    _, run_dir = fedlama_run
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir / "tb"), "--host", "127.0.0.1",
                               "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = next(m.group(0) for line in server.stderr if (m := re.search(r"http://127\.0\.0\.1:\d+", line)))

        def get(path: str):
            with urllib.request.urlopen(url + path, timeout=10) as response:
                return json.load(response)

        deadline = time.monotonic() + 30
        while "accuracy/central" not in get("/data/plugin/scalars/tags").get(".", {}) and time.monotonic() < deadline:
            time.sleep(0.5)
        lines = RunDirectory(run_dir).read_metrics()
        served = lambda run, tag: [(step, value) for _, step, value in get(f"/data/plugin/scalars/scalars?run={run}&tag={tag}")]  # noqa: E731
        assert served(".", "accuracy/central") == f32([(r["round"], r["accuracy"]) for r in lines])
        assert served(".", "traffic/bytes_up") == f32([(r["round"], r["bytes_up"]) for r in lines])
        assert served(".", "replies/rejected") == f32([(r["round"], r["rejected"]) for r in lines])
        assert [step for step, _ in served("by_bytes", "accuracy_vs_bytes/central")][-1] == sum(r["bytes_up"] + r["bytes_down"] for r in lines)
        assert "fedlama/cohort_size" in get("/data/plugin/scalars/tags")["."]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_events_are_on_disk_after_a_round_and_a_resumed_run_continues_them(tmp_path):
    """Round 1's scalars are readable while round 2 runs (here: when the server dies in it);
    the resumed run continues the events (no duplicate of the lost round) and the client totals."""
    common = [*COMMON, f"output_dir={tmp_path}", "federation.rounds=3", "federation.min_replies=1", "run_name=run"]
    with pytest.raises(SimulatedCrash):
        run(compose_config(common), crash_at=(2, 1))
    run_dir = tmp_path / "run"
    assert scalars(run_dir / "tb")["accuracy/central"] == f32([(1, RunDirectory(run_dir).read_metrics()[0]["accuracy"])])
    assert [row["rounds_sampled"] for row in read_csv(run_dir / "clients.csv")] == ["1", "1", "1"]

    resumed = run(resolve_resume(compose_config([f"resume={run_dir}"])))
    lines = RunDirectory(run_dir).read_metrics()
    tb = scalars(run_dir / "tb")
    assert tb["accuracy/central"] == f32([(r["round"], r["accuracy"]) for r in lines])
    up = [r["bytes_up"] for r in lines]
    assert tb["traffic/bytes_up_cumulative"] == f32([(1, up[0]), (2, up[0] + up[1]), (3, sum(up))])
    rows = read_csv(run_dir / "clients.csv")
    assert [(r["rounds_sampled"], r["replies"], r["refusals"]) for r in rows] == [("3", "3", "0"), ("3", "3", "0"), ("3", "0", "3")]
    assert sum(int(r["bytes_up"]) for r in rows) == resumed.ledger.totals()["bytes_up"]


def test_a_resumed_run_replaces_the_events_of_the_rounds_it_redoes(tmp_path):
    """Round 2's events are written, its checkpoint is not (the server died in between): the resumed
    run redoes round 2, and TensorBoard shows each round once, with the values of metrics.jsonl."""
    linear = ["dataset=digits", "model=linear", "train.local_steps=1", "evaluation.max_examples=50", "federation.num_clients=2"]
    run_in_process(compose_config([*linear, f"output_dir={tmp_path}", "run_name=run", "federation.rounds=2"]))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "round-000002.ckpt").unlink()
    run_in_process(resolve_resume(compose_config([f"resume={run_dir}", "federation.rounds=3"])))
    lines = RunDirectory(run_dir).read_metrics()
    totals = np.cumsum([r["bytes_up"] + r["bytes_down"] for r in lines]).tolist()
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert scalars(run_dir / "tb")["accuracy/central"] == f32([(r["round"], r["accuracy"]) for r in lines])
    assert scalars(run_dir / "tb" / "by_bytes")["accuracy_vs_bytes/central"] == f32(list(zip(totals, (r["accuracy"] for r in lines))))


def test_tensorboard_off_writes_no_events_but_clients_csv(tmp_path):
    run_in_process(compose_config(["dataset=digits", "model=linear", "train.local_steps=1", "evaluation.max_examples=50",
                                   "federation.num_clients=2", "federation.rounds=1", f"output_dir={tmp_path}",
                                   "run_name=off", "logging.tensorboard=false"]))
    assert not (tmp_path / "off" / "tb").exists()
    assert [row["client"] for row in read_csv(tmp_path / "off" / "clients.csv")] == ["0", "1"]


def test_a_bad_logging_value_fails_at_start_naming_the_field():
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        compose_config(["logging.tensorboard=sometimes"])


def test_mlflow_run_holds_the_config_the_rounds_the_summary_and_the_files(tmp_path):
    from mlflow.tracking import MlflowClient

    _, summary = run_in_process(compose_config(["dataset=digits", "model=linear", "train.local_steps=1", "evaluation.max_examples=50",
                                                "federation.num_clients=2", "federation.rounds=2", f"output_dir={tmp_path}",
                                                "run_name=ml", "logging.mlflow=true", "logging.tensorboard=false"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store: offline, in output_dir
    run = client.get_run(json.loads((tmp_path / "ml" / "mlflow.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ml"
    assert run.data.params["federation.rounds"] == "2" and run.data.params["strategy.name"] == "fedavg"
    lines = RunDirectory(tmp_path / "ml").read_metrics()
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("accuracy/central") == [(r["round"], r["accuracy"]) for r in lines]
    assert history("traffic/bytes_up") == [(r["round"], r["bytes_up"]) for r in lines]
    assert run.data.metrics["summary/final_accuracy"] == summary["final_accuracy"]
    files = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"summary.json", "config.yaml", "clients.csv", "plots/accuracy.png"} <= files


@pytest.mark.parametrize("method", ["fedavg", "fedlp", "laq", "fll", "pfedla", "local"])
def test_every_methods_clients_report_their_training_time(tmp_path, method):
    """FedLAMA's is checked above; the other methods' clients (their own train handlers too) report it."""
    cfg = compose_config(["dataset=digits", "model=cnn", "train.local_steps=2", "evaluation.max_examples=100",
                          "federation.num_clients=2", "federation.rounds=1", f"strategy={method}",
                          f"output_dir={tmp_path}", "run_name=run", "logging.tensorboard=false"])
    FederatedRun(cfg).run(InProcessGrid(make_client_app(cfg), 2, node_config=lambda p: {"partition-id": p, "num-partitions": 2}))
    rows = read_csv(tmp_path / "run" / "clients.csv")
    assert len(rows) == 2 and all(float(row["median_train_seconds"]) > 0 for row in rows)
