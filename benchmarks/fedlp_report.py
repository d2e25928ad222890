"""FedLP's levers (issue #19): accuracy over seeds against uplink share, per partition.

    python -m benchmarks.fedlp_report bench-out/fedlp-levers [--last 3]

Reads a harness output folder (``results.json`` and each run's
``metrics.jsonl``) of ``benchmarks/suites/fedlp_levers.yaml``, whose variants
are named ``<variant>@<partition>-s<seed>`` and grouped by the dataset,
partition and seed of each run's summary. Per run: the final accuracy as the
mean of the last ``--last`` central evaluations, and its measured uplink and
total bytes as shares of the FedAvg run of the same setting (same partition
and seed). Per variant and partition: mean, standard deviation, min and max
over the seeds, and the mean over its seeds of its difference to FedAvg's
run of the same seed (so a variant run on fewer seeds is compared on those). Written there: ``fedlp_levers.csv`` (one row per run),
``fedlp_levers.json`` and ``fedlp_levers.md`` (the aggregates) and
``accuracy_vs_uplink.png`` (mean accuracy against mean uplink share, min-max
bars, one panel per partition).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedlayer.server.rundir import RunDirectory  # noqa: E402

BASELINE = "fedavg"


def _label(run: dict[str, Any]) -> tuple[str, int, str]:
    """(setting, seed, variant) of a harness run: the setting is dataset and partition from the run's
    summary, the variant its suite name up to ``@`` (``fedlp-damped@dirichlet-s1`` -> ``fedlp-damped``)."""
    return f"{run['dataset']}, {run['partition']}", int(run["seed"]), run["variant"].split("@", 1)[0]


def last_mean(run_dir: str, last: int) -> float:
    """Mean of the last ``last`` central accuracies of a run."""
    accuracies = [r["accuracy"] for r in RunDirectory(Path(run_dir)).read_metrics() if r.get("accuracy") is not None]
    return float(np.mean(accuracies[-last:]))


def per_run(results: list[dict[str, Any]], last: int) -> list[dict[str, Any]]:
    """One row per run: accuracy (last-``last`` mean and final), bytes, shares of the FedAvg run
    of the same setting and seed."""
    labelled = [(_label(r), r) for r in results]
    rows = []
    for (setting, seed, variant), r in labelled:
        base = next((b for (s, d, v), b in labelled if (s, d, v) == (setting, seed, BASELINE)), None)
        accuracy = last_mean(r["run_dir"], last)
        rows.append({
            "setting": setting,
            "seed": seed,
            "variant": variant,
            "accuracy": accuracy,
            "vs_fedavg_pt": (accuracy - last_mean(base["run_dir"], last)) * 100 if base else None,
            "final_accuracy": r["final_accuracy"],
            "bytes_up": r["bytes_up"],
            "bytes_total": r["bytes_total"],
            "uplink_share": r["bytes_up"] / base["bytes_up"] if base else None,
            "total_share": r["bytes_total"] / base["bytes_total"] if base else None,
            "wall_seconds": r["wall_seconds"],
        })
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, variant): mean, std, min, max over seeds; the mean difference to FedAvg's run of the same seed."""
    out = []
    order = list(dict.fromkeys((r["setting"], r["variant"]) for r in rows))
    for setting, variant in sorted(order, key=lambda k: (k[0], order.index(k))):
        runs = [r for r in rows if r["setting"] == setting and r["variant"] == variant]
        acc = np.array([r["accuracy"] for r in runs])
        up = [r["uplink_share"] for r in runs if r["uplink_share"] is not None]
        total = [r["total_share"] for r in runs if r["total_share"] is not None]
        paired = [r["vs_fedavg_pt"] for r in runs if r["vs_fedavg_pt"] is not None]  # each seed against its own FedAvg run
        out.append({
            "setting": setting,
            "variant": variant,
            "seeds": sorted(r["seed"] for r in runs),
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "accuracy_min": float(acc.min()),
            "accuracy_max": float(acc.max()),
            "uplink_share": float(np.mean(up)) if up else None,
            "total_share": float(np.mean(total)) if total else None,
            "wall_seconds": float(np.mean([r["wall_seconds"] for r in runs])),
            "vs_fedavg_pt": float(np.mean(paired)) if paired else None,
        })
    return out


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def markdown(table: list[dict[str, Any]], last: int) -> str:
    """The aggregate table in Markdown."""
    lines = [
        f"Accuracy: mean of the last {last} central evaluations, then mean ± std (min-max) over seeds; "
        "vs FedAvg: the difference to FedAvg's run of the same partition and seed, mean over the variant's seeds; "
        "shares: measured bytes over that FedAvg run, mean over seeds.",
        "",
        "| setting | variant | seeds | accuracy | vs FedAvg | uplink vs FedAvg | total vs FedAvg | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        delta = "" if row["variant"] == BASELINE or row["vs_fedavg_pt"] is None else f"{row['vs_fedavg_pt']:+.1f} pt"
        lines.append(
            f"| {row['setting']} | {row['variant']} | {len(row['seeds'])} | {row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} "
            f"({row['accuracy_min']:.3f}-{row['accuracy_max']:.3f}) | {delta} | {_share(row['uplink_share'])} | "
            f"{_share(row['total_share'])} | {row['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Mean accuracy against mean uplink share, min-max bars, one panel per setting."""
    settings = list(dict.fromkeys(r["setting"] for r in table))
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for row in (r for r in table if r["setting"] == setting and r["uplink_share"] is not None):
            y, x = row["accuracy_mean"], row["uplink_share"] * 100
            ax.errorbar(x, y, yerr=[[y - row["accuracy_min"]], [row["accuracy_max"] - y]], fmt="o", capsize=3, label=row["variant"])
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("uplink bytes, % of FedAvg's")
        ax.set_ylabel("central accuracy (mean of last evaluations)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="harness output folder (with results.json)")
    parser.add_argument("--last", type=int, default=3, help="central evaluations averaged per run (default 3)")
    args = parser.parse_args(argv)
    results = json.loads((args.out / "results.json").read_text())
    rows = per_run(results, args.last)
    with open(args.out / "fedlp_levers.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = aggregate(rows)
    (args.out / "fedlp_levers.json").write_text(json.dumps({"last": args.last, "runs": rows, "table": table}, indent=2))
    text = markdown(table, args.last)
    (args.out / "fedlp_levers.md").write_text(text)
    plot(table, args.out / "accuracy_vs_uplink.png")
    print(text)


if __name__ == "__main__":
    main()
