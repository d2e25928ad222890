"""Personalised accuracy of a pFedLA benchmark (run ``benchmarks/suites/pfedla.yaml`` first).

    python -m benchmarks.pfedla_report bench-out/pfedla [bench-out/more ...]

The harness table ranks runs by central accuracy, which says nothing about
personalisation. This reads each run's ``metrics.jsonl`` and reports, per
setting, the mean personalised accuracy: the clients' accuracy on their own
held-out test split (``dataset.client_test_fraction``), averaged over the
last ``--last`` rounds (with partial participation one round sees only some
clients). The columns:

- ``local-only``: ``strategy=local``, each client trains only its own model;
- ``FedAvg``: the global model on each client's test split (federated
  evaluation after aggregation, ``federation.fraction_evaluate=1``);
- ``FedAvg + FT``: the same FedAvg run, each client's accuracy after its
  local training of the received global model (one round of fine-tuning);
- every ``strategy=pfedla`` variant: each client's accuracy after local
  training of its personalised model; ``spread`` is std / min / max over the
  clients of the last round.

Accuracies from ``train`` metrics are example-weighted over the round's
clients, the same way for every method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedlayer.server.rundir import RunDirectory


def _records(run_dir: str) -> list[dict[str, Any]]:
    return RunDirectory(Path(run_dir)).read_metrics()


def _mean_last(values: list[float], last: int) -> float | None:
    tail = values[-last:]
    return sum(tail) / len(tail) if tail else None


def personalised(summary: dict[str, Any], last: int) -> dict[str, Any]:
    """The personalised numbers of one run."""
    records = _records(summary["run_dir"])
    trained = [r["train"]["local-test-accuracy"] for r in records if r.get("train") and "local-test-accuracy" in r["train"]]
    federated = [r["federated_evaluation"]["accuracy"] for r in records if r.get("federated_evaluation")]
    spread = next((r["strategy"]["personal_accuracy"] for r in reversed(records) if r.get("strategy", {}).get("personal_accuracy")), None)
    return {"after_training": _mean_last(trained, last), "global_on_clients": _mean_last(federated, last), "spread": spread}


def table(results: list[dict[str, Any]], last: int) -> str:
    """The Markdown table: per setting, the three baselines and every pFedLA variant."""
    lines = [
        f"Mean personalised test accuracy (each client's own held-out split), mean of the last {last} rounds;"
        " spread = std / min / max over the clients of the last round (pFedLA only).",
        "",
        "| setting | method | personalised acc | spread | vs best baseline |",
        "|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(r["setting"] for r in results):
        runs = {r["variant"]: (r["strategy"], personalised(r, last)) for r in results if r["setting"] == setting}
        rows: list[tuple[str, float | None, str]] = []
        for variant, (strategy, numbers) in runs.items():
            if strategy == "local":
                rows.append(("local-only", numbers["after_training"], "-"))
            elif strategy == "fedavg":
                rows.append(("FedAvg", numbers["global_on_clients"], "-"))
                rows.append(("FedAvg + FT", numbers["after_training"], "-"))
        baselines = [acc for _, acc, _ in rows if acc is not None]
        best = max(baselines) if baselines else None
        for variant, (strategy, numbers) in runs.items():
            if strategy == "pfedla":
                spread = numbers["spread"]
                text = f"{spread['std']:.3f} / {spread['min']:.3f} / {spread['max']:.3f}" if spread else "-"
                rows.append((variant, numbers["after_training"], text))
        for method, acc, spread_text in rows:
            gap = f"{(acc - best) * 100:+.2f} pt" if acc is not None and best is not None else "-"
            lines.append(f"| {setting} | {method} | {acc:.4f} | {spread_text} | {gap} |" if acc is not None else f"| {setting} | {method} | - | - | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="+", help="harness --out folders (results.json); runs of several are pooled")
    parser.add_argument("--last", type=int, default=3, help="average over this many final rounds")
    args = parser.parse_args(argv)
    results = [r for out in args.out for r in json.loads((out / "results.json").read_text())]
    text = table(results, args.last)
    (args.out[0] / "personalised.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
