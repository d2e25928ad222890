"""One-command starts for a deployment: ``fedlayer-server`` and ``fedlayer-client``.

Both are thin wrappers that check their inputs, build the ``flower-superlink``
/ ``flower-supernode`` command line and replace themselves with it (so signals
reach Flower directly, e.g. as PID 1 in a container). Each option can also come
from an environment variable (``FEDLAYER_*``), which is how the compose file
configures them. ``--print-command`` prints the command instead of running it.

    fedlayer-server --certs certs --state state/superlink.db
    fedlayer-client --server fl.example.org:9092 --ca-cert certs/ca.crt \\
        --node-key certs/keys/sn0 --data ~/my-images --device auto

TLS and SuperNode authentication are on by default; ``--insecure`` (plain
text, no authentication) exists only for tests on one machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

FLEET_PORT = 9092  # SuperLink Fleet API (gRPC): SuperNodes connect here
CONTROL_PORT = 8000  # SuperLink Control API + ServerApp runtime API (HTTP): `flwr` connects here
CLIENTAPP_PORT = 9094  # a SuperNode's local ClientApp runtime API

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


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


def _flower_command(name: str) -> str:
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
    parser.add_argument("--state-dir", default=_env("STATE_DIR"), help="folder where this node saves what it keeps between rounds, so a restart continues where it was [FEDLAYER_STATE_DIR]")
    parser.add_argument("--port", type=int, default=int(_env("CLIENTAPP_PORT", str(CLIENTAPP_PORT)) or CLIENTAPP_PORT), help=f"local port of the ClientApp runtime API (default {CLIENTAPP_PORT}; one per SuperNode on a host) [FEDLAYER_CLIENTAPP_PORT]")
    parser.add_argument("--insecure", action="store_true", default=_env("INSECURE") == "1", help="LOCAL TESTS ONLY: plain-text connection without node authentication [FEDLAYER_INSECURE=1]")
    parser.add_argument("--print-command", action="store_true", help="print the flower-supernode command and exit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flower-supernode options")
    return parser


def client_command(args: argparse.Namespace) -> list[str]:
    """The ``flower-supernode`` command line for parsed ``fedlayer-client`` arguments."""
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
    if args.state_dir is not None:
        node["state-dir"] = str(Path(args.state_dir).expanduser().resolve())

    command = [
        _flower_command("flower-supernode"),
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


# ---------------------------------------------------------------- server
def server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlayer-server",
        description="Start the SuperLink (TLS and SuperNode authentication on) for fedlayer runs.",
    )
    parser.add_argument("--certs", default=_env("CERTS"), help="folder with ca.crt, server.pem, server.key (scripts/generate_certs.sh) [FEDLAYER_CERTS]")
    parser.add_argument("--state", default=_env("STATE"), help="SQLite file keeping registered nodes and runs across restarts (default: in memory) [FEDLAYER_STATE]")
    parser.add_argument("--fleet-address", default=_env("FLEET_ADDRESS", f"0.0.0.0:{FLEET_PORT}"), help=f"where SuperNodes connect (default 0.0.0.0:{FLEET_PORT}) [FEDLAYER_FLEET_ADDRESS]")
    parser.add_argument("--host", default=_env("CONTROL_HOST", "127.0.0.1"), help="interface of the Control/runtime HTTP API (default 127.0.0.1; 0.0.0.0 in a container) [FEDLAYER_CONTROL_HOST]")
    parser.add_argument("--port", type=int, default=int(_env("CONTROL_PORT", str(CONTROL_PORT)) or CONTROL_PORT), help=f"port of the Control/runtime HTTP API (default {CONTROL_PORT}) [FEDLAYER_CONTROL_PORT]")
    parser.add_argument("--no-node-auth", action="store_true", default=_env("NO_NODE_AUTH") == "1", help="accept any SuperNode that trusts the certificate (TLS stays on) [FEDLAYER_NO_NODE_AUTH=1]")
    parser.add_argument("--insecure", action="store_true", default=_env("INSECURE") == "1", help="LOCAL TESTS ONLY: plain text, no node authentication [FEDLAYER_INSECURE=1]")
    parser.add_argument("--print-command", action="store_true", help="print the flower-superlink command and exit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flower-superlink options")
    return parser


def server_command(args: argparse.Namespace) -> list[str]:
    """The ``flower-superlink`` command line for parsed ``fedlayer-server`` arguments."""
    command = [
        _flower_command("flower-superlink"),
        "--fleet-api-address", args.fleet_address,
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
def _launch(parser: argparse.ArgumentParser, build, argv: Sequence[str] | None) -> None:
    args = parser.parse_args(argv)
    try:
        command = build(args)
    except DeployError as err:
        parser.error(str(err))
    if args.print_command:
        print(shlex.join(command))
        return
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    print(f"{parser.prog}: {shlex.join(command)}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


def client_main(argv: Sequence[str] | None = None) -> None:
    """``fedlayer-client``: start a SuperNode on this device."""
    _launch(client_parser(), client_command, argv)


def server_main(argv: Sequence[str] | None = None) -> None:
    """``fedlayer-server``: start the SuperLink."""
    _launch(server_parser(), server_command, argv)
