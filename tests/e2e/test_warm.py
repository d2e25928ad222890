"""``fedlayer-client`` with its warm worker in a real deployment (issue 27): the worker answers every message.

Two ``fedlayer-client`` SuperNodes (each starting its SuperNode, through
``fedlayer.client.supernode_launcher`` with its 0.2 s idle poll, and its warm
worker) on 127.0.0.1, FedAvg on digits with the linear model, 2 rounds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .deployment import LocalDeployment, ManagedProcess, executable, free_ports

pytestmark = [pytest.mark.e2e]
NODES = 2


def start_clients(deployment: LocalDeployment, tmp_path: Path, cold: bool = False) -> list[ManagedProcess]:
    """``fedlayer-client`` per node, each with its own state folder; returns once the workers listen."""
    clients = []
    for node in range(NODES):
        (port,) = free_ports(1)
        args = [executable("fedlayer-client"), "--insecure", "--server", deployment.fleet_address, "--port", str(port),
                "--partition-id", str(node), "--num-partitions", str(NODES), "--state-dir", str(tmp_path / f"node-{node}")]
        clients.append(deployment.start(f"client-{node}", args + (["--cold"] if cold else [])))
    if not cold:
        for client in clients:
            deployment.wait_for_log(client, "warm worker: ready on", timeout=180)
    return clients


def run_config(output_dir: Path, rounds: int) -> str:
    overrides = [f"federation.num_clients={NODES}", f"federation.rounds={rounds}", f"federation.min_train_nodes={NODES}",
                 "train.local_steps=20", "evaluation.max_examples=300", f"output_dir={output_dir}", "run_name=run"]
    return f"strategy='fedavg' dataset='digits' model='linear' overrides='{' '.join(overrides)}'"


def test_fedlayer_client_serves_every_message_from_its_warm_worker(local_deployment, tmp_path):
    deployment = local_deployment()
    deployment.start_superlink()
    clients = start_clients(deployment, tmp_path)
    started = time.monotonic()
    _, done = deployment.run_app(run_config(tmp_path / "runs", rounds=2))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["replies"] for r in records] == [NODES, NODES]
    for client in clients:  # the query and both rounds' training, all warm
        log = client.log_text()
        assert log.count("served train") == 2 and "served query" in log, log[-3000:]
        assert "running cold" not in log
        assert "this SuperNode pulls every 0.2 s when idle" in log and "keeps Flower's 3 s idle sleep" not in log
    print(f"2 warm rounds in {time.monotonic() - started:.1f} s: {[round(r['seconds'], 2) for r in records]}")
