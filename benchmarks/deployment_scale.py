"""How a real deployment's round time, memory and traffic grow with the number of SuperNodes.

    python -m benchmarks.deployment_scale [--nodes 2 4 8 16] [--rounds 3] [--methods fedavg fedlama]
        [--variants flower cold warm] [--out bench-out/deployment-scale]

For every N in ``--nodes``, every variant and every method, a fresh
``flower-superlink --insecure`` and N SuperNodes start on 127.0.0.1
(FLWR_HOME in a temp folder) and ``flwr run`` submits the app: the ``linear``
model on ``digits``, all N clients trained every round, one local epoch of
SGD with the settings of ``benchmarks.flower_overhead`` (pinned, so Flower's
app and fedlayer's do the same work), so training is negligible and what is
measured is the deployment's own cost. Variants (``flower_overhead.VARIANTS``):
``flower``, Flower's own FedAvg app on plain ``flower-supernode`` processes
(run once per N, as method ``fedavg``); ``cold``, fedlayer's app on
``fedlayer-client --cold``; ``warm``, on ``fedlayer-client`` with its warm
worker (left out where ``fedlayer-client`` has no ``--cold``). Per run:

- s/round: the mean and the median of metrics.jsonl's ``seconds`` over
  rounds 2..R (round 1 also waits for the nodes and asks each its identity;
  it is kept as ``round1_seconds``; with ``--rounds 1`` round 1 is all there
  is); for Flower's app, the time between its consecutive central
  evaluations; the warm/cold and warm/Flower ratios are of the medians;
- peak resident memory, sampled every ``--interval`` s: the SuperLink's
  process tree (SuperLink, its SuperExec and the ServerApp), the
  ``flwr-serverapp`` process alone, and all N SuperNodes' trees together
  (with the ``flwr-clientapp`` processes they start, one per message, and
  the warm workers), and that divided by N (``device_peak_mib``);
- bytes per round: the mean of metrics.jsonl's ``bytes_up + bytes_down``;
- per train message of rounds 2..R, the medians of its segments (SuperNode
  pick-up, SuperExec poll, process start and ``flwr`` import, app load and
  imports, handler, reply path: ``benchmarks/segments.py``, from the
  time-stamped logs), every message's in ``logs/<run>/segments.csv``;
- messages answered warm and cold (every kind, from the line fedlayer's
  ClientApp logs per message, ``segments.answered_paths``): a warm variant
  with any message answered cold (worker gone, refused, other code) is
  flagged, with a WARNING line, ``ran_cold`` and ``cold_reasons`` in the
  outputs and **RAN COLD** in its table row: its times mix both paths.

The growth exponent of s/round in N is the slope of a least-squares line
through (log N, log s/round), per method. Output in ``--out``:
``results.json``, ``results.csv``, ``deployment_scale.png`` (s/round and memory
against N, log-log), ``results.md`` (the tables, also printed), ``logs/`` (every
process's output, each line prefixed with its arrival time) and ``runs/``
(fedlayer's run directories).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import segments
from benchmarks.flower_baseline_app import BaselineConfig
from benchmarks.flower_overhead import (
    DEFAULT_VARIANTS,
    REPO_ROOT,
    VARIANTS,
    WARM_VS_COLD_GOAL,
    LoopbackDeployment,
    fedlayer_overrides,
    flower_deployment,
    warm_available,
)
from benchmarks.processes import command_line, tree_rss
from fedlayer.server.rundir import RunDirectory

#: Strategy overrides per method (FedLAMA re-assigns intervals from round 2 on).
METHODS: dict[str, list[str]] = {
    "fedavg": [],
    "fedlama": ["strategy.phi=2", "strategy.min_round_to_adjust=0"],
    "laq": [],
}
MIB = 2**20
SEGMENT_KEYS = [key for key, _ in segments.SEGMENTS] + ["total", "messages"]


@dataclass
class Measurement:
    """One run of one method on N SuperNodes."""

    variant: str
    method: str
    nodes: int
    rounds: int
    seconds_per_round: float
    median_seconds_per_round: float
    rounds_counted: list[int]
    round1_seconds: float
    superlink_peak_mib: float
    serverapp_peak_mib: float
    supernodes_peak_mib: float
    device_peak_mib: float
    bytes_per_round: float
    traffic_ratio_vs_fedavg: float
    run_wall_seconds: float
    load_average_1min_after: float
    run_dir: str
    #: per train message, medians over rounds 2..R (``benchmarks.segments``; rows in ``logs/<run>/segments.csv``)
    segments: dict[str, float] = dataclasses.field(default_factory=dict)
    #: messages (every kind and round) fedlayer's ClientApps answered through the warm worker and cold
    #: (``segments.answered_paths``; 0 / 0 for Flower's own app)
    answered_warm: int = 0
    answered_cold: int = 0
    #: a warm variant with a message answered cold (``segments.fell_back``): its times mix both paths
    ran_cold: bool = False
    #: why, as the logs say ("reason x count; ..."; empty when nothing was logged)
    cold_reasons: str = ""

    @property
    def paths(self) -> segments.Paths:
        """The answered counts as ``segments.Paths`` (reasons not kept)."""
        return segments.Paths(self.answered_warm, self.answered_cold)


# ------------------------------------------------------------------ watching a run
def finished_rounds(metrics_path: Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl that may still be written to."""
    if not metrics_path.exists():
        return []
    text = metrics_path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]


class RunWatcher(threading.Thread):
    """Samples the deployment's memory every ``interval`` s and prints the run's progress.

    Peaks are of resident set sizes summed over a process tree; the ServerApp
    is the ``flwr-serverapp`` process in the SuperLink's tree.
    """

    def __init__(self, deployment: LoopbackDeployment, run_dir: Path, label: str, rounds: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.deployment, self.label, self.rounds, self.interval = deployment, label, rounds, interval
        self.metrics_path = run_dir / "metrics.jsonl"
        self.peaks = {"superlink": 0, "serverapp": 0, "supernodes": 0}
        self.started = time.monotonic()
        self.rounds_seen = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        """Sample until stopped; look for finished rounds about once a second."""
        ticks_per_check = max(1, round(1.0 / self.interval))
        ticks = 0
        while not self.stopped.wait(self.interval):
            self.sample()
            ticks += 1
            if ticks % ticks_per_check == 0:
                self.report_rounds()

    def stop(self) -> dict[str, float]:
        """Stop sampling (after one last sample); the peaks in MiB."""
        self.stopped.set()
        self.join()
        self.sample()
        return {name: peak / MIB for name, peak in self.peaks.items()}

    def sample(self) -> None:
        """One sample of the three memory figures."""
        superlink = tree_rss([self.deployment.superlink_pid])
        serverapp = sum(rss for pid, rss in superlink.items() if "flwr-serverapp" in command_line(pid))
        if serverapp and not self.peaks["serverapp"]:
            self.say(f"ServerApp started ({serverapp / MIB:.0f} MiB)")
        supernodes = tree_rss(self.deployment.supernode_pids)
        for name, value in (("superlink", sum(superlink.values())), ("serverapp", serverapp), ("supernodes", sum(supernodes.values()))):
            self.peaks[name] = max(self.peaks[name], value)

    def report_rounds(self) -> None:
        """Print a line for every round that metrics.jsonl gained since the last look."""
        for record in finished_rounds(self.metrics_path)[self.rounds_seen :]:
            self.rounds_seen += 1
            self.say(
                f"round {record['round']}/{self.rounds}: {record['seconds']:.1f} s, "
                f"{(record['bytes_up'] + record['bytes_down']) / 1e6:.2f} MB; peaks so far: SuperLink tree "
                f"{self.peaks['superlink'] / MIB:.0f} MiB, SuperNodes {self.peaks['supernodes'] / MIB:.0f} MiB"
            )

    def say(self, text: str) -> None:
        """A progress line with the run's label and elapsed time."""
        print(f"  [{self.label}] {time.monotonic() - self.started:6.1f} s  {text}", flush=True)


# ------------------------------------------------------------------ one run
def workload(nodes: int, rounds: int) -> BaselineConfig:
    """Linear on digits, all N nodes every round, the overhead benchmark's pinned training settings."""
    return BaselineConfig(rounds=rounds, num_clients=nodes, fraction_train=1.0, dataset="digits", model="linear")


def run_config(method: str, nodes: int, rounds: int, run_dir: Path) -> str:
    """``flwr run --run-config`` for fedlayer's app (``workload``), with the method's own overrides."""
    pinned = fedlayer_overrides(workload(nodes, rounds), run_dir.parent, run_dir.name)
    overrides = [o for o in pinned if not o.startswith(("strategy=", "dataset=", "model="))] + METHODS[method]
    return f"strategy='{method}' dataset='digits' model='linear' overrides='{' '.join(overrides)}'"


def measure(variant: str, method: str, nodes: int, rounds: int, out: Path, interval: float, timeout: float) -> Measurement:
    """Start a fresh deployment with ``nodes`` SuperNodes started as ``variant`` says, run ``method`` on it, measure."""
    app, launcher = VARIANTS[variant]
    label = f"{variant} {method}, {nodes} nodes"
    run_dir = (out / "runs" / f"{variant}-{method}-n{nodes}").resolve()
    logs = out / "logs" / f"{variant}-{method}-n{nodes}"
    shutil.rmtree(run_dir, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    with LoopbackDeployment(logs, num_nodes=nodes, launcher=launcher) as deployment:
        watcher = RunWatcher(deployment, run_dir, label, rounds, interval)
        watcher.start()
        try:
            if app == "flower":
                run_dir.mkdir(parents=True, exist_ok=True)
                flower = flower_deployment(deployment, workload(nodes, rounds), run_dir, "flower")
            else:
                deployment.run_app(REPO_ROOT, logs / "flwr-run.log", run_config(method, nodes, rounds, run_dir), timeout)
        finally:
            peaks = watcher.stop()
        wall = time.monotonic() - watcher.started
    if app == "flower":
        measured = flower_measurement(method, nodes, rounds, flower.seconds, run_dir, peaks, wall)
    else:
        measured = summarise(variant, method, nodes, rounds, run_dir, peaks, wall)
    rows = segments.message_segments(logs)  # the deployment has stopped: its logs are complete
    if rows:
        with open(logs / "segments.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    measured.segments = segments.medians(rows)
    count_answers(measured, logs, label)
    return measured


def count_answers(measured: Measurement, logs: Path, label: str) -> None:
    """Set ``measured``'s counts of messages answered warm and cold from the run's ``logs``; print a
    warning when its variant is warm and any message ran cold."""
    paths = segments.answered_paths(logs)
    measured.answered_warm, measured.answered_cold = paths.warm, paths.cold
    measured.ran_cold = segments.fell_back(measured.variant, paths)
    measured.cold_reasons = paths.reasons_text()
    if (warning := segments.fallback_warning(label, measured.variant, paths)) is not None:
        print(warning, flush=True)


def flower_measurement(method: str, nodes: int, rounds: int, seconds: dict[int, float], run_dir: Path, peaks: dict[str, float], wall: float) -> Measurement:
    """A Measurement of Flower's own app from its per-round seconds (no byte ledger: NaN)."""
    counted = {r: s for r, s in seconds.items() if r >= 2} or seconds
    return Measurement(
        variant="flower", method=method, nodes=nodes, rounds=rounds,
        seconds_per_round=float(np.mean(list(counted.values()))), median_seconds_per_round=float(np.median(list(counted.values()))),
        rounds_counted=sorted(counted),
        round1_seconds=seconds.get(1, float("nan")),
        superlink_peak_mib=peaks["superlink"], serverapp_peak_mib=peaks["serverapp"], supernodes_peak_mib=peaks["supernodes"],
        device_peak_mib=peaks["supernodes"] / nodes, bytes_per_round=float("nan"), traffic_ratio_vs_fedavg=float("nan"),
        run_wall_seconds=wall, load_average_1min_after=os.getloadavg()[0], run_dir=str(run_dir),
    )


def summarise(variant: str, method: str, nodes: int, rounds: int, run_dir: Path, peaks: dict[str, float], wall: float) -> Measurement:
    """A Measurement from the run directory and the sampled peaks."""
    records = RunDirectory(run_dir).read_metrics()
    summary = json.loads((run_dir / "summary.json").read_text())
    counted = [r for r in records if r["round"] >= 2] or records
    return Measurement(
        variant=variant, method=method, nodes=nodes, rounds=rounds,
        seconds_per_round=float(np.mean([r["seconds"] for r in counted])),
        median_seconds_per_round=float(np.median([r["seconds"] for r in counted])),
        rounds_counted=[r["round"] for r in counted],
        round1_seconds=records[0]["seconds"],
        superlink_peak_mib=peaks["superlink"], serverapp_peak_mib=peaks["serverapp"], supernodes_peak_mib=peaks["supernodes"],
        device_peak_mib=peaks["supernodes"] / nodes,
        bytes_per_round=float(np.mean([r["bytes_up"] + r["bytes_down"] for r in records])),
        traffic_ratio_vs_fedavg=summary["traffic_ratio_vs_fedavg"],
        run_wall_seconds=wall, load_average_1min_after=os.getloadavg()[0], run_dir=str(run_dir),
    )


# ------------------------------------------------------------------ results
def series(m: Measurement) -> str:
    """Which line a measurement belongs to: variant and method."""
    return f"{m.variant} {m.method}"


def growth_exponents(measurements: Sequence[Measurement]) -> dict[str, float]:
    """Per series (``series``) with at least two node counts: the slope of log(s/round) against log N."""
    exponents = {}
    for method in dict.fromkeys(series(m) for m in measurements):
        points = [(math.log(m.nodes), math.log(m.seconds_per_round)) for m in measurements if series(m) == method]
        if len({x for x, _ in points}) >= 2:
            x, y = np.array(points).T
            exponents[method] = float(np.polyfit(x, y, 1)[0])
    return exponents


def markdown(measurements: Sequence[Measurement], exponents: dict[str, float]) -> str:
    """The results table and the growth exponents, as markdown."""
    lines = [
        "| variant | method | N | s/round (mean) | s/round (median) | round 1 s | SuperLink tree peak MiB | ServerApp peak MiB | SuperNodes peak MiB (all N) | per device MiB | MB/round | traffic vs FedAvg | messages answered warm / cold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {m.variant} | {m.method} | {m.nodes} | {m.seconds_per_round:.1f} | {m.median_seconds_per_round:.1f} | {m.round1_seconds:.1f} | {m.superlink_peak_mib:.0f} | "
        f"{m.serverapp_peak_mib:.0f} | {m.supernodes_peak_mib:.0f} | {m.device_peak_mib:.0f} | {m.bytes_per_round / 1e6:.3f} | {m.traffic_ratio_vs_fedavg:.1%} | "
        f"{m.paths.cell(m.variant) if VARIANTS[m.variant][0] == 'fedlayer' else '-'} |"
        for m in measurements
    ]
    fallbacks = [f"{series(m)}, N={m.nodes}: {m.answered_cold} of {m.answered_warm + m.answered_cold} messages ran cold"
                 + (f" ({m.cold_reasons})" if m.cold_reasons else "") for m in measurements if m.ran_cold]
    if fallbacks:
        lines += ["", "**A warm variant ran cold** (its times mix both paths; rerun it): " + "; ".join(fallbacks) + "."]
    by = {(m.variant, m.method, m.nodes): m.median_seconds_per_round for m in measurements}
    ratios = [f"N={n} {method}: warm/cold {by[('warm', method, n)] / by[('cold', method, n)]:.2f}"
              + (f", warm/flower {by[('warm', method, n)] / by[('flower', method, n)]:.2f}" if ("flower", method, n) in by else "")
              for (variant, method, n) in by if variant == "warm" and ("cold", method, n) in by]
    if ratios:
        lines += ["", f"Warm against cold (goal at N=16: <= {WARM_VS_COLD_GOAL}) and Flower's app, median s/round: " + "; ".join(ratios) + "."]
    if exponents:
        fitted = ", ".join(f"{method} {exponent:.2f}" for method, exponent in exponents.items())
        lines += ["", f"Growth exponent of s/round in N (least squares, log-log): {fitted}."]
    table = segments.markdown({f"{series(m)}, N={m.nodes}": m.segments for m in measurements})
    if table:
        lines += ["", "Per train message (rounds 2..R, `benchmarks/segments.py`):", "", table]
    return "\n".join(lines)


def plot(measurements: Sequence[Measurement], exponents: dict[str, float], path: Path) -> None:
    """s/round (with the fitted power law) and peak memory against N, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method in dict.fromkeys(series(m) for m in measurements):
        rows = [m for m in measurements if series(m) == method]
        nodes = np.array([m.nodes for m in rows], dtype=float)
        seconds = np.array([m.seconds_per_round for m in rows])
        line = time_ax.plot(nodes, seconds, "o-", label=method)[0]
        if method in exponents:
            scale = np.exp(np.mean(np.log(seconds) - exponents[method] * np.log(nodes)))
            time_ax.plot(nodes, scale * nodes ** exponents[method], ":", color=line.get_color(), label=f"{method} fit: N^{exponents[method]:.2f}")
        for field, style, name in (("superlink_peak_mib", "o-", "SuperLink tree"), ("serverapp_peak_mib", "s--", "ServerApp"), ("supernodes_peak_mib", "^:", "SuperNodes (all)")):
            memory_ax.plot(nodes, [getattr(m, field) for m in rows], style, color=line.get_color(), label=f"{method}: {name}")
    for ax, ylabel in ((time_ax, "seconds per round"), (memory_ax, "peak RSS (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="SuperNodes (N)", ylabel=ylabel)
        ax.set_xticks(sorted({m.nodes for m in measurements}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    time_ax.set_title("round time (linear on digits, loopback)")
    memory_ax.set_title("peak resident memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, settings: dict[str, Any], measurements: Sequence[Measurement]) -> None:
    """results.json, results.csv, results.md (the table) and the plot."""
    exponents = growth_exponents(measurements)
    rows = [dataclasses.asdict(m) for m in measurements]
    (out / "results.json").write_text(json.dumps({"settings": settings, "measurements": rows, "growth_exponents": exponents}, indent=2))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        flat = [{**{k: v for k, v in row.items() if k != "segments"}, "rounds_counted": " ".join(map(str, row["rounds_counted"])),
                 **{f"segment_{key}": row["segments"].get(key, "") for key in SEGMENT_KEYS}} for row in rows]
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    (out / "results.md").write_text(markdown(measurements, exponents) + "\n")
    plot(measurements, exponents, out / "deployment_scale.png")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8, 16], help="SuperNode counts to measure")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (round 1 is not counted when there are more)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["fedavg"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                        help="flower: Flower's own FedAvg app; cold/warm: fedlayer-client without/with its warm worker")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=Path("bench-out/deployment-scale"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.nodes) < 1 or args.interval <= 0:
        parser.error("--rounds and --nodes must be >= 1 and --interval > 0")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(model="linear", dataset="digits", cpus=os.cpu_count(), started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    measurements: list[Measurement] = []
    variants = [v for v in args.variants if not v.startswith("warm") or warm_available()]
    if variants != args.variants:
        print("fedlayer-client has no warm worker (no --cold option): the warm variant is left out", flush=True)
    runs = [(nodes, variant, method) for nodes in sorted(set(args.nodes)) for variant in variants
            for method in (["fedavg"] if variant == "flower" else args.methods)]
    for index, (nodes, variant, method) in enumerate(runs, 1):
        print(f"[{index}/{len(runs)}] {variant} {method} on {nodes} SuperNodes, {args.rounds} rounds ...", flush=True)
        m = measure(variant, method, nodes, args.rounds, args.out, args.interval, args.timeout)
        print(
            f"[{index}/{len(runs)}] {variant} {method}, N={nodes}: {m.seconds_per_round:.1f} s/round, {m.device_peak_mib:.0f} MiB per device, SuperLink tree "
            f"{m.superlink_peak_mib:.0f} MiB, ServerApp {m.serverapp_peak_mib:.0f} MiB, "
            f"{m.bytes_per_round / 1e6:.3f} MB/round ({m.run_wall_seconds:.0f} s in all)",
            flush=True,
        )
        measurements.append(m)
        write_results(args.out, settings, measurements)  # after every run: an interrupted sweep keeps what it measured
    print((args.out / "results.md").read_text(), end="")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
