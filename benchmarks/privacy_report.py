"""Accuracy against epsilon from privacy benchmark suites (issue 29).

    python -m benchmarks.privacy_report bench-out/privacy bench-out/privacy_cohort --out bench-out/privacy-report

Each argument is a harness output folder (``results.json``; suites
``privacy.yaml``, ``privacy_cohort.yaml``); runs of the same setting (dataset,
model, clients a round, rounds, delta) share a panel and table, whichever
folder they are in. A variant's method is its name
without the ``_eps<N>`` suffix; its epsilon is the run's
``privacy.target_epsilon`` (no privacy: "no DP"). Accuracy is the mean of a
run's last three evaluations; over seeds, the table gives mean +- sample
standard deviation and the plot mean with min-max bars. Seconds per round are
the median of rounds 2.. (round 1 starts the clients), medians over seeds.
Writes ``privacy.png``, ``privacy.csv`` and ``privacy.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any

from fedlayer.plots import EpsilonPoint, plot_accuracy_by_epsilon
from fedlayer.server.rundir import RunDirectory

LAST_EVALUATIONS = 3


def run_numbers(result: dict[str, Any]) -> dict[str, Any]:
    """One run's accuracy (mean of its last evaluations), seconds per round, and health."""
    records = RunDirectory(Path(result["run_dir"])).read_metrics()
    accuracies = [r["accuracy"] for r in records if r.get("accuracy") is not None][-LAST_EVALUATIONS:]
    seconds = [r["seconds"] for r in records if r["round"] > 1]
    privacy = result.get("privacy") or {}
    return {
        "method": re.sub(r"_eps[0-9.]+$", "", result["variant"]),
        "target_epsilon": privacy.get("target_epsilon") if privacy.get("mode", "off") != "off" else None,
        "epsilon": privacy.get("epsilon"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "accuracy": statistics.fmean(accuracies) if accuracies else None,
        "rounds": len(records),
        "seconds_per_round": statistics.median(seconds) if seconds else None,
        "error_replies": sum(r.get("error_replies", 0) for r in records),
        "refused_replies": sum(r.get("rejected", 0) for r in records),
        "replies": sum(r["replies"] for r in records),
        "replies_per_round": statistics.fmean(r["replies"] for r in records) if records else 0.0,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, epsilon): accuracy over seeds, epsilon spent, seconds per round."""
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["target_epsilon"]), []).append(run)
    rows = []
    for (method, target), group in groups.items():
        accuracies = [r["accuracy"] for r in group if r["accuracy"] is not None]
        seconds = [r["seconds_per_round"] for r in group if r["seconds_per_round"] is not None]
        spent = [r["epsilon"] for r in group if r["epsilon"] is not None]
        rows.append({
            "method": method,
            "target_epsilon": target,
            "noise_multiplier": group[0]["noise_multiplier"] if target is not None else None,
            "epsilon_spent": max(spent) if spent else None,
            "seeds": len(accuracies),
            "accuracy_mean": statistics.fmean(accuracies) if accuracies else None,
            "accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "accuracy_min": min(accuracies, default=None),
            "accuracy_max": max(accuracies, default=None),
            "rounds": "/".join(sorted({str(r["rounds"]) for r in group})),
            "seconds_per_round": statistics.median(seconds) if seconds else None,
            "error_replies": sum(r["error_replies"] for r in group),
            "refused_replies": sum(r["refused_replies"] for r in group),
            "replies": sum(r["replies"] for r in group),
        })
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(rows, key=lambda r: (methods.index(r["method"]), r["target_epsilon"] is None, r["target_epsilon"] or 0))


def add_dp_overhead(rows: list[dict[str, Any]]) -> None:
    """Seconds per round each DP row adds to its method's no-DP row."""
    base = {r["method"]: r["seconds_per_round"] for r in rows if r["target_epsilon"] is None}
    for row in rows:
        reference = base.get(row["method"])
        dp = row["target_epsilon"] is not None and reference is not None and row["seconds_per_round"] is not None
        row["dp_seconds_added"] = row["seconds_per_round"] - reference if dp else None


def panel_title(result: dict[str, Any], run: dict[str, Any]) -> str:
    """The setting a run belongs to: runs of equal settings from several folders share a panel."""
    return (
        f"{result['dataset']}, {result['model']}, {round(run['replies_per_round'])} of {result['num_clients']} clients a round, "
        f"{result['rounds']} rounds"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(title: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| method | epsilon | noise multiplier | epsilon spent | accuracy (mean +- sd) | min-max | seeds | rounds | s/round | DP adds s/round | refused / error / all replies |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accuracy = _fmt(r["accuracy_mean"], ".3f") + ("" if r["accuracy_sd"] is None else f" +- {r['accuracy_sd']:.3f}")
        lines.append(
            f"| {r['method']} | {_fmt(r['target_epsilon'], 'g') if r['target_epsilon'] is not None else 'no DP'} | "
            f"{_fmt(r['noise_multiplier'], 'g')} | {_fmt(r['epsilon_spent'], '.3f')} | {accuracy} | "
            f"{_fmt(r['accuracy_min'], '.3f')}-{_fmt(r['accuracy_max'], '.3f')} | {r['seeds']} | {r['rounds']} | "
            f"{_fmt(r['seconds_per_round'], '.2f')} | {_fmt(r['dp_seconds_added'], '+.2f')} | {r['refused_replies']} / {r['error_replies']} / {r['replies']} |"
        )
    return [*lines, ""]


def report(folders: list[Path], out: Path) -> dict[str, list[dict[str, Any]]]:
    """Tables and the plot for each harness folder; returns title -> rows."""
    out.mkdir(parents=True, exist_ok=True)
    settings: dict[str, list[dict[str, Any]]] = {}
    for folder in folders:
        if not (folder / "results.json").exists():
            raise SystemExit(f"privacy_report: {folder} has no results.json (not a harness output folder, or no run finished yet)")
        results = json.loads((folder / "results.json").read_text())
        if not results:
            raise SystemExit(f"privacy_report: {folder / 'results.json'} holds no runs")
        for result in results:
            run = run_numbers(result)
            settings.setdefault(panel_title(result, run), []).append(run)
    tables: dict[str, list[dict[str, Any]]] = {}
    for title, runs in settings.items():
        tables[title] = summarise(runs)
        add_dp_overhead(tables[title])
    panels: dict[str, dict[str, list[EpsilonPoint]]] = {
        title: {
            method: [(r["target_epsilon"], r["accuracy_mean"], r["accuracy_min"], r["accuracy_max"]) for r in rows if r["method"] == method and r["accuracy_mean"] is not None]
            for method in dict.fromkeys(r["method"] for r in rows)
        }
        for title, rows in tables.items()
    }
    plot_accuracy_by_epsilon(panels, out / "privacy.png")
    with open(out / "privacy.csv", "w", newline="") as handle:
        fields = ["setting", *next(iter(tables.values()))[0]]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for title, rows in tables.items():
            writer.writerows({"setting": title, **row} for row in rows)
    lines = [
        "Accuracy: mean of each run's last three evaluations; mean +- sample sd over seeds.",
        "s/round: median of rounds 2.. (medians over seeds); 'DP adds': minus the same method's no-DP row.",
        "Replies: over all seeds; refused (non-finite or out-of-range updates, by the server) and error replies (the client failed).",
        "",
    ]
    for title, rows in tables.items():
        lines += markdown(title, rows)
    (out / "privacy.md").write_text("\n".join(lines))
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="harness output folders (each with results.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for privacy.png, privacy.csv, privacy.md")
    args = parser.parse_args(argv)
    report(args.folders, args.out)
    print((args.out / "privacy.md").read_text())


if __name__ == "__main__":
    main()
