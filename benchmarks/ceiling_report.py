"""The codec ceiling's table (issue #26): bytes each way as shares of FedAvg's, accuracy, codec seconds.

    python -m benchmarks.ceiling_report bench-out/ceiling [bench-out/ceiling-b ...] [--out DIR] [--last 3]

Reads harness output folders of ``benchmarks/suites/ceiling.yaml``
(``results.json`` and each run's ``metrics.jsonl``). Per run: accuracy as the
mean of the last ``--last`` central evaluations; total, uplink and downlink
bytes as shares of the ``fedavg`` variant's run of the same dataset,
partition and seed; the codec's seconds per round (``codec_seconds_per_round``:
the server's encode + decode plus a client's mean) and their share of the
round. Per variant and setting: mean and standard deviation over the seeds,
and the accuracy difference to FedAvg's (mean over seeds of the per-seed
difference). Written to ``--out`` (default: the first folder): ``ceiling.md``,
``ceiling.json`` and ``accuracy_vs_megabytes.png`` (mean accuracy against mean
total megabytes, one panel per setting, log scale).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedlayer.server.rundir import RunDirectory

BASELINE = "fedavg"


def run_row(run: dict[str, Any], last: int) -> dict[str, Any]:
    accuracies = [line["accuracy"] for line in RunDirectory(Path(run["run_dir"])).read_metrics() if line.get("accuracy") is not None]
    return {
        "variant": run["variant"], "setting": f"{run['dataset']} {run['partition']}", "seed": run["seed"],
        "accuracy": float(np.mean(accuracies[-last:])) if accuracies else float("nan"),
        "bytes_up": run["bytes_up"], "bytes_down": run["bytes_down"], "bytes_total": run["bytes_total"],
        "codec_seconds_per_round": run.get("codec_seconds_per_round"), "codec_seconds_share": run.get("codec_seconds_share"),
        "rejected": run["rejected_replies"], "dropped": run["dropped_updates"],
    }


def with_shares(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's bytes as shares of the FedAvg run of its setting and seed (rows without one are left out)."""
    base = {(r["setting"], r["seed"]): r for r in rows if r["variant"] == BASELINE}
    out = []
    for row in rows:
        fedavg = base.get((row["setting"], row["seed"]))
        if fedavg is None:
            continue
        out.append({**row, **{f"share_{d}": row[f"bytes_{d}"] / fedavg[f"bytes_{d}"] for d in ("total", "up", "down")},
                    "accuracy_vs_fedavg": row["accuracy"] - fedavg["accuracy"]})
    return out


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["variant"]), []).append(row)
    table = []
    for (setting, variant), runs in groups.items():
        def stat(key: str) -> tuple[float, float]:
            values = [r[key] for r in runs if r[key] is not None]
            return (float(np.mean(values)), float(np.std(values))) if values else (float("nan"), float("nan"))
        table.append({"setting": setting, "variant": variant, "seeds": len(runs),
                      **{key: stat(key) for key in ("accuracy", "accuracy_vs_fedavg", "share_total", "share_up", "share_down",
                                                    "codec_seconds_per_round", "codec_seconds_share", "bytes_total")},
                      "rejected": sum(r["rejected"] for r in runs), "dropped": sum(r["dropped"] for r in runs)})
    return table


def markdown(table: list[dict[str, Any]], last: int) -> str:
    lines = [f"| setting | variant | seeds | accuracy (last {last}) | vs FedAvg | total bytes | up | down | codec s/round | codec share of round |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        acc, spread = t["accuracy"]
        codec = t["codec_seconds_per_round"][0]
        share = t["codec_seconds_share"][0]
        lines.append(
            f"| {t['setting']} | {t['variant']} | {t['seeds']} | {acc:.3f}" + (f" ± {spread:.3f}" if t["seeds"] > 1 else "")
            + f" | {t['accuracy_vs_fedavg'][0] * 100:+.1f} pt | {t['share_total'][0]:.2%} | {t['share_up'][0]:.2%} | {t['share_down'][0]:.2%} | "
            + ("-" if np.isnan(codec) else f"{codec:.3f}") + " | " + ("-" if np.isnan(share) else f"{share:.1%}") + " |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({t["setting"] for t in table})
    figure, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for axis, setting in zip(axes[0], settings):
        for t in (t for t in table if t["setting"] == setting):
            megabytes = t["bytes_total"][0] / 1e6
            axis.errorbar(megabytes, t["accuracy"][0], yerr=t["accuracy"][1], fmt="o")
            axis.annotate(t["variant"], (megabytes, t["accuracy"][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set(title=setting, xlabel="total MB (both directions)", ylabel="accuracy (mean of last evaluations)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="harness output folders (results.json)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--last", type=int, default=3)
    args = parser.parse_args(argv)
    runs = [run for folder in args.folders for run in json.loads((folder / "results.json").read_text())]
    table = aggregate(with_shares([run_row(run, args.last) for run in runs]))
    out = args.out or args.folders[0]
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(table, args.last)
    (out / "ceiling.md").write_text(text)
    (out / "ceiling.json").write_text(json.dumps(table, indent=2))
    plot(table, out / "accuracy_vs_megabytes.png")
    print(text)


if __name__ == "__main__":
    main()
