"""fedlayer-sim on an existing Ray cluster: two Ray nodes on this machine (Ray's own ``Cluster``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

RUN = ["dataset=digits", "model=linear", "federation.num_clients=4", "train.local_steps=2", "run_name=run"]


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[tuple]:
    """A head and a worker node, one CPU each: one client actor on each.

    Shared by the module's tests (starting a cluster takes a while); the
    node-death test, last in the file, removes the worker.
    """
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        cluster.shutdown()


def _command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "fedlayer.commands.sim", *overrides]


def test_a_simulation_joins_the_cluster_and_runs_on_both_nodes(tmp_path: Path, two_node_cluster):
    cluster, _ = two_node_cluster
    done = subprocess.run(
        _command(*RUN, "federation.rounds=2", f"output_dir={tmp_path}", f"simulation.ray_address={cluster.address}"),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] is not None and summary["rejected_replies"] == 0
    assert len(summary["ray_nodes"]) == 2  # clients ran on both Ray nodes
    print("hosts:", summary["hosts"], "ray nodes:", summary["ray_nodes"])  # shown by pytest -rP
    assert sorted(c for clients in summary["hosts"].values() for c in clients) == [0, 1, 2, 3]


def test_a_ray_node_that_dies_stops_the_run_which_resumes_on_the_rest(tmp_path: Path, two_node_cluster):
    """The worker node is removed after round 1: the run stops with a clear error, and resume= finishes it."""
    cluster, worker = two_node_cluster
    overrides = [*RUN, "federation.rounds=4", f"output_dir={tmp_path}", f"simulation.ray_address={cluster.address}"]
    process = subprocess.Popen(_command(*overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.2)
    cluster.remove_node(worker)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    (line,) = [line for line in stderr.splitlines() if line.startswith("fedlayer-sim: error:")]
    assert "a Ray node left the cluster" in line and f"resume={tmp_path / 'run'}" in line
    stopped_after = len(metrics.read_text().splitlines())
    assert 1 <= stopped_after < 4

    done = subprocess.run(_command(f"resume={tmp_path / 'run'}"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4] and summary["rejected_replies"] == 0
    assert len(summary["ray_nodes"]) == 2  # the head, and the worker of the rounds before it died
