"""A real Flower deployment on 127.0.0.1 for end-to-end tests.

``LocalDeployment`` starts ``flower-superlink`` and ``flower-supernode``
processes (gRPC Fleet API, optionally TLS and SuperNode authentication) with
ports picked at run time, its own ``FLWR_HOME`` and one log file per process,
runs the ``flwr`` CLI against it, and stops every process it started, and
everything those started, when it is closed (use it as a context manager or
through the ``local_deployment`` fixture, so that happens even on failure).

Flower 1.39 layout: the SuperLink serves the Fleet API (gRPC) on one port and
the Control API plus the ServerApp runtime API (HTTP) on another; each
SuperNode serves its ClientApps on its own ``--port``. The SuperLink and every
SuperNode start a ``flower-superexec`` in a new session, which starts one
``flwr-serverapp`` / ``flwr-clientapp`` process per task; teardown finds all of
them through ``/proc`` (parent links and session ids) with the helpers of
``benchmarks/processes.py``, which the deployment benchmarks share.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from benchmarks.processes import (
    alive,
    executable,
    free_ports,
    port_open,
    process_tree,
    signal_tree,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Tests that generate certificates and keys with scripts/generate_certs.sh.
needs_cert_tools = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
    reason="scripts/generate_certs.sh needs openssl and ssh-keygen",
)

#: Environment for every Flower process the tests start.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # SuperExec polls for new ServerApp/ClientApp tasks every 1 s by default.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
    "PYTHONUNBUFFERED": "1",
}


# ------------------------------------------------------------ processes
def _copy_with_time(stream: IO[bytes], log_path: Path) -> None:
    with open(log_path, "wb") as log_file:
        for line in stream:
            log_file.write(time.strftime("%H:%M:%S").encode() + f".{time.time() % 1:.3f}"[2:].encode() + b" " + line)
            log_file.flush()


@dataclass
class ManagedProcess:
    """One process the deployment started, with its combined log file."""

    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def exited(self) -> int | None:
        """Exit code, or None while it runs."""
        return self.popen.poll()

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for it to exit; its exit code or None."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class TlsFiles:
    """What a TLS SuperLink needs, and what clients need to trust it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, plus the ``flwr`` CLI for them.

    Parameters
    ----------
    workdir : Path
        Where ``FLWR_HOME``, logs and anything else of this deployment go.
    tls : TlsFiles, optional
        Serve the Fleet and Control APIs over TLS (else plain text, ``--insecure``).
    node_auth : bool
        Turn on SuperNode authentication (needs ``tls``); nodes need a
        registered key (``register_node``).
    database : Path, optional
        SuperLink state in this SQLite file (else in memory).
    """

    workdir: Path
    tls: TlsFiles | None = None
    node_auth: bool = False
    database: Path | None = None
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.fleet_port, self.control_port = free_ports(2)
        self.connection = "e2e"
        self._write_connection()

    # -------------------------------------------------------- environment
    @property
    def env(self) -> dict[str, str]:
        """Environment of every Flower command of this deployment (with node authentication
        also ``FEDLAYER_NODE_AUTH=1``, as ``fedlayer-server`` sets it: ``identity.bind=auto`` binds to keys; ``fedlayer-client``'s
        default state folders go under the deployment's own folder, ``XDG_CACHE_HOME``)."""
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.flwr_home), "XDG_CACHE_HOME": str(self.workdir / "cache"),
                "FEDLAYER_NODE_AUTH": "1" if self.node_auth else "0"}

    @property
    def fleet_address(self) -> str:
        return f"127.0.0.1:{self.fleet_port}"

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def _write_connection(self) -> None:
        """``config.toml`` with this deployment's connection (TLS when it has TLS),
        plus ``<connection>-plain``: the same address without TLS, for tests
        that must see a plain-text client refused."""
        lines = ["[superlink]", f'default = "{self.connection}"']
        for name, tls in ((self.connection, self.tls), (f"{self.connection}-plain", None)):
            lines += ["", f"[superlink.{name}]", f'address = "{self.control_address}"']
            if tls is None:
                lines.append("insecure = true")
            else:
                lines += ["insecure = false", f'root-certificates = "{tls.ca_cert}"']
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    # -------------------------------------------------------- processes
    def start(self, name: str, args: Sequence[str]) -> ManagedProcess:
        """Start a process in its own session, logging to ``logs/<name>.log``.

        Output lines get a wall-clock time stamp (Flower's own log lines have
        none), which is what one needs to see where a slow round spends time.
        """
        log_path = self.logs / f"{name}.log"
        restarts = 1
        while log_path.exists():  # a restarted process keeps the earlier log
            restarts += 1
            log_path = self.logs / f"{name}-{restarts}.log"
        popen = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.workdir, start_new_session=True,
        )
        threading.Thread(target=_copy_with_time, args=(popen.stdout, log_path), daemon=True).start()
        process = ManagedProcess(name, list(args), log_path, popen)
        self.processes.append(process)
        return process

    def start_superlink(self, timeout: float = 30.0) -> ManagedProcess:
        """Start the SuperLink and wait until both its APIs accept connections."""
        args = [
            executable("flower-superlink"),
            "--fleet-api-address", self.fleet_address,
            "--host", "127.0.0.1", "--port", str(self.control_port),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls is None:
            args.append("--insecure")
        else:
            args += [
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
            ]
        if self.node_auth:
            args.append("--enable-supernode-auth")
        if self.database is not None:
            args += ["--database", str(self.database)]
        process = self.start("superlink", args)
        deadline = time.monotonic() + timeout
        while not (port_open(self.fleet_port) and port_open(self.control_port)):
            if process.exited() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SuperLink did not come up (exit {process.exited()}):\n{process.log_tail()}")
            time.sleep(0.2)
        return process

    def start_supernode(
        self,
        node_config: Mapping[str, Any],
        *,
        name: str | None = None,
        private_key: Path | None = None,
        insecure: bool | None = None,
        max_retries: int | None = None,
    ) -> ManagedProcess:
        """Start a SuperNode with its own ClientApp port.

        ``insecure`` defaults to "plain text when the SuperLink is"; passing it
        explicitly lets a test try the wrong kind of connection.
        """
        (port,) = free_ports(1)
        config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items())
        args = [executable("flower-supernode"), "--superlink", self.fleet_address, "--port", str(port), "--node-config", config]
        if insecure if insecure is not None else self.tls is None:
            args.append("--insecure")
        elif self.tls is not None:
            args += ["--root-certificates", str(self.tls.ca_cert)]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(private_key)]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        return self.start(name or f"supernode-{sum(p.name.startswith('supernode') for p in self.processes)}", args)

    def wait_for_log(self, process: ManagedProcess, pattern: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``pattern`` (a regex) occurs ``count`` times in the process log."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, process.log_text())) < count:
            if process.exited() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.name}: {pattern!r} x{count} not seen (exit {process.exited()}):\n{process.log_tail()}")
            time.sleep(0.2)

    # -------------------------------------------------------- flwr CLI
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``flwr <args>`` with this deployment's FLWR_HOME; output is logged too."""
        done = subprocess.run(
            [executable("flwr"), *args], capture_output=True, text=True, env=self.env, cwd=self.workdir,
            timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )
        with open(self.logs / "flwr-cli.log", "a", encoding="utf-8") as fh:
            fh.write(f"$ flwr {shlex.join(args)}  -> exit {done.returncode}\n{done.stdout}{done.stderr}\n")
        return done

    def run_app(self, run_config: str, app: Path = REPO_ROOT, timeout: float = 300.0) -> tuple[int, subprocess.CompletedProcess]:
        """``flwr run <app> <connection> --stream --run-config ...``: (run id, result).

        ``--stream`` makes the command follow the run's logs until it ends.
        """
        done = self.flwr("run", str(app), self.connection, "--stream", "--run-config", run_config, timeout=timeout)
        match = re.search(r"Successfully started run (\d+)", done.stdout)
        if match is None:
            raise RuntimeError(f"flwr run did not start a run (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return int(match.group(1)), done

    def run_info(self, run_id: int) -> dict[str, Any]:
        """``flwr ls --run-id`` as a dict (status, network traffic, compute time)."""
        done = self.flwr("ls", "--run-id", str(run_id), self.connection, "--format", "json")
        data = json.loads(done.stdout)
        assert data.get("success"), done.stdout
        (run,) = data["runs"]
        return run

    def register_node(self, public_key: Path) -> subprocess.CompletedProcess:
        """``flwr supernode register <public key> <connection>``."""
        return self.flwr("supernode", "register", str(public_key), self.connection)

    # -------------------------------------------------------- teardown
    def logs_text(self, chars: int = 3000) -> str:
        """The tail of every log, for failure messages."""
        parts = [f"----- {p.name} (exit {p.exited()}): {shlex.join(p.args)}\n{p.log_tail(chars)}" for p in self.processes]
        cli = self.logs / "flwr-cli.log"
        if cli.exists():
            parts.append(f"----- flwr CLI\n{cli.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process started here and all their descendants.

        SIGTERM to the started processes first (the SuperLink then stops its
        SuperExec itself), SIGTERM to whatever of the tree is left after
        ``grace`` seconds, SIGKILL after two more.
        """
        roots = [p.popen.pid for p in self.processes]
        tree = process_tree(roots)
        for process in self.processes:
            if process.exited() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            process.wait_exit(max(0.0, deadline - time.monotonic()))
        tree = alive({**tree, **process_tree(tree)})
        signal_tree(tree, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while (tree := alive(tree)) and time.monotonic() < deadline:
            time.sleep(0.1)
        signal_tree(tree, signal.SIGKILL)
        for process in self.processes:
            if process.wait_exit(5.0) is None:
                print(f"warning: {process.name} (pid {process.popen.pid}) did not exit", file=sys.stderr)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fedavg_run_config(output_dir: Path, rounds: int = 2) -> str:
    """A ``--run-config`` for a short FedAvg run on mnist5k with two nodes."""
    overrides = [
        "federation.num_clients=2", f"federation.rounds={rounds}", "federation.min_train_nodes=2",
        # a few local steps keep the run short; learning still shows
        "train.local_steps=20", "evaluation.max_examples=500",
        f"output_dir={output_dir}", "run_name=run",
    ]
    return f"strategy='fedavg' dataset='mnist5k' overrides='{' '.join(overrides)}'"
