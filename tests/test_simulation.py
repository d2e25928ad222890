"""A whole run in Flower's simulation engine: FedAvg on mnist5k with 5 clients."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlayer.server.rundir import RunDirectory

SUMMARY_KEYS = {
    "strategy", "dataset", "partition", "num_clients", "rounds", "seed", "final_accuracy",
    "bytes_up", "bytes_down", "fedavg_bytes_up", "fedavg_bytes_down", "wall_seconds",
}


def run_sim(tmp_path: Path, *overrides: str) -> dict:
    """Run ``fedlayer-sim`` in a subprocess and return its summary."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fedlayer.commands.sim", f"output_dir={tmp_path}", "run_name=run", *overrides],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"run directory {tmp_path / 'run'}" in done.stdout
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.engine
def test_fedavg_mnist5k_three_rounds(tmp_path):
    summary = run_sim(tmp_path, "strategy=fedavg", "dataset=mnist5k", "federation.num_clients=5", "federation.rounds=3")
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["strategy"] == "fedavg" and summary["rounds"] == 3 and summary["num_clients"] == 5
    records = RunDirectory(tmp_path / "run").read_metrics()
    assert [r["round"] for r in records] == [1, 2, 3]
    accuracies = [r["accuracy"] for r in records]
    assert accuracies[-1] > accuracies[0] > 0.2, accuracies  # learns, well above chance (0.1)
    assert summary["final_accuracy"] == accuracies[-1]
    # every client trained every round, and FedAvg is its own FedAvg equivalent
    assert all(r["replies"] == 5 and r["rejected"] == 0 for r in records)
    assert summary["bytes_up"] == summary["fedavg_bytes_up"] > 5 * 3 * 1_663_370 * 4
    assert summary["bytes_down"] == summary["fedavg_bytes_down"]
    # the clients' own measurements agree with the server's (the traffic record itself is the gap)
    assert abs(summary["client_reported_down"] - summary["bytes_down"]) < 0.001 * summary["bytes_down"]
    assert abs(summary["client_reported_up"] - summary["bytes_up"]) < 0.001 * summary["bytes_up"]
    assert set(records[0]["layer_bytes_up"]) == {"blocks.0.conv", "blocks.1.conv", "head.fc1", "head.fc2"}
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 1000
    # the ServerApp in the engine wrote TensorBoard events and the client health
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    clients = (tmp_path / "run" / "clients.csv").read_text().splitlines()
    assert len(clients) == 6 and all(line.split(",")[2:4] == ["3", "3"] for line in clients[1:])


@pytest.mark.engine
def test_bad_config_fails_at_start_naming_the_field(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "fedlayer.commands.sim", f"output_dir={tmp_path}", "federation.rounds=0"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "federation.rounds" in done.stderr + done.stdout
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
