"""fedlayer's per-round overhead over Flower's own FedAvg, on identical settings.

    python -m benchmarks.flower_overhead --rounds 10 --out bench-out/overhead [--deployment]

Runs, one after the other, a minimal Flower app with Flower's built-in FedAvg
(``benchmarks/flower_baseline_app.py``) and ``fedlayer-sim strategy=fedavg``:
mnist5k, the CNN, 20 clients, 10 per round, one local epoch of SGD (lr 0.05,
batch 32), central evaluation every round, same IID split, same initial
weights, Flower's simulation engine with 2 Ray actors (``num_cpus=1`` each).
``--deployment`` runs over loopback gRPC, one ``flower-superlink`` and two
SuperNodes (2 clients, both trained every round), each of ``--variants`` on a
fresh deployment: ``flower`` (Flower's own app on plain ``flower-supernode``
processes, Flower's defaults), ``cold`` (fedlayer's app on ``fedlayer-client
--cold``: a fresh ClientApp process per message, the node's split kept in its
default state folder, 0.1 s task poll, 0.2 s idle poll), ``warm``
(``fedlayer-client``, its warm worker on; left out where ``fedlayer-client``
has no ``--cold``) and, when named, ``warm-idle3`` (``warm`` with
``--idle-poll 3``: Flower's own SuperNode loop). Per
variant: seconds per round, each SuperNode's peak resident memory (its whole
process tree), per train message the segments of ``benchmarks.segments``
(SuperNode pick-up, SuperExec poll, process start and ``flwr`` import, app
load and imports, handler, reply path; from the deployment's logs, every line
of which is time-stamped on arrival) and, for fedlayer, the round trip, the
training the client reports and the rest (clients.csv medians).
``--no-simulation`` skips the simulation comparison. fedlayer's messages are
counted by the path that answered them (``benchmarks.segments.answered_paths``):
a warm variant with any message answered cold prints a WARNING, has
``answered.ran_cold`` in results.json and **RAN COLD** in its table row.

A round's time is the wall time between the ends of two consecutive rounds,
measured on the server side, so it covers everything a round costs:
training, aggregation, central evaluation and the framework's bookkeeping.

- Flower: ``evaluate_fn`` stamps the clock after each central evaluation.
- fedlayer in simulation: this process stamps each ``[round k/N]`` progress
  line as it arrives from ``fedlayer-sim`` (logged after the round's metrics
  line and checkpoint are written). Round 1 has no earlier line, so it is not
  measured this way; rounds 2..N are what counts. ``metrics.jsonl``'s
  ``seconds`` (the round alone, without writing the metrics line and
  checkpoint) is kept alongside as a cross-check.
- fedlayer in deployment: ``metrics.jsonl``'s ``seconds``, because ``flwr run
  --stream`` delivers log lines in batches; the checkpoint it leaves out costs
  tens of milliseconds against rounds of many seconds.

The summary statistic is the median over rounds 2..N (round 1 includes engine
start and, in fedlayer, the nodes' identity queries); the ratio is fedlayer's
median divided by Flower's (goal: <= 1.10). Means are reported too.
``--repeats R`` runs each side R times, alternating Flower and fedlayer so that
a change in load from other work on the machine hits both, and pools the
rounds. Output in ``--out``: ``results.json``, one log per run, fedlayer's run
directories.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks import segments
from benchmarks.flower_baseline_app import BaselineConfig
from benchmarks.processes import (
    executable,
    free_ports,
    port_open,
    process_tree,
    signal_tree,
    tree_rss,
)
from fedlayer.server.rundir import RunDirectory

REPO_ROOT = Path(__file__).absolute().parents[1]
GOAL = 1.10
#: Deployment goals (issue 27): fedlayer warm per round at most this share of Flower's own app (N=2) ...
WARM_VS_FLOWER_GOAL = 0.4
#: ... and of fedlayer cold (N=16, benchmarks.deployment_scale)
WARM_VS_COLD_GOAL = 0.4
#: How a deployment's SuperNodes are started (``LoopbackDeployment``); ``warm-idle3``: ``fedlayer-client
#: --idle-poll 3``, Flower's own SuperNode loop (3 s idle sleep), to set beside ``warm``'s default.
LAUNCHERS = ("flower", "cold", "warm", "warm-idle3")
#: Deployment variants: (app, launcher); Flower's own app runs on plain Flower SuperNodes.
VARIANTS = {"flower": ("flower", "flower"), "cold": ("fedlayer", "cold"), "warm": ("fedlayer", "warm"),
            "warm-idle3": ("fedlayer", "warm-idle3")}
#: What ``--variants`` runs when not given.
DEFAULT_VARIANTS = ["flower", "cold", "warm"]
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
ROUND_LINE = re.compile(r"\[round (\d+)/\d+\]")


@dataclass
class SideResult:
    """One run's per-round seconds (round number -> seconds) and how they were measured."""

    name: str
    seconds: dict[int, float]
    timing: str
    final_accuracy: float
    log: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def round_stats(runs: Sequence[SideResult]) -> dict[str, Any]:
    """Median and mean of the seconds of rounds 2..N, pooled over ``runs``."""
    counted = [s for run in runs for r, s in sorted(run.seconds.items()) if r >= 2]
    return {"rounds_counted": len(counted), "median": statistics.median(counted), "mean": statistics.fmean(counted)}


# ------------------------------------------------------------------ running commands
def run_logged(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None, timeout: float | None = None) -> list[tuple[float, str]]:
    """Run ``command``; write its output, time-stamped, to ``log_path``; return (arrival time, line) pairs."""
    lines: list[tuple[float, str]] = []
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **FLOWER_ENV, **(env or {})}, text=True, errors="replace",
    ) as process:
        watchdog = threading.Timer(timeout, process.kill) if timeout else None
        if watchdog:
            watchdog.start()
        assert process.stdout is not None
        for line in process.stdout:
            now = time.time()
            lines.append((now, line))
            log.write(f"{now:.3f} {line}")
        returncode = process.wait()
        timed_out = watchdog is not None and not watchdog.is_alive()  # a Timer thread ends once it has fired
        if watchdog:
            watchdog.cancel()
    if returncode != 0:
        why = f"killed after {timeout:.0f} s" if timed_out else f"exit {returncode}"
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({why}); log: {log_path}")
    return lines


def periods(end_times: dict[int, float]) -> dict[int, float]:
    """Round k's seconds = end of round k - end of round k-1 (for every k with both)."""
    return {k: t - end_times[k - 1] for k, t in sorted(end_times.items()) if k - 1 in end_times}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A fedlayer run directory's metrics.jsonl."""
    return RunDirectory(run_dir).read_metrics()


def flower_result(name: str, times_path: Path, log: Path) -> SideResult:
    """The baseline app's per-round seconds from the evaluate_fn stamps it wrote."""
    data = json.loads(times_path.read_text())
    stamps = dict(enumerate(data["round_end_times"]))  # 0: the initial model's evaluation
    return SideResult(name, periods(stamps), "between ends of consecutive evaluate_fn calls (ServerApp clock)", data["accuracy"][-1], str(log))


# ------------------------------------------------------------------ the two sides
def fedlayer_overrides(cfg: BaselineConfig, output_dir: Path, run_name: str) -> list[str]:
    """Hydra overrides that give fedlayer the baseline's settings (pinned, not left to defaults)."""
    return [
        "strategy=fedavg", f"dataset={cfg.dataset}", f"model={cfg.model}", f"seed={cfg.seed}",
        f"federation.num_clients={cfg.num_clients}", f"federation.rounds={cfg.rounds}",
        f"federation.fraction_train={cfg.fraction_train}", "federation.fraction_evaluate=0.0",
        "dataset.partition.scheme=iid", "dataset.client_test_fraction=0",
        f"dataset.central_test_fraction={cfg.central_test_fraction}",
        "train.optimizer=sgd", f"train.lr={cfg.lr}", "train.momentum=0.0", "train.weight_decay=0.0",
        f"train.batch_size={cfg.batch_size}", f"train.local_epochs={cfg.local_epochs}", "train.local_steps=0",
        "evaluation.every=1", "evaluation.max_examples=0",  # 0: the whole central test set, as the baseline
        "device=cpu", f"output_dir={output_dir}", f"run_name={run_name}",
    ]


def flower_simulation(cfg: BaselineConfig, out: Path, name: str) -> SideResult:
    """Flower's FedAvg app in the simulation engine, in its own process."""
    times, log = out / f"{name}-times.json", out / f"{name}.log"
    flags = [f"--{k}={v}" for k, v in dataclasses.replace(cfg, times_path=str(times)).run_config().items()]
    run_logged([sys.executable, "-m", "benchmarks.flower_baseline_app", *flags], log)
    return flower_result(name, times, log)


def fedlayer_simulation(cfg: BaselineConfig, out: Path, name: str) -> SideResult:
    """``fedlayer-sim strategy=fedavg`` in its own process, timed by its progress lines."""
    log, run_dir = out / f"{name}.log", out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = run_logged([sys.executable, "-m", "fedlayer.commands.sim", *fedlayer_overrides(cfg, out / "runs", run_dir.name)], log)
    ends = {int(m.group(1)): t for t, line in lines if (m := ROUND_LINE.search(line))}
    if sorted(ends) != list(range(1, cfg.rounds + 1)):
        raise RuntimeError(f"expected fedlayer progress lines '[round k/{cfg.rounds}]' for every round, found {sorted(ends)}; log: {log}")
    records = read_metrics(run_dir)
    return SideResult(
        name, periods(ends), "between arrivals of consecutive '[round k/N]' progress lines (benchmark clock)",
        records[-1]["accuracy"], str(log),
        extra={"metrics_jsonl_seconds": {r["round"]: r["seconds"] for r in records}, "run_dir": str(run_dir)},
    )


# ------------------------------------------------------------------ deployment over loopback
def stamp_lines(stream: IO[str], path: Path) -> None:
    """Copy ``stream`` to ``path`` line by line, each prefixed with its arrival time, until it closes."""
    with open(path, "w", encoding="utf-8") as log:
        for line in stream:
            log.write(f"{time.time():.3f} {line}")
            log.flush()


class LoopbackDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (plain text), FLWR_HOME in a temp folder.

    Node ``i`` gets node config ``partition-id=i num-partitions=<num_nodes>``;
    the processes' output goes to ``<logs>/superlink.log`` and ``supernode-<i>.log``.
    ``launcher`` starts each SuperNode: ``flower`` a plain ``flower-supernode``
    (Flower's defaults), ``cold`` ``fedlayer-client --cold`` (state folder,
    0.1 s task poll, a fresh ClientApp process per message), ``warm``
    ``fedlayer-client`` (the same, plus its warm worker), ``warm-idle3`` that with
    ``--idle-poll 3`` (Flower's own SuperNode loop); the state folders
    go under the temp folder (``XDG_CACHE_HOME``), so every deployment starts
    without a kept split. ``idle_poll`` (with ``flower``) starts each plain SuperNode
    through ``fedlayer.client.supernode_launcher`` with that idle poll instead.
    """

    connection = "bench"

    def __init__(self, logs: Path, num_nodes: int = 2, launcher: str = "flower", idle_poll: float | None = None) -> None:
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
        self.logs = logs
        self.home = Path(tempfile.mkdtemp(prefix="fedlayer-loopback-"))
        self.fleet_port, self.control_port = free_ports(2)
        self.env = {"FLWR_HOME": str(self.home / "flwr-home"), "XDG_CACHE_HOME": str(self.home / "cache")}
        self.num_nodes = num_nodes
        self.launcher = launcher
        self.idle_poll = idle_poll
        self.processes: list[subprocess.Popen] = []
        self.copiers: list[threading.Thread] = []
        (self.home / "flwr-home").mkdir()
        (self.home / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
            f'address = "127.0.0.1:{self.control_port}"\ninsecure = true\n'
        )

    @property
    def superlink_pid(self) -> int:
        """Process id of the SuperLink (started first)."""
        return self.processes[0].pid

    @property
    def supernode_pids(self) -> list[int]:
        """Process ids of the SuperNodes."""
        return [process.pid for process in self.processes[1:]]

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start a process; its output (and its children's: SuperExec, ClientApps, warm worker) goes to
        ``<logs>/<name>.log``, each line prefixed with its arrival time (``time.time()``, for ``benchmarks.segments``)."""
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.home,
            env={**os.environ, **FLOWER_ENV, **self.env}, start_new_session=True, text=True, errors="replace",
        )
        self.processes.append(process)
        copier = threading.Thread(target=stamp_lines, args=(process.stdout, self.logs / f"{name}.log"), daemon=True)
        copier.start()
        self.copiers.append(copier)
        return process

    def __enter__(self) -> LoopbackDeployment:
        superlink = self._start("superlink", [
            executable("flower-superlink"), "--insecure", "--fleet-api-address", f"127.0.0.1:{self.fleet_port}",
            "--host", "127.0.0.1", "--port", str(self.control_port), "--disable-runtime-dependency-installation",
        ])
        deadline = time.monotonic() + 60
        while not (port_open(self.fleet_port) and port_open(self.control_port)):
            if superlink.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the SuperLink did not come up; log: {self.logs / 'superlink.log'}")
            time.sleep(0.2)
        for node, port in enumerate(free_ports(self.num_nodes)):
            self._start(f"supernode-{node}", self.supernode_command(node, port))
        return self

    def supernode_command(self, node: int, port: int) -> list[str]:
        """The command that starts SuperNode ``node`` with its ClientApp API on ``port``."""
        if self.launcher == "flower":
            supernode = [executable("flower-supernode")] if self.idle_poll is None else [
                sys.executable, "-m", "fedlayer.client.supernode_launcher", "--idle-poll", str(self.idle_poll)]
            return [
                *supernode, "--insecure", "--superlink", f"127.0.0.1:{self.fleet_port}",
                "--port", str(port), "--node-config", f"partition-id={node} num-partitions={self.num_nodes}",
            ]
        return [
            executable("fedlayer-client"), "--insecure", "--server", f"127.0.0.1:{self.fleet_port}", "--port", str(port),
            "--partition-id", str(node), "--num-partitions", str(self.num_nodes), "--device", "cpu",
            *(["--cold"] if self.launcher == "cold" else []), *(["--idle-poll", "3"] if self.launcher == "warm-idle3" else []),
        ]

    def __exit__(self, *exc: object) -> None:
        """Stop every process started here and everything they started; remove FLWR_HOME."""
        tree = process_tree({p.pid for p in self.processes})
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        signal_tree(tree, signal.SIGTERM)
        time.sleep(1)
        signal_tree(tree, signal.SIGKILL)
        for process in self.processes:
            process.wait()
        for copier in self.copiers:  # until the pipes close: every process of the trees has exited
            copier.join(timeout=5)
        shutil.rmtree(self.home, ignore_errors=True)

    def run_app(self, app: Path, log: Path, run_config: str = "", timeout: float = 1800) -> None:
        """``flwr run <app> --stream`` until the run ends; raise unless it completed."""
        command = [executable("flwr"), "run", str(app), self.connection, "--stream"]
        lines = run_logged(command + (["--run-config", run_config] if run_config else []), log, self.env, timeout)
        match = re.search(r"Successfully started run (\d+)", "".join(line for _, line in lines))
        if match is None:
            raise RuntimeError(f"flwr run did not start a run; log: {log}")
        # `flwr run` exits 0 even when the ServerApp failed: ask the SuperLink.
        done = subprocess.run(
            [executable("flwr"), "ls", "--run-id", match.group(1), self.connection, "--format", "json"],
            capture_output=True, text=True, env={**os.environ, **FLOWER_ENV, **self.env}, check=False,
        )
        status = json.loads(done.stdout)["runs"][0]["status"] if done.returncode == 0 else done.stderr
        if status != "finished:completed":
            raise RuntimeError(f"run {match.group(1)} ended {status!r}; log: {log} and {self.logs}/super*.log")


def write_baseline_project(folder: Path, cfg: BaselineConfig) -> None:
    """A Flower app project around a copy of flower_baseline_app.py, settings in its run config."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("flower_baseline_app.py"), folder / "flower_baseline_app.py")
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.run_config().items())
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "flower-baseline"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "fedlayer-benchmarks"\n\n'
        '[tool.flwr.app.components]\nserverapp = "flower_baseline_app:server_app"\n'
        'clientapp = "flower_baseline_app:client_app"\n\n'
        f"[tool.flwr.app.config]\n{config}\n"
    )


def flower_deployment(deployment: LoopbackDeployment, cfg: BaselineConfig, out: Path, name: str) -> SideResult:
    """Flower's FedAvg app submitted with ``flwr run`` to the loopback deployment."""
    times, log, app = out / f"{name}-times.json", out / f"{name}.log", deployment.home / name
    write_baseline_project(app, dataclasses.replace(cfg, times_path=str(times.resolve())))
    deployment.run_app(app, log)
    return flower_result(name, times, log)


def fedlayer_deployment(deployment: LoopbackDeployment, cfg: BaselineConfig, out: Path, name: str) -> SideResult:
    """fedlayer's app (this repository) submitted with ``flwr run``, timed by metrics.jsonl."""
    log, run_dir = out / f"{name}.log", (out / "runs" / name).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [o for o in fedlayer_overrides(cfg, run_dir.parent, run_dir.name) if not o.startswith(("strategy=", "dataset=", "model="))]
    run_config = f"strategy='fedavg' dataset='{cfg.dataset}' model='{cfg.model}' overrides='{' '.join(overrides)}'"
    deployment.run_app(REPO_ROOT, log, run_config)
    records = read_metrics(run_dir)
    return SideResult(
        name, {r["round"]: r["seconds"] for r in records}, "metrics.jsonl 'seconds' (ServerApp clock)",
        records[-1]["accuracy"], str(log), extra={"run_dir": str(run_dir)},
    )


def warm_available() -> bool:
    """Whether this fedlayer's ``fedlayer-client`` has a warm worker (it then offers ``--cold``)."""
    done = subprocess.run([executable("fedlayer-client"), "--help"], capture_output=True, text=True, check=False)
    return "--cold" in done.stdout


class MemoryPeaks(threading.Thread):
    """Peak resident memory of each SuperNode's process tree (the SuperNode, its SuperExec, the
    ClientApp processes it starts and, with ``fedlayer-client``, the warm worker), sampled every ``interval`` s."""

    def __init__(self, pids: Sequence[int], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = list(pids), interval
        self.peaks = dict.fromkeys(self.pids, 0)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for pid in self.pids:
            self.peaks[pid] = max(self.peaks[pid], sum(tree_rss([pid]).values()))

    def stop(self) -> list[float]:
        """Stop sampling; each SuperNode's peak in MiB."""
        self.stopped.set()
        self.join()
        return [peak / 2**20 for peak in self.peaks.values()]


def client_segments(run_dir: Path) -> dict[str, float]:
    """Per message, from a fedlayer run's clients.csv (medians over clients): push to reply pulled
    (``round_trip``), the training the client reports (``train``), and the rest (``outside_training``:
    pick-up, process start and imports, the cold build, the reply path)."""
    with open(run_dir / "clients.csv", encoding="utf-8") as fh:
        rows = [row for row in csv.DictReader(fh) if row["median_round_trip_seconds"] and row["median_train_seconds"]]
    trip = statistics.median(float(r["median_round_trip_seconds"]) for r in rows)
    train = statistics.median(float(r["median_train_seconds"]) for r in rows)
    return {"round_trip": trip, "train": train, "outside_training": trip - train}


# ------------------------------------------------------------------ comparison
Side = Callable[[BaselineConfig, Path, str], SideResult]


def timed(label: str, run: Side, cfg: BaselineConfig, out: Path, name: str) -> SideResult:
    """Run one side, printing a line when it starts and when it ends."""
    print(f"{label} ...", flush=True)
    started = time.time()
    result = run(cfg, out, name)
    result.extra["load_average_1min_after"] = os.getloadavg()[0]  # the machine may be shared: a hint of noise
    stats = round_stats([result])
    print(
        f"{label}: {stats['median']:.2f} s/round (median of rounds 2..{cfg.rounds}), final accuracy "
        f"{result.final_accuracy:.3f}, {time.time() - started:.0f} s in all; log {result.log}",
        flush=True,
    )
    return result


def side_by_side(mode: str, flower: Side, fedlayer: Side, cfg: BaselineConfig, out: Path, repeats: int) -> dict[str, Any]:
    """Flower, fedlayer, Flower, ... (``repeats`` each, interleaved against drifting load); both sides' rounds and fedlayer / Flower."""
    runs: dict[str, list[SideResult]] = {"flower": [], "fedlayer": []}
    for index in range(2 * repeats):
        side, run = ("flower", flower) if index % 2 == 0 else ("fedlayer", fedlayer)
        label = f"[{index + 1}/{2 * repeats}] {side} FedAvg, {mode}"
        runs[side].append(timed(label, run, cfg, out, f"{side}-{mode}-{index // 2 + 1}"))
    stats = {side: round_stats(results) for side, results in runs.items()}
    ratio = stats["fedlayer"]["median"] / stats["flower"]["median"]
    return {
        "settings": dataclasses.asdict(cfg),
        **{side: {"stats": stats[side], "runs": [dataclasses.asdict(r) for r in results]} for side, results in runs.items()},
        "ratio_median": ratio,
        "ratio_mean": stats["fedlayer"]["mean"] / stats["flower"]["mean"],
        "meets_goal": ratio <= GOAL,
    }


def count_answers(result: SideResult, variant: str, logs: Path, label: str) -> None:
    """Count a run's messages by the path that answered them (``result.extra["answered"]``, from its
    deployment's ``logs``); print a warning when ``variant`` is warm and any message ran cold."""
    paths = segments.answered_paths(logs)
    result.extra["answered"] = dataclasses.asdict(paths)
    if (warning := segments.fallback_warning(label, variant, paths)) is not None:
        print(warning, flush=True)


def pooled_answers(variant: str, results: Sequence[SideResult]) -> dict[str, Any]:
    """The runs' ``count_answers`` summed, and whether the variant is flagged (``ran_cold``)."""
    paths = sum((segments.Paths(**r.extra["answered"]) for r in results), segments.Paths())
    return {**dataclasses.asdict(paths), "ran_cold": segments.fell_back(variant, paths)}


def deployment_variants(variants: Sequence[str], cfg: BaselineConfig, out: Path, repeats: int) -> dict[str, Any]:
    """Each variant (``VARIANTS``) on a fresh loopback deployment of ``cfg.num_clients`` SuperNodes,
    ``repeats`` times, the variants alternating; seconds per round, memory per device, ratios."""
    runs: dict[str, list[SideResult]] = {variant: [] for variant in variants}
    total = repeats * len(variants)
    for repeat in range(repeats):
        for variant in variants:
            app, launcher = VARIANTS[variant]
            name = f"{variant}-n{cfg.num_clients}-{repeat + 1}"
            logs = out / "logs" / name
            logs.mkdir(parents=True, exist_ok=True)
            label = f"[{sum(map(len, runs.values())) + 1}/{total}] {variant}, {cfg.num_clients} SuperNodes"
            with LoopbackDeployment(logs, num_nodes=cfg.num_clients, launcher=launcher) as deployment:
                memory = MemoryPeaks(deployment.supernode_pids)
                memory.start()
                try:
                    side = flower_deployment if app == "flower" else fedlayer_deployment
                    result = timed(label, functools.partial(side, deployment), cfg, out, name)
                finally:
                    peaks = memory.stop()
            result.extra["device_peak_mib"] = peaks
            result.extra["message_segments"] = segments.medians(segments.message_segments(logs))
            count_answers(result, variant, logs, label)
            if app == "fedlayer":
                result.extra["segments"] = client_segments(Path(result.extra["run_dir"]))
            runs[variant].append(result)
    summary: dict[str, Any] = {"settings": dataclasses.asdict(cfg), "variants": {}}
    for variant, results in runs.items():
        entry = {"stats": round_stats(results), "device_peak_mib": max(max(r.extra["device_peak_mib"]) for r in results),
                 "runs": [dataclasses.asdict(r) for r in results]}
        entry["answered"] = pooled_answers(variant, results)
        pooled = [r.extra["message_segments"] for r in results if r.extra["message_segments"]]
        if pooled:  # the median of the runs' medians, messages summed
            entry["message_segments"] = {k: statistics.median(p[k] for p in pooled) for k in pooled[0]} | {"messages": sum(p["messages"] for p in pooled)}
        if all("segments" in r.extra for r in results):
            entry["segments"] = {k: statistics.median(r.extra["segments"][k] for r in results) for k in results[0].extra["segments"]}
        summary["variants"][variant] = entry
    medians = {variant: entry["stats"]["median"] for variant, entry in summary["variants"].items()}
    summary["ratios"] = {f"{a}/{b}": medians[a] / medians[b] for a, b in (("warm", "flower"), ("cold", "flower"), ("warm", "cold"), ("warm-idle3", "flower"), ("warm", "warm-idle3")) if a in medians and b in medians}
    return summary


def variants_report(comparison: dict[str, Any]) -> str:
    """A markdown table of the variants and the ratios against the goals."""
    lines = ["| variant | s/round (median, rounds 2..N) | per message: round trip / training / outside training (s) | peak MiB per device | messages answered warm / cold |",
             "|---|---|---|---|---|"]
    fallbacks = []
    for variant, entry in comparison["variants"].items():
        seg = entry.get("segments")
        trip = f"{seg['round_trip']:.2f} / {seg['train']:.2f} / {seg['outside_training']:.2f}" if seg else "-"
        answered = entry["answered"]
        paths = segments.Paths(answered["warm"], answered["cold"], answered["reasons"])
        cell = paths.cell(variant) if VARIANTS[variant][0] == "fedlayer" else "-"
        lines.append(f"| {variant} | {entry['stats']['median']:.2f} | {trip} | {entry['device_peak_mib']:.0f} | {cell} |")
        if (warning := segments.fallback_warning(variant, variant, paths)) is not None:
            fallbacks.append(warning)
    ratios = [f"{key} = {value:.2f}" + (f" (goal <= {WARM_VS_FLOWER_GOAL}: {'met' if value <= WARM_VS_FLOWER_GOAL else 'NOT met'})"
                                          if key == "warm/flower" else "") for key, value in comparison["ratios"].items()]
    lines = [*lines, "", "; ".join(ratios)] if ratios else lines
    lines = [*lines, "", *fallbacks] if fallbacks else lines
    table = segments.markdown({variant: entry.get("message_segments", {}) for variant, entry in comparison["variants"].items()})
    return "\n".join([*lines, "", table] if table else lines)


def report(mode: str, comparison: dict[str, Any]) -> str:
    """One line: the ratio and both medians."""
    flower, fedlayer = comparison["flower"]["stats"], comparison["fedlayer"]["stats"]
    return (
        f"{mode}: fedlayer/Flower = {comparison['ratio_median']:.2f} (median s/round over rounds 2..N; mean ratio "
        f"{comparison['ratio_mean']:.2f}) | Flower {flower['median']:.2f} s, fedlayer {fedlayer['median']:.2f} s | "
        f"goal <= {GOAL:.2f}: {'met' if comparison['meets_goal'] else 'NOT met'}"
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds per run (>= 2; round 1 is not counted)")
    parser.add_argument("--clients", type=int, default=20, help="clients in simulation (deployment: 2 SuperNodes)")
    parser.add_argument("--fraction", type=float, default=0.5, help="fraction of clients trained per round in simulation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved; rounds are pooled")
    parser.add_argument("--out", type=Path, default=Path("bench-out/overhead"))
    parser.add_argument("--deployment", action="store_true", help="also run the variants over loopback gRPC (2 SuperNodes)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                        help="deployment: Flower's own app, fedlayer cold, fedlayer warm (warm only where fedlayer-client has --cold), "
                             "fedlayer warm on Flower's own SuperNode loop (--idle-poll 3)")
    parser.add_argument("--no-simulation", action="store_true", help="skip the simulation comparison")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.repeats < 1:
        parser.error("--rounds must be >= 2 (round 1 is not counted) and --repeats >= 1")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sim = BaselineConfig(rounds=args.rounds, num_clients=args.clients, fraction_train=args.fraction, seed=args.seed)
    results: dict[str, Any] = {"goal_ratio": GOAL, "statistic": "median of per-round seconds over rounds 2..N"}
    lines = []
    if not args.no_simulation:
        results["simulation"] = side_by_side("sim", flower_simulation, fedlayer_simulation, sim, out, args.repeats)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        lines.append(report("simulation", results["simulation"]))
    if args.deployment:
        variants = [v for v in args.variants if not v.startswith("warm") or warm_available()]
        if variants != args.variants:
            print("fedlayer-client has no warm worker (no --cold option): the warm variant is left out", flush=True)
        deploy = dataclasses.replace(sim, num_clients=2, fraction_train=1.0)
        results["deployment"] = deployment_variants(variants, deploy, out, args.repeats)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        lines.append("deployment (2 SuperNodes, cnn on mnist5k):\n" + variants_report(results["deployment"]))
    print("\n".join(lines))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
