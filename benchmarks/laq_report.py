"""Uplink bytes each run needs to reach the accuracy FedAvg reaches, plus LAQ's skips.

    python -m benchmarks.laq_report bench-out/laq

Reads a harness output folder (``results.json`` and each run's
``metrics.jsonl``). Per setting, the targets are FedAvg's final accuracy, 98%
of its best and its best; for each run the table gives the cumulative measured uplink
bytes at the first evaluated round reaching each target (counting from round
1), the ratio to FedAvg's bytes for the same target, and for LAQ runs the
uploads and skips over the whole run. Written to ``laq_report.md`` there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedlayer.server.rundir import RunDirectory

#: Targets below FedAvg's final accuracy, as fractions of its best accuracy in the setting.
FRACTIONS = (0.98, 1.0)
#: (round, accuracy or None, cumulative uplink bytes, strategy record) per round.
Curve = list[tuple[int, float | None, int, dict[str, Any]]]


def _curve(run_dir: str) -> Curve:
    """(round, accuracy, cumulative uplink bytes, strategy record) per round."""
    rows, up = [], 0
    for record in RunDirectory(Path(run_dir)).read_metrics():
        up += record["bytes_up"]
        rows.append((record["round"], record.get("accuracy"), up, record.get("strategy") or {}))
    return rows


def first_reaching(curve: Curve, target: float) -> tuple[int, int] | None:
    """(round, cumulative uplink bytes) of the first evaluated round with accuracy >= target."""
    for server_round, accuracy, up, _ in curve:
        if accuracy is not None and accuracy >= target - 1e-12:
            return server_round, up
    return None


def report(results: list[dict[str, Any]]) -> str:
    """The Markdown table."""
    lines = [
        "| setting | variant | target acc | round reached | uplink MB to target | vs FedAvg to same target | final acc | uploads | skips |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in sorted({r["setting"] for r in results}):
        runs = [r for r in results if r["setting"] == setting]
        base = next((r for r in runs if r["strategy"] == "fedavg"), None)
        if base is None:
            continue
        curves = {r["variant"]: _curve(r["run_dir"]) for r in runs}
        best = max(a for _, a, _, _ in curves[base["variant"]] if a is not None)
        targets = [("FedAvg final", base["final_accuracy"])]
        targets += [(f"{f:.0%} of FedAvg best", best * f) for f in FRACTIONS]
        for label, target in targets:
            base_hit = first_reaching(curves[base["variant"]], target)
            for r in runs:
                hit = first_reaching(curves[r["variant"]], target)
                last = curves[r["variant"]][-1][3]
                uploads = last.get("uploads_total", "-")
                skips = last.get("skips_total", "-")
                ratio = f"{hit[1] / base_hit[1]:.1%}" if hit and base_hit else "-"
                lines.append(
                    f"| {setting} | {r['variant']} | {target:.4f} ({label}) | "
                    f"{hit[0] if hit else 'not reached'} | {f'{hit[1] / 1e6:.2f}' if hit else '-'} | {ratio} | "
                    f"{r['final_accuracy']:.4f} | {uploads} | {skips} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="harness output folder (with results.json)")
    args = parser.parse_args(argv)
    results = json.loads((args.out / "results.json").read_text())
    text = report(results)
    (args.out / "laq_report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
