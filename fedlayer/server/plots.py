"""Plots of a run: accuracy against rounds and against cumulative megabytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def cumulative_megabytes(records: list[dict[str, Any]]) -> list[float]:
    """Cumulative bytes (both directions) after each round, in MB."""
    total, out = 0, []
    for record in records:
        total += record["bytes_up"] + record["bytes_down"]
        out.append(total / 1e6)
    return out


def plot_run(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy vs round and vs cumulative MB, side by side, as a PNG."""
    evaluated = [r for r in records if r.get("accuracy") is not None]
    megabytes = dict(zip((r["round"] for r in records), cumulative_megabytes(records)))
    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r["round"] for r in evaluated]
    accuracy = [r["accuracy"] for r in evaluated]
    ax_round.plot(rounds, accuracy, marker="o")
    ax_round.set_xlabel("round")
    ax_round.set_ylabel("central test accuracy")
    ax_bytes.plot([megabytes[r] for r in rounds], accuracy, marker="o")
    ax_bytes.set_xlabel("cumulative traffic, both directions (MB)")
    ax_bytes.set_ylabel("central test accuracy")
    for ax in (ax_round, ax_bytes):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
