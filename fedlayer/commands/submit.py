"""``fedlayer-run``: submit a run to a SuperLink, follow it, and say how it ended.

    fedlayer-run --connection fedlayer strategy=fedavg dataset=digits federation.rounds=2

``flwr run`` exits 0 even when the ServerApp fails (a bad config value, a
strategy that does not exist): the failure is only in the run's status. This
command submits the run through the Control API with the ``flwr`` CLI (the
same request as ``flwr run``), streams the run's log, waits for its status,
then prints the run directory and the summary line and exits 0, or prints the
ServerApp's error as one line on stderr and exits 1. Tracebacks in the
streamed log are left out unless ``--verbose``.

The overrides are Hydra overrides, as for ``fedlayer-sim``; group choices
(``strategy=``, ``dataset=``, ``model=``) go to their run-config keys, the rest
to ``overrides``. The app bundle is this fedlayer checkout (``--app`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedlayer.commands.deploy import FLOWER_ENV, flower_command

#: Run-config keys (declared in pyproject.toml) that pick a config-group option.
GROUP_KEYS = ("strategy", "dataset", "model")
#: Lines the ServerApp logs at the end of a run (fedlayer.server.app.summary_lines).
RESULT_LINE = re.compile(r"(fedlayer: (?:run directory|final accuracy) .*)$")
FAILED_PREFIX = "ServerApp failed with exception: "
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RunError(RuntimeError):
    """The run could not be started or did not complete; the message is one line."""


def default_app() -> Path:
    """The fedlayer checkout this package is installed from (it holds the Flower app's pyproject.toml), else the current folder."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def shell_word(override: str) -> str:
    """``override`` as one word for the ServerApp's ``shlex.split`` (double quotes when it needs quoting)."""
    if shlex.quote(override) == override:
        return override
    if '"' in override or "\\" in override:
        raise RunError(f"override {override!r}: a double quote or backslash cannot travel in Flower's --run-config")
    return f'"{override}"'


def run_config_value(value: str) -> str:
    """``value`` as a TOML literal string, which Flower's ``--run-config`` parser passes on verbatim
    (it takes ``'...'`` or ``"..."`` without escapes, so a single quote cannot travel)."""
    if "'" in value:
        raise RunError(f"{value!r}: a single quote cannot travel in Flower's --run-config")
    return f"'{value}'"


def run_config(overrides: Sequence[str]) -> str:
    """The ``--run-config`` string for Hydra ``overrides``."""
    keys: dict[str, str] = {}
    rest: list[str] = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise RunError(f"override {override!r}: expected key=value")
        if key in GROUP_KEYS:
            keys[key] = value
        else:
            rest.append(override)
    keys["overrides"] = " ".join(shell_word(o) for o in rest)  # the ServerApp splits it with shlex
    return " ".join(f"{key}={run_config_value(value)}" for key, value in keys.items())


def _flwr(args: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([flower_command("flwr"), *args], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def _json_output(done: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    """The JSON a ``flwr ... --format json`` printed; its error message as a RunError."""
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise RunError(f"{what}: {detail[-1] if detail else f'flwr exited {done.returncode}'}") from None
    if not data.get("success"):
        raise RunError(f"{what}: {first_line(str(data.get('error-message', data)))}")
    return data


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, without colour codes."""
    lines = [line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def start_run(app: Path, connection: list[str], config: str) -> int:
    """Submit the run (``flwr run``); its run id."""
    done = _flwr(["run", str(app), *connection, "--run-config", config, "--format", "json"])
    return int(_json_output(done, "could not start the run")["run-id"])


def without_tracebacks(lines: Iterable[str]) -> Iterable[str]:
    """``lines`` minus Python tracebacks (from "Traceback (most recent call last):" to the exception line)."""
    inside = False
    for line in lines:
        if line.startswith("Traceback (most recent call last):"):
            inside = True
        elif inside and line[:1] not in (" ", "\t", ""):
            inside = False  # the exception line; its text is in the run's status
        elif not inside:
            yield line


def stream_log(run_id: int, connection: list[str], verbose: bool) -> list[str]:
    """Print the run's log until the run ends (``flwr log --stream``); the result lines it held."""
    results: list[str] = []
    with subprocess.Popen(
        [flower_command("flwr"), "log", str(run_id), *connection, "--stream"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, errors="replace",
    ) as follow:
        assert follow.stdout is not None
        lines = follow.stdout if verbose else without_tracebacks(follow.stdout)
        for line in lines:
            print(line, end="", flush=True)
            if match := RESULT_LINE.search(ANSI.sub("", line).rstrip()):
                results.append(match.group(1))
    return results


def final_status(run_id: int, connection: list[str], timeout: float = 60.0) -> tuple[str, str]:
    """The run's status and details once it has finished (``flwr ls --run-id``)."""
    deadline = time.monotonic() + timeout
    while True:
        data = _json_output(_flwr(["ls", "--run-id", str(run_id), *connection, "--format", "json"]), f"run {run_id}")
        (run,) = data["runs"]
        if run["status"].startswith("finished") or time.monotonic() > deadline:
            return run["status"], run.get("status-details", "")
        time.sleep(1.0)


def submit(app: Path, connection: str | None, overrides: Sequence[str], verbose: bool = False) -> list[str]:
    """Run to the end; the result lines (run directory, summary). Raises RunError unless it completed."""
    conn = [connection] if connection else []
    run_id = start_run(app, conn, run_config(overrides))
    print(f"fedlayer-run: started run {run_id}", flush=True)
    results = stream_log(run_id, conn, verbose)
    status, details = final_status(run_id, conn)
    if status != "finished:completed":
        reason = first_line(details.removeprefix(FAILED_PREFIX)) or "no details"
        raise RunError(f"run {run_id} {status}: {reason}")
    return results


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="fedlayer-run",
        description="Submit a fedlayer run to a SuperLink (like `flwr run`), stream its log, and exit non-zero when it failed.",
    )
    parse.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=fedavg federation.rounds=5")
    parse.add_argument("--connection", default=os.environ.get("FEDLAYER_CONNECTION") or None, help="the [superlink.NAME] connection in $FLWR_HOME/config.toml (default: flwr's default connection) [FEDLAYER_CONNECTION]")
    parse.add_argument("--app", type=Path, default=default_app(), help="the Flower app folder to submit (default: this fedlayer checkout)")
    parse.add_argument("--verbose", action="store_true", help="keep tracebacks in the streamed log")
    return parse


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: exit 0 when the run completed, 1 when it failed, 2 on bad arguments."""
    args = parser().parse_args(argv)
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    try:
        results = submit(args.app, args.connection, args.overrides, args.verbose)
    except RunError as err:
        print(f"fedlayer-run: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("fedlayer-run: stopped following; the run goes on (flwr stop RUN_ID CONNECTION ends it)", file=sys.stderr)
        sys.exit(130)
    for line in results or ["fedlayer: the run completed without a summary line in its log"]:
        print(line)


if __name__ == "__main__":
    main()
