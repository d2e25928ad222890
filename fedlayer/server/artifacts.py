"""Writes and draws a method's end-of-run report into the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlayer.method_report import MethodReport


def write_method_report(report: MethodReport, run_dir: Path) -> list[Path]:
    """``report``'s JSON documents, arrays and figures in ``run_dir``; the paths written."""
    written: list[Path] = []
    for name, document in report.documents.items():
        path = run_dir / name
        path.write_text(json.dumps(document, indent=2))
        written.append(path)
    if report.intervals is None and report.layer_weights is None:
        return written
    from fedlayer.plots import plot_intervals, plot_layer_weights  # matplotlib only where a run ends

    if report.intervals is not None and report.intervals.rows:
        history = report.intervals
        written.append(plot_intervals(history.rows, history.layer_names, history.phi, run_dir / "intervals.png"))
    if report.layer_weights is not None:
        weights = report.layer_weights
        np.save(run_dir / f"{weights.name}.npy", weights.final)
        written.append(run_dir / f"{weights.name}.npy")
        written.append(plot_layer_weights(weights.final, weights.layer_names, weights.self_weights, run_dir / f"{weights.name}.png"))
    return written
