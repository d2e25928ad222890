"""One-command starts for a deployment: ``fedlayer-server`` and ``fedlayer-client``.

Both are thin wrappers that check their inputs and build the
``flower-superlink`` / ``flower-supernode`` command line. ``fedlayer-server``
replaces itself with it (so signals reach Flower directly, e.g. as PID 1 in a
container), by default through ``fedlayer.commands.quiet_superlink``, which drops
uvicorn's per-request access log (``--verbose`` keeps it). ``fedlayer-client``
runs the SuperNode as its child, forwards SIGTERM to it, passes its output
through, and when that output shows the SuperLink refusing the node's key or a
failed TLS verification, ends with a one-line hint naming the fix. It starts
the SuperNode through ``fedlayer.client.supernode_launcher``, which shortens
Flower's hard-coded 3 s idle sleep to ``--idle-poll`` (0.2 s), and its 1 s
first object-pull backoff and 0.5 s reply wait to 0.05 s. Next to the SuperNode it keeps a warm worker running
(``fedlayer.client.warm``; ``--cold`` turns it off), which answers the
ClientApp's messages from one long-lived process. Each option
can also come from an environment variable (``FEDLAYER_*``), which is how the
compose file configures them. ``--print-command`` prints the command instead
of running it.

    fedlayer-server --certs certs --state state.db
    fedlayer-client --server fl.example.org:9092 --ca-cert certs/ca.crt \\
        --node-key certs/keys/sn0 --data ~/my-images --device auto

TLS and SuperNode authentication are on by default; ``--insecure`` (plain
text, no authentication) exists only for tests on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from fedlayer.client.supernode_launcher import FLOWER_IDLE_SLEEP
from fedlayer.client.warm.supervise import WorkerSupervisor

FLEET_PORT = 9092  # SuperLink Fleet API (gRPC): SuperNodes connect here
CONTROL_PORT = 8000  # SuperLink Control API + ServerApp runtime API (HTTP): `flwr` connects here
CLIENTAPP_PORT = 9094  # a SuperNode's local ClientApp runtime API

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
#: How often a SuperNode's SuperExec asks for a ClientApp task to start (Flower's default: 1 s).
#: 0.1 s takes a median 0.5-0.9 s off every message for about 2 CPU-seconds a minute per idle node
#: (docs/deployment.md, "Idle cost"); set by ``fedlayer-client`` for its SuperNode, unless already set.
TASK_POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
#: How often an idle SuperNode pulls for a message (Flower 1.39: a hard-coded 3 s), through
#: ``fedlayer.client.supernode_launcher``; cost and gain in docs/deployment.md ("Idle cost").
IDLE_POLL = 0.2


class DeployError(ValueError):
    """A bad command-line input; the message says which option and why."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"FEDLAYER_{name}")
    return value if value not in (None, "") else default


def _existing_file(path: str | None, option: str) -> Path:
    if path is None:
        raise DeployError(f"{option} is required (or use --insecure for a local test)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DeployError(f"{option}: no such file: {p}")
    return p


def flower_command(name: str) -> str:
    """A Flower command next to this Python (its venv), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


def _check_device(spec: str) -> str:
    if spec in ("auto", "cpu", "cuda") or (spec.startswith("cuda:") and spec[5:].isdigit()):
        return spec
    raise DeployError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def _toml_value(value: str | int) -> str:
    """A node-config value as Flower parses it (TOML: strings quoted)."""
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------- client
def client_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlayer-client",
        description="Start a SuperNode (a fedlayer client on this device) connected to a SuperLink.",
    )
    parser.add_argument("--server", default=_env("SERVER"), help=f"SuperLink Fleet API address host:port (port {FLEET_PORT} by default) [FEDLAYER_SERVER]")
    parser.add_argument("--ca-cert", default=_env("CA_CERT"), help="CA certificate that signed the SuperLink's certificate [FEDLAYER_CA_CERT]")
    parser.add_argument("--node-key", default=_env("NODE_KEY"), help="this node's EC private key (OpenSSH format), public part registered with the SuperLink [FEDLAYER_NODE_KEY]")
    parser.add_argument("--data", default=_env("DATA"), help="this device's own data: an .npz file or a folder of class sub-folders [FEDLAYER_DATA]")
    parser.add_argument("--partition-id", type=int, default=_env("PARTITION_ID"), help="use partition N of the configured dataset instead of --data [FEDLAYER_PARTITION_ID]")
    parser.add_argument("--num-partitions", type=int, default=_env("NUM_PARTITIONS"), help="number of partitions (with --partition-id) [FEDLAYER_NUM_PARTITIONS]")
    parser.add_argument("--device", default=_env("DEVICE", "auto"), help="auto (CUDA when present), cpu, cuda or cuda:N [FEDLAYER_DEVICE]")
    parser.add_argument("--state-dir", default=_env("STATE_DIR"), help="folder where this node keeps its data split and what it carries between rounds, so a fresh ClientApp process reads its split and a restart continues where it was (default: $XDG_CACHE_HOME/fedlayer/<server>-<node>, else ~/.cache/...) [FEDLAYER_STATE_DIR]")
    parser.add_argument("--port", type=int, default=int(_env("CLIENTAPP_PORT", str(CLIENTAPP_PORT)) or CLIENTAPP_PORT), help=f"local port of the ClientApp runtime API (default {CLIENTAPP_PORT}; one per SuperNode on a host) [FEDLAYER_CLIENTAPP_PORT]")
    parser.add_argument("--insecure", action="store_true", default=_env("INSECURE") == "1", help="LOCAL TESTS ONLY: plain-text connection without node authentication [FEDLAYER_INSECURE=1]")
    parser.add_argument("--cold", action="store_true", default=_env("COLD") == "1", help="no warm worker: every message starts Python, imports torch and builds its model afresh (docs/deployment.md, \"Warm worker\") [FEDLAYER_COLD=1]")
    parser.add_argument("--idle-poll", type=float, default=_env("IDLE_POLL", str(IDLE_POLL)), help=f"seconds between an idle SuperNode's pulls for a message (default {IDLE_POLL}; {FLOWER_IDLE_SLEEP} runs Flower's own SuperNode, which waits {FLOWER_IDLE_SLEEP} s; docs/deployment.md, \"Latency\") [FEDLAYER_IDLE_POLL]")
    parser.add_argument("--print-command", action="store_true", help="print the flower-supernode command and exit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flower-supernode options")
    return parser


def client_command(args: argparse.Namespace) -> list[str]:
    """The ``flower-supernode`` command line for parsed ``fedlayer-client`` arguments (through
    ``fedlayer.client.supernode_launcher`` unless ``--idle-poll`` is Flower's own 3 s)."""
    if not args.server:
        raise DeployError("--server is required (the SuperLink's host:port)")
    node: dict[str, str | int] = {}
    if args.data is not None and args.partition_id is not None:
        raise DeployError("give either --data or --partition-id, not both")
    if args.data is not None:
        data = Path(args.data).expanduser().resolve()
        if not data.exists():
            raise DeployError(f"--data: no such file or folder: {data}")
        node["data-path"] = str(data)
    elif args.partition_id is not None:
        if args.num_partitions is None or not 0 <= args.partition_id < args.num_partitions:
            raise DeployError("--partition-id needs --num-partitions N with 0 <= partition-id < N")
        node["partition-id"] = args.partition_id
        node["num-partitions"] = args.num_partitions
    else:
        raise DeployError("give --data PATH (this device's data) or --partition-id/--num-partitions")
    node["device"] = _check_device(args.device)
    node["state-dir"] = str(Path(args.state_dir).expanduser().resolve() if args.state_dir is not None else default_state_dir(args))
    if not 0 < args.idle_poll <= FLOWER_IDLE_SLEEP:
        raise DeployError(f"--idle-poll must be > 0 and <= {FLOWER_IDLE_SLEEP} seconds, got {args.idle_poll}")

    supernode = [flower_command("flower-supernode")] if args.idle_poll == FLOWER_IDLE_SLEEP else [
        sys.executable, "-m", "fedlayer.client.supernode_launcher", "--idle-poll", str(args.idle_poll)]
    command = [
        *supernode,
        "--superlink", args.server,
        "--port", str(args.port),
        "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node.items()),
    ]
    if args.insecure:
        if args.ca_cert or args.node_key:
            raise DeployError("--insecure cannot be combined with --ca-cert/--node-key")
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(_existing_file(args.ca_cert, "--ca-cert"))]
        command += ["--auth-supernode-private-key", str(_existing_file(args.node_key, "--node-key"))]
    extra = list(args.extra)
    return command + (extra[1:] if extra[:1] == ["--"] else extra)


def default_state_dir(args: argparse.Namespace) -> Path:
    """This node's state folder when ``--state-dir`` is not given: ``$XDG_CACHE_HOME/fedlayer/<node>``.

    ``<node>`` names the SuperLink and which client this is (the node key's
    file name, else the partition, else a digest of the data path), so two
    SuperNodes on one host, or one device in two federations, never share a
    folder, and a restarted node finds its own again. Without a state folder
    every message's fresh ClientApp process would split the dataset again.
    ``fedlayer-client`` creates it private (0700): what a node keeps is its own.
    """
    if args.node_key:
        who = f"key-{Path(args.node_key).name}"
    elif args.partition_id is not None:
        who = f"partition-{args.partition_id}-of-{args.num_partitions}"
    else:
        who = "data-" + hashlib.sha256(str(Path(args.data).expanduser().resolve()).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "fedlayer" / re.sub(r"[^A-Za-z0-9._-]", "_", f"{args.server}-{who}")).resolve()


# ---------------------------------------------------------------- server
def server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlayer-server",
        description="Start the SuperLink (TLS and SuperNode authentication on) for fedlayer runs.",
    )
    parser.add_argument("--certs", default=_env("CERTS"), help="folder with ca.crt, server.pem, server.key (scripts/generate_certs.sh) [FEDLAYER_CERTS]")
    parser.add_argument("--state", default=_env("STATE"), help="SQLite file keeping registered nodes and runs across restarts (default: in memory) [FEDLAYER_STATE]")
    parser.add_argument("--fleet-host", default=_env("FLEET_HOST", "0.0.0.0"), help="interface of the Fleet API, where SuperNodes connect (default 0.0.0.0: every interface; 127.0.0.1 keeps it on this machine) [FEDLAYER_FLEET_HOST]")
    parser.add_argument("--fleet-port", type=int, default=int(_env("FLEET_PORT", str(FLEET_PORT)) or FLEET_PORT), help=f"port of the Fleet API (default {FLEET_PORT}) [FEDLAYER_FLEET_PORT]")
    parser.add_argument("--host", default=_env("CONTROL_HOST", "127.0.0.1"), help="interface of the Control/runtime HTTP API (default 127.0.0.1; 0.0.0.0 in a container) [FEDLAYER_CONTROL_HOST]")
    parser.add_argument("--port", type=int, default=int(_env("CONTROL_PORT", str(CONTROL_PORT)) or CONTROL_PORT), help=f"port of the Control/runtime HTTP API (default {CONTROL_PORT}) [FEDLAYER_CONTROL_PORT]")
    parser.add_argument("--no-node-auth", action="store_true", default=_env("NO_NODE_AUTH") == "1", help="accept any SuperNode that trusts the certificate (TLS stays on) [FEDLAYER_NO_NODE_AUTH=1]")
    parser.add_argument("--insecure", action="store_true", default=_env("INSECURE") == "1", help="LOCAL TESTS ONLY: plain text, no node authentication [FEDLAYER_INSECURE=1]")
    parser.add_argument("--verbose", action="store_true", default=_env("VERBOSE") == "1", help="keep the SuperLink's per-request HTTP access log (off by default) [FEDLAYER_VERBOSE=1]")
    parser.add_argument("--print-command", action="store_true", help="print the flower-superlink command and exit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flower-superlink options")
    return parser


def server_command(args: argparse.Namespace) -> list[str]:
    """The ``flower-superlink`` command line for parsed ``fedlayer-server`` arguments."""
    superlink = [flower_command("flower-superlink")] if args.verbose else [sys.executable, "-m", "fedlayer.commands.quiet_superlink"]
    command = [
        *superlink,
        "--fleet-api-address", f"{args.fleet_host}:{args.fleet_port}",
        "--host", args.host,
        "--port", str(args.port),
        # the image already holds fedlayer's dependencies; never pip-install at run time
        "--disable-runtime-dependency-installation",
    ]
    if args.state:
        state = Path(args.state).expanduser()
        if not state.parent.is_dir():
            raise DeployError(f"--state: folder {state.parent} does not exist")
        command += ["--database", str(state)]
    if args.insecure:
        if args.certs:
            raise DeployError("--insecure cannot be combined with --certs")
        command.append("--insecure")
    else:
        if args.certs is None:
            raise DeployError("--certs is required (or use --insecure for a local test)")
        certs = Path(args.certs).expanduser()
        command += [
            "--ssl-ca-certfile", str(_existing_file(str(certs / "ca.crt"), "--certs (ca.crt)")),
            "--ssl-certfile", str(_existing_file(str(certs / "server.pem"), "--certs (server.pem)")),
            "--ssl-keyfile", str(_existing_file(str(certs / "server.key"), "--certs (server.key)")),
        ]
        if not args.no_node_auth:
            command.append("--enable-supernode-auth")
    extra = list(args.extra)
    return command + (extra[1:] if extra[:1] == ["--"] else extra)


# ---------------------------------------------------------------- entry points
def _command_or_exit(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], list[str]], args: argparse.Namespace) -> list[str] | None:
    """The command to run, or None after ``--print-command`` printed it; a bad input exits 2."""
    try:
        command = build(args)
    except DeployError as err:
        parser.error(str(err))
    if args.print_command:
        print(shlex.join(command))
        return None
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    print(f"{parser.prog}: {shlex.join(command)}", file=sys.stderr, flush=True)
    return command


def client_hint(line: str, node_key: str | None, ca_cert: str | None) -> str | None:
    """What to do, in one line, when a SuperNode output line names a known cause; else None.

    Flower reports both causes as "could not establish a connection", which
    reads like a network fault; the line before names the real one.
    """
    if "Failed to activate SuperNode" in line:  # the SuperLink knows no node with this public key
        key = f"{node_key}.pub" if node_key else "this node's public key"
        return (f"the SuperLink refused this node: its key is not registered. On the operator machine run "
                f"`flwr supernode register {key} <connection>` (or `scripts/generate_certs.sh -r <connection> {key}`), then start this client again")
    if "CERTIFICATE_VERIFY_FAILED" in line:
        return (f"the SuperLink's TLS certificate did not verify against --ca-cert {ca_cert}: "
                "give the ca.crt that signed the SuperLink's server.pem (the same certs/ folder from scripts/generate_certs.sh)")
    return None


def _copy_lines(stream: IO[bytes], hint: Callable[[str], str | None], hints: list[str]) -> None:
    """Copy ``stream`` to stderr, collecting the distinct hints its lines trigger."""
    for raw in stream:
        sys.stderr.buffer.write(raw)
        sys.stderr.flush()
        found = hint(raw.decode(errors="replace"))
        if found and found not in hints:
            hints.append(found)


def supervise(command: Sequence[str], hint: Callable[[str], str | None], prog: str) -> int:
    """Run ``command`` as a child, pass its stderr through, end with the hints it triggered.

    Returns the child's exit status (128 + signal when a signal ended it).
    SIGTERM (``docker stop``) is forwarded; SIGINT and SIGHUP from a terminal
    reach the child directly (same process group), so here they only keep
    this process alive until the child has ended. The copy is not read to its
    end: the SuperNode leaves a ``flower-superexec`` behind that still holds
    the pipe, so the child's exit ends the wait.
    """
    child = subprocess.Popen(list(command), stderr=subprocess.PIPE)
    handlers = {
        signal.SIGTERM: lambda signum, _frame: child.send_signal(signum),
        signal.SIGINT: lambda _signum, _frame: None,
        signal.SIGHUP: lambda _signum, _frame: None,
    }
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    hints: list[str] = []
    copier = threading.Thread(target=_copy_lines, args=(child.stderr, hint, hints), daemon=True)
    copier.start()
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    copier.join(timeout=2.0)  # the child's last lines
    for found in hints:
        print(f"{prog}: {found}", file=sys.stderr, flush=True)
    return status if status >= 0 else 128 - status


def client_main(argv: Sequence[str] | None = None) -> None:
    """``fedlayer-client``: start a SuperNode on this device."""
    parser = client_parser()
    args = parser.parse_args(argv)
    command = _command_or_exit(parser, client_command, args)
    if command is not None:
        for key, value in TASK_POLL_ENV.items():  # the SuperNode and its SuperExec inherit it
            os.environ.setdefault(key, value)
        if args.state_dir is None:
            default_state_dir(args).mkdir(mode=0o700, parents=True, exist_ok=True)
        state_dir = Path(args.state_dir).expanduser().resolve() if args.state_dir is not None else default_state_dir(args)
        worker = None if args.cold else WorkerSupervisor(state_dir).start()  # the SuperNode's messages go to it
        try:
            status = supervise(command, lambda line: client_hint(line, args.node_key, args.ca_cert), parser.prog)
        finally:
            if worker is not None:
                worker.stop()
        sys.exit(status)


def server_main(argv: Sequence[str] | None = None) -> None:
    """``fedlayer-server``: start the SuperLink (this process becomes it)."""
    parser = server_parser()
    command = _command_or_exit(parser, server_command, parser.parse_args(argv))
    if command is not None:
        # the ServerApp processes inherit it: identity.bind=auto binds client ids to node keys
        os.environ["FEDLAYER_NODE_AUTH"] = "1" if "--enable-supernode-auth" in command else "0"
        os.execvp(command[0], command)
