"""Figures of runs: accuracy against rounds and megabytes, bytes per layer, client
round trips, and the methods' own (FedLAMA's intervals, pFedLA's layer weights).

One module for the run directory's figures (the server draws them at the end
of a run), for ``fedlayer report``'s comparison of several runs and for the
benchmarks' accuracy-against-bytes figure.
Inputs are what a run directory holds: ``metrics.jsonl`` lines and
``clients.csv`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Records = list[dict[str, Any]]


def cumulative_megabytes(records: Records) -> list[float]:
    """Cumulative bytes (both directions) after each round, in MB."""
    total, out = 0, []
    for record in records:
        total += record["bytes_up"] + record["bytes_down"]
        out.append(total / 1e6)
    return out


def plot_accuracy(ax_round: Axes, ax_bytes: Axes, records: Records, label: str | None = None) -> None:
    """One run's central accuracy against rounds (integer ticks) and against cumulative MB."""
    megabytes = dict(zip((r["round"] for r in records), cumulative_megabytes(records)))
    evaluated = [r for r in records if r.get("accuracy") is not None]
    rounds = [r["round"] for r in evaluated]
    accuracy = [r["accuracy"] for r in evaluated]
    ax_round.plot(rounds, accuracy, marker="o", label=label)
    ax_bytes.plot([megabytes[r] for r in rounds], accuracy, marker="o", label=label)
    ax_round.set_xlabel("round")
    ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_bytes.set_xlabel("cumulative traffic, both directions (MB)")
    for ax in (ax_round, ax_bytes):
        ax.set_ylabel("central test accuracy")
        ax.grid(alpha=0.3)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(records: Records, path: Path, title: str) -> Path:
    """Accuracy vs round and vs cumulative MB, side by side, as a PNG."""
    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    plot_accuracy(ax_round, ax_bytes, records)
    fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy_comparison(runs: Sequence[tuple[str, Records]], path: Path) -> Path:
    """Every run's accuracy against rounds and against cumulative MB, one line per run."""
    fig, (ax_round, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, records in runs:
        plot_accuracy(ax_round, ax_bytes, records, label)
    ax_bytes.legend(fontsize="small")
    return _save(fig, path)


def plot_accuracy_by_bytes(panels: dict[str, Sequence[tuple[str, Records]]], path: Path) -> Path:
    """Accuracy against cumulative MB, one panel per setting (title -> labelled runs)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for label, records in runs:
            megabytes = cumulative_megabytes(records)
            points = [(mb, r["accuracy"]) for mb, r in zip(megabytes, records) if r.get("accuracy") is not None]
            ax.plot([mb for mb, _ in points], [acc for _, acc in points], marker=".", label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("cumulative traffic (MB)")
        ax.set_ylabel("central test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


EpsilonPoint = tuple[float | None, float, float, float]  # (epsilon or None for no DP, mean, low, high)


def plot_accuracy_by_epsilon(panels: dict[str, dict[str, Sequence[EpsilonPoint]]], path: Path) -> Path:
    """Accuracy against epsilon (log scale, 'no DP' at the right), one line per method with its
    spread as error bars, one panel per setting (title -> method -> points)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    names = list(dict.fromkeys(method for methods in panels.values() for method in methods))
    colours = {method: f"C{i}" for i, method in enumerate(names)}  # one colour per method in every panel
    for ax, (title, methods) in zip(axes[0], panels.items()):
        finite = sorted({eps for points in methods.values() for eps, *_ in points if eps is not None})
        no_dp_x = (np.log2(finite[-1]) + 1.5) if finite else 0.0
        for offset, (method, points) in enumerate(methods.items()):
            ordered = sorted(points, key=lambda p: np.inf if p[0] is None else p[0])
            x = [(no_dp_x if eps is None else np.log2(eps)) + 0.06 * (offset - (len(methods) - 1) / 2) for eps, *_ in ordered]
            mean = np.array([p[1] for p in ordered])
            spread = np.array([[m - p[2] for m, p in zip(mean, ordered)], [p[3] - m for m, p in zip(mean, ordered)]])
            ax.errorbar(x, mean, yerr=spread, marker="o", capsize=3, label=method, color=colours[method])
        ax.set_xticks([*np.log2(finite), no_dp_x], [*(f"{eps:g}" for eps in finite), "no DP"])
        ax.set_xlabel("epsilon")
        ax.set_ylabel("central test accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def layer_totals(records: Records) -> dict[str, int]:
    """Bytes per layer over the run, both directions."""
    totals: dict[str, int] = {}
    for record in records:
        for key in ("layer_bytes_up", "layer_bytes_down"):
            for layer, nbytes in (record.get(key) or {}).items():
                totals[layer] = totals.get(layer, 0) + int(nbytes)
    return totals


def _grouped_bars(ax: Axes, groups: list[str], series: Sequence[tuple[str, dict[str, float]]]) -> None:
    """One group of bars per ``groups`` entry, one bar per series (missing: 0)."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series):
        positions = [g + i * width - 0.4 + width / 2 for g in range(len(groups))]
        ax.bar(positions, [values.get(group, 0.0) for group in groups], width, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")


def plot_layer_bytes(runs: Sequence[tuple[str, Records]], path: Path) -> Path:
    """Megabytes per layer over each run, both directions, grouped by layer."""
    series = [(label, {layer: n / 1e6 for layer, n in layer_totals(records).items()}) for label, records in runs]
    layers = list(dict.fromkeys(layer for _, values in series for layer in values))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(layers) * max(len(runs), 1) + 2), 4.2))
    _grouped_bars(ax, layers, series)
    ax.set_ylabel("MB over the run, both directions")
    return _save(fig, path)


def plot_client_latency(runs: Sequence[tuple[str, list[dict[str, str]]]], path: Path) -> Path:
    """Each client's median round trip (``clients.csv``), grouped by client id."""
    series = [
        (label, {row["client"]: float(row["median_round_trip_seconds"]) for row in rows if row.get("median_round_trip_seconds")})
        for label, rows in runs
    ]
    clients = sorted({c for _, values in series for c in values}, key=lambda c: (len(c), c))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(clients) * max(len(runs), 1) + 2), 4.2))
    _grouped_bars(ax, clients, series)
    ax.set_xlabel("client id")
    ax.set_ylabel("median round trip (s)")
    return _save(fig, path)


def plot_intervals(intervals: Sequence[tuple[int, dict[str, int]]], names: Sequence[str], phi: int, path: Path) -> Path:
    """FedLAMA: each layer's aggregation interval (rounds) per round, as a heatmap."""
    grid = np.array([[by_layer.get(name, 1) for _, by_layer in intervals] for name in names], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(intervals) + 2), max(2.5, 0.35 * len(names) + 1)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=max(phi, 2), interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xticks(range(len(intervals)), [str(r) for r, _ in intervals], fontsize=6)
    ax.set_xlabel("round")
    ax.set_title(f"FedLAMA intervals (rounds), phi={phi}")
    fig.colorbar(image, ax=ax, label="interval (rounds)")
    return _save(fig, path)


def plot_layer_weights(weights: np.ndarray, names: Sequence[str], self_weights: Sequence[tuple[int, dict[str, float]]], path: Path) -> Path:
    """pFedLA: per layer, the client x client aggregation weights (receiver i, source j),
    and each layer's mean self-weight w_ii per round."""
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.6 * (len(names) + 1), 3.4), squeeze=False)
    for ax, name, matrix in zip(axes[0], names, weights):
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-9))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("client j (source)")
        ax.set_ylabel("client i (receiver)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax = axes[0][-1]
    for name in names:
        ax.plot([r for r, _ in self_weights], [by_layer[name] for _, by_layer in self_weights], label=name)
    ax.set_title("mean self-weight w_ii per round", fontsize=9)
    ax.set_xlabel("round")
    ax.legend(fontsize=7)
    return _save(fig, path)
