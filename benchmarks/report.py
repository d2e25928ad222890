"""Tables and plots of benchmark results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlayer.plots import plot_accuracy_by_bytes
from fedlayer.server.rundir import RunDirectory

BASELINE = "fedavg"


def _baseline(results: list[dict[str, Any]], setting: str) -> dict[str, Any] | None:
    return next((r for r in results if r["setting"] == setting and r["strategy"] == BASELINE), None)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def write_markdown(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """A Markdown table: accuracy, bytes, and share of the measured FedAvg run."""
    lines = [
        f"# {title}",
        "",
        "Bytes are measured from the serialised Flower messages. 'vs FedAvg run' divides by the"
        " FedAvg run of the same setting in this benchmark; 'vs FedAvg-equivalent' by what FedAvg"
        " would have sent for this run's own participation.",
        "",
        "| setting | variant | final acc | acc - FedAvg | up MB | down MB | up vs FedAvg run | total vs FedAvg run | total vs FedAvg-equivalent | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = _baseline(results, r["setting"])
        acc = r["final_accuracy"]
        delta = f"{(acc - base['final_accuracy']) * 100:+.2f} pt" if base and acc is not None else "-"
        up_ratio = r["bytes_up"] / base["bytes_up"] if base else None
        total_ratio = r["bytes_total"] / base["bytes_total"] if base else None
        lines.append(
            f"| {r['setting']} | {r['variant']} | {acc:.4f} | {delta} | {r['bytes_up'] / 1e6:.1f} | {r['bytes_down'] / 1e6:.1f} | "
            f"{_pct(up_ratio)} | {_pct(total_ratio)} | {_pct(r['traffic_ratio_vs_fedavg'])} | {r['wall_seconds']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot_accuracy_vs_bytes(results: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against cumulative traffic, one panel per setting."""
    panels = {
        setting: [(r["variant"], RunDirectory(Path(r["run_dir"])).read_metrics()) for r in results if r["setting"] == setting]
        for setting in sorted({r["setting"] for r in results})
    }
    if panels:
        plot_accuracy_by_bytes(panels, path)
