"""Run strategies side by side on the same data, partition and seed.

    python -m benchmarks.harness benchmarks/suites/fedavg_mnist.yaml --out bench-out/fedavg

A suite file names common Hydra overrides, a grid of settings (every
combination is one *setting*) and the *variants* (strategies with their
parameters) run in each setting. Every run is a separate ``fedlayer-sim``
process, so runs cannot leak state into each other. Output in ``--out``:
``results.json`` (the runs' summaries), ``results.md`` (a table with each
variant's traffic as a share of FedAvg's in the same setting) and
``accuracy_vs_bytes.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.report import plot_accuracy_vs_bytes, write_markdown


def load_suite(path: Path) -> dict[str, Any]:
    """Read and check a suite file."""
    suite = yaml.safe_load(path.read_text())
    for key in ("variants",):
        if key not in suite:
            raise ValueError(f"{path}: suite needs '{key}'")
    suite.setdefault("common", [])
    suite.setdefault("grid", {})
    return suite


def restrict(suite: dict[str, Any], variants: list[str] | None, axes: list[str]) -> dict[str, Any]:
    """The suite with only ``variants`` (None: all) and each ``KEY=V1,V2`` grid axis cut to those values."""
    if variants is not None:
        unknown = sorted(set(variants) - set(suite["variants"]))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; the suite has {list(suite['variants'])}")
        suite["variants"] = {name: v for name, v in suite["variants"].items() if name in variants}
    for axis in axes:
        key, _, values = axis.partition("=")
        if key not in suite["grid"]:
            raise SystemExit(f"--grid {axis}: the suite's grid has no axis {key!r} (it has {list(suite['grid'])})")
        chosen = values.split(",")
        kept = [v for v in suite["grid"][key] if str(v) in chosen]
        if not kept:
            raise SystemExit(f"--grid {axis}: none of {chosen} is on the axis {suite['grid'][key]}")
        suite["grid"][key] = kept
    return suite


def settings(grid: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of the grid as a list of overrides."""
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*(grid[k] for k in keys))] or [[]]


def run_one(overrides: list[str], log_path: Path, in_process: bool = False) -> dict[str, Any] | None:
    """One simulation in its own process (``in_process``: without the simulation engine,
    ``benchmarks.inprocess_run``); returns its summary (None on failure)."""
    command = [sys.executable, "-m", "benchmarks.inprocess_run" if in_process else "fedlayer.commands.sim", *overrides]
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        print(f"  FAILED (exit {done.returncode}); log: {log_path}", flush=True)
        return None
    summary_path = next(
        (line.split("run directory ", 1)[1].strip() for line in log_path.read_text().splitlines() if "fedlayer: run directory " in line),
        None,
    )
    return json.loads((Path(summary_path) / "summary.json").read_text()) if summary_path else None


#: What a finished run keeps only to be resumed: a coded 30-round cnn run of 20 clients leaves 1-1.5 GB
#: here (the clients' references and residuals, the server's references and what it meant them to hold),
#: and a grid of such runs filled a 100 GB disk.
RESUME_STATE = ("checkpoints", "client-state", "server-state")


def drop_resume_state(run_dir: Path) -> None:
    """Remove a finished run's resume state; its summary, metrics, config and plots stay."""
    for name in RESUME_STATE:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def run_suite(suite: dict[str, Any], out: Path, keep: bool = False, in_process: bool = False,
              keep_state: bool = False) -> list[dict[str, Any]]:
    """Run every variant in every setting; write results as they come.

    ``keep``: runs already in ``out/results.json`` are kept, not run again
    (to complete a suite after a failed or interrupted run). Each finished
    run's resume state is removed unless ``keep_state``.
    """
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "results.json").read_text()) if keep and (out / "results.json").exists() else []
    results: list[dict[str, Any]] = list(previous)
    done = {(r["variant"], r["setting"]) for r in previous}
    jobs = [(s, name, v) for s in settings(suite["grid"]) for name, v in suite["variants"].items()]
    started = time.time()
    for index, (setting, name, variant) in enumerate(jobs, 1):
        overrides = [*suite["common"], *setting, *variant, f"output_dir={out / 'runs'}"]
        label = " ".join(setting) or "default"
        if (name, label) in done:
            continue
        print(f"[{index}/{len(jobs)}] {name} | {label} | {time.time() - started:.0f} s elapsed", flush=True)
        summary = run_one(overrides, out / f"run-{index:03d}.log", in_process)
        if summary is None:
            continue
        summary.update(variant=name, setting=label)
        results.append(summary)
        if not keep_state:
            drop_resume_state(Path(summary["run_dir"]))
        print(
            f"  accuracy {summary['final_accuracy']:.4f}, traffic {summary['traffic_ratio_vs_fedavg']:.1%} of FedAvg-equivalent, "
            f"{summary['wall_seconds']:.0f} s",
            flush=True,
        )
        (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "results.md", suite.get("title", "fedlayer benchmark"))
    plot_accuracy_vs_bytes(results, out / "accuracy_vs_bytes.png")
    return results


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", type=Path, help="suite YAML file (see benchmarks/suites)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench-out/<suite name>)")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, e.g. federation.rounds=3")
    parser.add_argument("--keep", action="store_true", help="keep the runs already in <out>/results.json; run the rest")
    parser.add_argument("--keep-state", action="store_true",
                        help="keep each finished run's resume state (checkpoints, client and server state; removed by default)")
    parser.add_argument("--in-process", action="store_true",
                        help="run each run in its own process without the simulation engine (benchmarks.inprocess_run)")
    parser.add_argument("--variants", nargs="*", default=None, help="run only these variants (names in the suite)")
    parser.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2",
                        help="restrict a grid axis to these values, e.g. dataset=mnist5k seed=0")
    args = parser.parse_args(argv)
    suite = restrict(load_suite(args.suite), args.variants, args.grid)
    suite["common"] = [*suite["common"], *args.set]
    out = args.out or Path("bench-out") / args.suite.stem
    run_suite(suite, out, keep=args.keep, in_process=args.in_process, keep_state=args.keep_state)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy_vs_bytes.png'}")


if __name__ == "__main__":
    main()
