"""``fedlayer report RUN_DIR [RUN_DIR ...] [--out DIR]``: one table for one or many runs.

Reads what each run directory holds (``metrics.jsonl``, ``summary.json`` once
the run finished, ``config.yaml``, ``clients.csv``), so it also reports a
run still going or one that stopped. Prints the table; with ``--out`` it also
writes it as ``runs.csv`` and ``runs.json`` with the comparison figures
(``accuracy.png``: against rounds and megabytes, ``layer_bytes.png``,
``client_latency.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

#: Columns of the table, in order.
COLUMNS = (
    "run", "method", "dataset", "rounds", "final_accuracy", "megabytes", "share_of_fedavg",
    "wall_seconds", "refusals", "dropped_rounds", "status",
)


class NotARunDirectory(ValueError):
    """A path given to ``fedlayer report`` is not a fedlayer run directory."""


@dataclass
class Run:
    """What one run directory holds."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    clients: list[dict[str, str]]

    @property
    def label(self) -> str:
        return f"{self.config['strategy']['name']} ({self.path.name})"


def load_run(path: Path) -> Run:
    """Read a run directory; ``NotARunDirectory`` says what is missing."""
    path = Path(path)
    config_path, metrics_path = path / "config.yaml", path / "metrics.jsonl"
    if not config_path.is_file() or not metrics_path.is_file():
        raise NotARunDirectory(f"{path} is not a fedlayer run directory (it needs config.yaml and metrics.jsonl)")
    config = OmegaConf.to_container(OmegaConf.load(config_path))
    assert isinstance(config, dict)
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    summary_path, clients_path = path / "summary.json", path / "clients.csv"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    clients: list[dict[str, str]] = []
    if clients_path.is_file():
        with open(clients_path, newline="") as fh:
            clients = list(csv.DictReader(fh))
    return Run(path, config, records, summary, clients)


def table_row(run: Run) -> dict[str, Any]:
    """The run's row: from ``summary.json`` when it finished, else from its metrics lines so far."""
    records = run.records
    total = sum(r["bytes_up"] + r["bytes_down"] for r in records)
    fedavg = sum(r["fedavg_bytes_up"] + r["fedavg_bytes_down"] for r in records)
    accuracies = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    row = {
        "run": run.path.name,
        "method": run.config["strategy"]["name"],
        "dataset": run.config["dataset"]["name"],
        "rounds": f"{records[-1]['round'] if records else 0}/{run.config['federation']['rounds']}",
        "final_accuracy": accuracies[-1] if accuracies else None,
        "megabytes": total / 1e6,
        "share_of_fedavg": total / fedavg if fedavg else None,
        "wall_seconds": sum(r.get("seconds", 0.0) for r in records),
        "refusals": sum(r.get("rejected", 0) for r in records),
        "dropped_rounds": sum(bool(r.get("update_dropped")) for r in records),
        "status": "finished" if run.summary is not None else "stopped" if (run.path / "error.txt").is_file() else "running",
    }
    if run.summary is not None:
        summary = run.summary
        row.update(
            final_accuracy=summary["final_accuracy"],
            megabytes=summary["bytes_total"] / 1e6,
            share_of_fedavg=summary["traffic_ratio_vs_fedavg"],
            wall_seconds=summary["wall_seconds"],
            refusals=summary["rejected_replies"],
            dropped_rounds=summary["dropped_updates"],
        )
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    cells = [list(COLUMNS)] + [[_cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def write_outputs(runs: list[Run], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The table as CSV and JSON, and the comparison figures, in ``out``."""
    from fedlayer import plots  # matplotlib: only when figures are asked for

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out / "runs.json").write_text(json.dumps(rows, indent=2) + "\n")
    labelled = [(run.label, run.records) for run in runs]
    return [
        out / "runs.csv",
        out / "runs.json",
        plots.plot_accuracy_comparison(labelled, out / "accuracy.png"),
        plots.plot_layer_bytes(labelled, out / "layer_bytes.png"),
        plots.plot_client_latency([(run.label, run.clients) for run in runs], out / "client_latency.png"),
    ]


def report(run_dirs: Sequence[Path], out: Path | None = None) -> str:
    """The table of ``run_dirs`` (and, with ``out``, the files); ``NotARunDirectory`` on a bad path."""
    runs = [load_run(Path(path)) for path in run_dirs]
    rows = [table_row(run) for run in runs]
    if out is not None:
        write_outputs(runs, rows, out)
    return format_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedlayer report ...``."""
    parser = argparse.ArgumentParser(prog="fedlayer", description="Tools for fedlayer run directories.")
    commands = parser.add_subparsers(dest="command", required=True)
    report_parser = commands.add_parser("report", help="one table (and figures) for one or more run directories")
    report_parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    report_parser.add_argument("--out", type=Path, help="also write runs.csv, runs.json and the figures here")
    args = parser.parse_args(argv)
    try:
        print(report(args.run_dirs, args.out))
    except NotARunDirectory as err:
        print(f"fedlayer report: error: {err}", file=sys.stderr)
        return 2
    if args.out is not None:
        print(f"fedlayer report: table and figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
