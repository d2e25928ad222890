"""Faults in a real deployment: a SuperNode dies and comes back; the SuperLink restarts.

Each test runs FedAvg over real gRPC on 127.0.0.1, injects the fault while
rounds are running (SIGKILL to a whole process tree), and checks that the run
finishes, that nothing was lost or counted twice, and that the model is intact.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedlayer.server.checkpoint import CheckpointStore
from fedlayer.server.rundir import RunDirectory

from .deployment import ManagedProcess, executable, process_tree, signal_tree

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _run_config(
    run_dir: Path, rounds: int, num_clients: int, min_available: int = 1, extra: str = "", round_timeout: int = 60
) -> str:
    overrides = (
        f"federation.num_clients={num_clients} federation.rounds={rounds} federation.min_train_nodes=1 "
        f"federation.min_available_nodes={min_available} federation.round_timeout={round_timeout} train.local_steps=10 "
        f"evaluation.max_examples=300 output_dir={run_dir.parent} run_name={run_dir.name} {extra}"
    )
    return f"strategy='fedavg' dataset='mnist5k' overrides='{overrides.strip()}'"


def _start_run(deployment, run_config: str) -> ManagedProcess:
    """``flwr run --stream`` in the background (it follows the run until it ends)."""
    args = [executable("flwr"), "run", str(Path(__file__).resolve().parents[2]), deployment.connection, "--stream", "--run-config", run_config]
    return deployment.start(f"flwr-run-{len(deployment.processes)}", args)


def _rounds_done(run_dir: Path) -> list[dict]:
    return RunDirectory(run_dir).read_metrics() if run_dir.exists() else []


def _wait_rounds(
    run_dir: Path, count: int, deployment, timeout: float = 240, done: Callable[[list[dict]], bool] | None = None
) -> list[dict]:
    """The run's metrics once ``count`` rounds are done (and ``done(records)`` holds)."""
    deadline = time.monotonic() + timeout
    while len(records := _rounds_done(run_dir)) < count or (done is not None and not done(records)):
        assert time.monotonic() < deadline, f"only {len(records)} rounds after {timeout} s\n{deployment.logs_text()}"
        time.sleep(0.2)
    return records


def _kill(process: ManagedProcess) -> None:
    """SIGKILL a process and everything it started (ClientApps, SuperExec)."""
    signal_tree(process_tree([process.popen.pid]), signal.SIGKILL)
    process.wait_exit(10)


def test_supernode_killed_mid_run_then_rejoins(local_deployment, tmp_path):
    deployment = local_deployment()
    deployment.start_superlink()
    # each node keeps its data split in its state folder, as a deployed device would
    def node_config(p: int) -> dict:
        return {"partition-id": p, "num-partitions": 3, "state-dir": str(tmp_path / f"node-{p}")}

    nodes = [deployment.start_supernode(node_config(p)) for p in range(3)]
    run_dir = tmp_path / "runs" / "faults"
    runner = _start_run(deployment, _run_config(run_dir, rounds=5, num_clients=3))

    first = _wait_rounds(run_dir, 1, deployment)
    assert first[0]["replies"] == 3
    _kill(nodes[2])
    # a round goes on without it (after the round timeout), then it comes back
    _wait_rounds(run_dir, 2, deployment, done=lambda records: any(r["replies"] == 2 for r in records[1:]))
    deployment.start_supernode(node_config(2), name="supernode-2-again")
    assert runner.wait_exit(300) == 0, deployment.logs_text()

    records = _rounds_done(run_dir)
    assert [r["round"] for r in records] == list(range(1, 6))
    assert min(r["replies"] for r in records[1:]) == 2, records  # it was missed while dead
    missed = min(i for i, r in enumerate(records) if r["replies"] == 2)
    assert any(r["replies"] == 3 for r in records[missed + 1:]), records  # and it is back in a later round
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] > first[0]["accuracy"]
    ledger = CheckpointStore(run_dir).latest().ledger_state
    sent = sum(r["messages_down"] for r in ledger.values())
    answered = sum(r["messages_up"] for r in ledger.values())
    assert sent >= answered  # messages to a dead node are counted as sent


def test_a_dead_supernode_never_stalls_the_run(local_deployment, tmp_path):
    """Default federation settings (the first round waits for every client, later rounds go on
    with at least min_train_nodes=2): a SuperNode killed after round 1 never comes back, and the
    run finishes its rounds with the other two, also once the SuperLink lists it offline (after
    its heartbeats stop: at most 60 s, which two round timeouts of 30 s outlast)."""
    deployment = local_deployment()
    deployment.start_superlink()
    nodes = [deployment.start_supernode({"partition-id": p, "num-partitions": 3}) for p in range(3)]
    run_dir = tmp_path / "runs" / "dead-node"
    overrides = (
        f"federation.num_clients=3 federation.rounds=3 federation.round_timeout=30 train.local_steps=10 "
        f"evaluation.max_examples=300 output_dir={run_dir.parent} run_name={run_dir.name}"
    )
    runner = _start_run(deployment, f"strategy='fedavg' dataset='digits' model='linear' overrides='{overrides}'")
    assert _wait_rounds(run_dir, 1, deployment)[0]["replies"] == 3
    _kill(nodes[2])
    killed = time.monotonic()
    assert runner.wait_exit(240) == 0, deployment.logs_text()
    after_kill = time.monotonic() - killed
    records = _rounds_done(run_dir)
    print(f"dead SuperNode: {len(records)} rounds finished, the run ended {after_kill:.1f} s after the kill")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["replies"] - r["error_replies"] == 2 and r["train"] is not None for r in records[1:]), records
    assert json.loads((run_dir / "summary.json").read_text())["final_accuracy"] is not None


def test_superlink_restart_with_database_keeps_nodes_and_run_resumes(local_deployment, tmp_path):
    deployment = local_deployment(database=tmp_path / "superlink.db")
    superlink = deployment.start_superlink()
    for p in range(2):
        deployment.start_supernode({"partition-id": p, "num-partitions": 2, "state-dir": str(tmp_path / f"node-{p}")})
    run_dir = tmp_path / "runs" / "restart"
    runner = _start_run(deployment, _run_config(run_dir, rounds=3, num_clients=2, min_available=2))
    _wait_rounds(run_dir, 2, deployment)
    _kill(superlink)
    runner.wait_exit(30)
    deployment.start_superlink()  # same ports, same database; the SuperNodes reconnect by themselves
    # A SuperNode may first pull a message of the killed run from the database and spend up to a
    # minute before Flower drops it as "not in RUNNING status"; the round timeout must cover that.
    resumed_config = _run_config(run_dir, rounds=3, num_clients=2, min_available=2, extra=f"resume={run_dir}", round_timeout=180)
    resumed = _start_run(deployment, resumed_config)
    assert resumed.wait_exit(300) == 0, deployment.logs_text()

    records = _rounds_done(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]  # nothing lost, nothing twice
    assert all(r["replies"] == 2 for r in records), records  # both nodes served after the restart
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["final_accuracy"] is not None
    assert CheckpointStore(run_dir).latest().round == 3
