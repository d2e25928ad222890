"""TLS and SuperNode authentication on loopback, set up the documented way.

Certificates and keys come from ``scripts/generate_certs.sh``, keys are
registered with its ``-r`` mode (``flwr supernode register``), the SuperLink
runs with TLS and ``--enable-supernode-auth``, and clients start through the
``fedlayer-client`` command. A node with an unregistered key, a client that
does not trust the server's certificate and a plain-text client are all turned
away. Registered nodes completing a run is the walkthrough's test
(``test_walkthrough.py``), which runs the same setup as docs/deployment.md has it;
here a registered node's claim of another client's id is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedlayer.server.checkpoint import CheckpointStore
from fedlayer.server.rundir import RunDirectory

from .deployment import (
    REPO_ROOT,
    LocalDeployment,
    ManagedProcess,
    TlsFiles,
    free_ports,
    needs_cert_tools,
)

pytestmark = [pytest.mark.e2e, needs_cert_tools]

SCRIPT = REPO_ROOT / "scripts" / "generate_certs.sh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """CA, SuperLink certificate and three node key pairs (sn0, sn1 registered later; sn2 never)."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(SCRIPT), "-o", str(out), "-n", "3"], check=True, capture_output=True)
    return out


@pytest.fixture
def deployment(local_deployment, certs) -> LocalDeployment:
    """A SuperLink with TLS and node authentication on."""
    tls = TlsFiles(ca_cert=certs / "ca.crt", server_cert=certs / "server.pem", server_key=certs / "server.key")
    deployment = local_deployment(tls=tls, node_auth=True)
    deployment.start_superlink()
    return deployment


def register(deployment: LocalDeployment, certs: Path, *names: str) -> None:
    keys = [str(certs / "keys" / f"{name}.pub") for name in names]
    done = subprocess.run(
        ["bash", str(SCRIPT), "-o", str(certs), "-r", deployment.connection, *keys],
        env=deployment.env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("registered") == len(names), done.stdout


def start_client(deployment: LocalDeployment, name: str, *args: str) -> ManagedProcess:
    """``fedlayer-client <args>`` against the deployment's SuperLink."""
    (port,) = free_ports(1)
    command = [sys.executable, "-c", "from fedlayer.commands.deploy import client_main; client_main()"]
    return deployment.start(name, [*command, "--server", deployment.fleet_address, "--port", str(port), *args])


def registered_nodes(deployment: LocalDeployment) -> list[dict]:
    done = deployment.flwr("supernode", "list", deployment.connection, "--format", "json")
    return json.loads(done.stdout)["nodes"]


def test_unregistered_key_is_refused(deployment, certs):
    register(deployment, certs, "sn0")
    intruder = start_client(
        deployment, "intruder",
        "--ca-cert", str(certs / "ca.crt"), "--node-key", str(certs / "keys" / "sn2"),
        "--partition-id", "0", "--num-partitions", "2",
    )
    assert intruder.wait_exit(120) not in (None, 0), deployment.logs_text()  # exits in ~10 s; slower under load
    assert "Failed to activate SuperNode" in intruder.log_text()
    # fedlayer-client ends with what to do, naming the key to register
    hint = intruder.log_text().strip().splitlines()[-1]
    assert "fedlayer-client: the SuperLink refused this node: its key is not registered" in hint, intruder.log_text()
    assert f"`flwr supernode register {certs / 'keys' / 'sn2.pub'} <connection>`" in hint
    superlink = deployment.processes[0]
    assert "No SuperNode found with the given public key" in superlink.log_text()
    assert len(registered_nodes(deployment)) == 1  # the intruder did not become a node


def test_untrusted_server_certificate_names_the_ca_file(deployment, certs, tmp_path):
    other = tmp_path / "other-ca"
    subprocess.run(["bash", str(SCRIPT), "-o", str(other), "-n", "0"], check=True, capture_output=True)
    client = start_client(
        deployment, "wrong-ca",
        "--ca-cert", str(other / "ca.crt"), "--node-key", str(certs / "keys" / "sn0"),
        "--partition-id", "0", "--num-partitions", "2",
    )
    assert client.wait_exit(120) not in (None, 0), deployment.logs_text()
    hint = client.log_text().strip().splitlines()[-1]
    assert f"fedlayer-client: the SuperLink's TLS certificate did not verify against --ca-cert {other / 'ca.crt'}" in hint, client.log_text()


def test_plain_text_is_refused(deployment, certs):
    register(deployment, certs, "sn0")
    plain = start_client(deployment, "plain", "--insecure", "--partition-id", "0", "--num-partitions", "2", "--", "--max-retries", "2")
    assert plain.wait_exit(60) not in (None, 0), deployment.logs_text()
    assert "could not establish a connection" in plain.log_text()
    assert "Activated node_id" not in deployment.processes[0].log_text()
    # the Control API refuses plain text as well
    # (`flwr ... --format json` exits 0 either way and says so in the JSON)
    refused = json.loads(deployment.flwr("ls", f"{deployment.connection}-plain", "--format", "json", timeout=60).stdout)
    assert refused["success"] is False and "unavailable" in refused["error-message"], refused
    assert json.loads(deployment.flwr("ls", deployment.connection, "--format", "json").stdout)["success"] is True


def test_a_registered_node_cannot_take_another_clients_id(deployment, certs, tmp_path):
    """Client ids are bound to the keys that first claimed them, and the bindings outlive the run's process.

    sn0 and sn1 (partitions 0 and 1) run one round; sn1 leaves; sn2, registered
    as well, claims partition 1 and the run is resumed for a second round:
    sn2 is refused (logged, counted, never sampled) and round 2 runs with sn0.
    """
    register(deployment, certs, "sn0", "sn1", "sn2")

    def client(name: str, partition: int) -> ManagedProcess:
        return start_client(deployment, name, "--ca-cert", str(certs / "ca.crt"), "--node-key", str(certs / "keys" / name),
                            "--partition-id", str(partition), "--num-partitions", "2")

    client("sn0", 0)
    sn1 = client("sn1", 1)
    run_dir = tmp_path / "runs" / "bound"

    def run_config(more: str) -> str:
        overrides = (f"federation.num_clients=2 federation.min_train_nodes=1 train.local_steps=2 evaluation.max_examples=100 "
                     f"output_dir={run_dir.parent} run_name={run_dir.name} {more}")
        return f"strategy='fedavg' dataset='digits' model='linear' overrides='{overrides}'"

    _, done = deployment.run_app(run_config("federation.rounds=1"), timeout=240)
    assert CheckpointStore(run_dir).latest().round == 1, done.stdout[-3000:] + deployment.logs_text()
    sn1.popen.terminate()  # fedlayer-client passes SIGTERM on: the SuperNode signs off
    assert sn1.wait_exit(60) is not None
    client("sn2", 1)
    _, done = deployment.run_app(run_config(f"federation.rounds=2 resume={run_dir}"), timeout=240)

    checkpoint = CheckpointStore(run_dir).latest()
    assert checkpoint.round == 2, done.stdout[-3000:] + deployment.logs_text()
    refused = [r for r in checkpoint.extra["rejections"] if "client id 1 is bound to another node's key" in r["reason"]]
    assert refused and {r["round"] for r in refused} == {2}, checkpoint.extra["rejections"]
    second = RunDirectory(run_dir).read_metrics()[1]
    assert second["replies"] == 1 and second["rejected"] == len(refused) == 1, second  # round 2: sn0 only
    assert set(checkpoint.strategy_state["identity"]["bindings"]) == {"0", "1"}  # sn1 keeps client 1
