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
  training of its personalised model.

Accuracies from ``train`` metrics are example-weighted over the round's
clients, the same way for every method. ``clients: mean / std / min / max``
is the spread over the clients in the last round, unweighted: pFedLA records
it per round; for the baselines, whose runs record only the round's mean, it
is recomputed from what the run left on disk:

- local-only: each client's kept model after the last round (the run's
  ``client-state`` folder) on its test split;
- FedAvg: the final global model (last checkpoint) on every client's split;
- FedAvg + FT: the global model of the checkpoint before the last, trained
  by every client exactly as in the last round (same seed), on its split
  (one round of local training, so this costs about one round of the run).

``check`` is the recomputed example-weighted mean next to the recorded one of
the last round (equal when every client took part in it). ``--no-spread``
skips the recomputation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedlayer.server.rundir import RunDirectory

#: ``context.state`` record of a kept model (``fedlayer.methods.client_half.LOCAL_MODEL``)
LOCAL_MODEL = "local-model"


def _records(run_dir: str) -> list[dict[str, Any]]:
    return RunDirectory(Path(run_dir)).read_metrics()


def _mean_last(values: list[float], last: int) -> float | None:
    tail = values[-last:]
    return sum(tail) / len(tail) if tail else None


def _stats(values: list[float], weights: list[float]) -> dict[str, float]:
    """Unweighted mean / std / min / max over clients, and the example-weighted mean (``weighted``)."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()), "std": float(array.std()), "min": float(array.min()), "max": float(array.max()),
        "clients": len(values), "weighted": float(np.average(array, weights=np.asarray(weights, dtype=np.float64))),
    }


def client_spreads(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per-client accuracies of a baseline run's last round, recomputed from its run directory.

    ``{"after_training": ...}`` for local-only, ``{"global_on_clients": ...,
    "after_training": ...}`` for FedAvg (see the module docstring).
    """
    import torch
    from omegaconf import OmegaConf

    from fedlayer.client.state import NodeStateFiles
    from fedlayer.layers import from_arrayrecord, torch_state_to_numpy
    from fedlayer.methods.client_half import ClientRuntime
    from fedlayer.server.checkpoint import CheckpointStore, decode_checkpoint
    from fedlayer.server.rundir import RunDirectory
    from fedlayer.training import train_steps

    from flwr.common.serde import ProtoRecordDict, recorddict_from_proto

    torch.set_num_threads(1)  # as the simulated clients
    run_dir = Path(summary["run_dir"])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    num_clients = int(cfg.federation.num_clients)
    runtimes = [ClientRuntime(cfg, c, num_clients, None, torch.device("cpu")) for c in range(num_clients)]
    sizes = [float(len(r.train_data)) for r in runtimes]
    test_sizes = [float(len(r.test_data)) for r in runtimes]

    def accuracy(runtime: ClientRuntime, model: torch.nn.Module) -> float:
        return float(runtime.reply_metrics(model)["local-test-accuracy"])

    if summary["strategy"] == "local":
        run_states = Path(cfg.client_state_dir) / f"run-{RunDirectory(run_dir).run_key}"  # the clients' round state
        values = []
        for runtime in runtimes:
            files = NodeStateFiles(run_states / f"partition-{runtime.partition_id:05d}")
            proto = ProtoRecordDict()
            proto.ParseFromString(files.path(files.rounds()[-1]).read_bytes())
            values.append(accuracy(runtime, runtime.model_with(from_arrayrecord(recorddict_from_proto(proto)[LOCAL_MODEL]))))
        return {"after_training": _stats(values, sizes)}
    paths = CheckpointStore(run_dir).paths()
    final, before = decode_checkpoint(paths[-1].read_bytes()), decode_checkpoint(paths[-2].read_bytes())
    on_clients = [accuracy(r, r.model_with(final.global_state)) for r in runtimes]
    tuned = []
    for runtime in runtimes:
        model = runtime.model_with(before.global_state)
        train_steps(model, runtime.train_data, cfg.train, runtime.device, runtime.round_seed(final.round))
        tuned.append(accuracy(runtime, runtime.model_with(torch_state_to_numpy(model.state_dict()))))
    return {"global_on_clients": _stats(on_clients, test_sizes), "after_training": _stats(tuned, sizes)}


def personalised(summary: dict[str, Any], last: int, spread: bool = True) -> dict[str, Any]:
    """The personalised numbers of one run: means of the last rounds, the last round's, its spread over clients."""
    records = _records(summary["run_dir"])
    trained = [r["train"]["local-test-accuracy"] for r in records if r.get("train") and "local-test-accuracy" in r["train"]]
    federated = [r["federated_evaluation"]["accuracy"] for r in records if r.get("federated_evaluation")]
    numbers: dict[str, Any] = {
        "after_training": _mean_last(trained, last),
        "global_on_clients": _mean_last(federated, last),
        "recorded_last": {"after_training": trained[-1] if trained else None, "global_on_clients": federated[-1] if federated else None},
        "spread": {},
    }
    if summary["strategy"] == "pfedla":
        recorded = next((r["strategy"]["personal_accuracy"] for r in reversed(records) if r.get("strategy", {}).get("personal_accuracy")), None)
        numbers["spread"] = {"after_training": recorded} if recorded else {}
    elif spread and summary["strategy"] in ("local", "fedavg"):
        numbers["spread"] = client_spreads(summary)
    return numbers


def _spread_text(spread: dict[str, float] | None) -> str:
    if not spread:
        return "-"
    return f"{spread['mean']:.3f} / {spread['std']:.3f} / {spread['min']:.3f} / {spread['max']:.3f} ({spread['clients']})"


def _check_text(spread: dict[str, float] | None, recorded: float | None) -> str:
    if not spread or "weighted" not in spread or recorded is None:
        return "-"
    return f"{spread['weighted']:.4f} vs {recorded:.4f}"


def table(results: list[dict[str, Any]], last: int, spread: bool = True) -> str:
    """The Markdown table: per setting, the three baselines and every pFedLA variant."""
    lines = [
        f"Mean personalised test accuracy (each client's own held-out split), mean of the last {last} rounds;"
        " clients = mean / std / min / max over the clients of the last round (unweighted; number of clients);"
        " check = recomputed vs recorded example-weighted mean of the last round (baselines).",
        "",
        "| setting | method | personalised acc | clients: mean / std / min / max | vs best baseline | check |",
        "|---|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(r["setting"] for r in results):
        runs = {r["variant"]: (r["strategy"], personalised(r, last, spread)) for r in results if r["setting"] == setting}
        rows: list[tuple[str, float | None, str, str]] = []
        for variant, (strategy, numbers) in runs.items():
            if strategy in ("local", "fedavg"):
                keys = [("local-only", "after_training")] if strategy == "local" else [
                    ("FedAvg", "global_on_clients"), ("FedAvg + FT", "after_training")]
                for method, key in keys:
                    client_spread = numbers["spread"].get(key)
                    rows.append((method, numbers[key], _spread_text(client_spread),
                                 _check_text(client_spread, numbers["recorded_last"][key])))
        baselines = [acc for _, acc, _, _ in rows if acc is not None]
        best = max(baselines) if baselines else None
        for variant, (strategy, numbers) in runs.items():
            if strategy == "pfedla":
                rows.append((variant, numbers["after_training"], _spread_text(numbers["spread"].get("after_training")), "-"))
        for method, acc, spread_text, check in rows:
            gap = f"{(acc - best) * 100:+.2f} pt" if acc is not None and best is not None else "-"
            value = f"{acc:.4f}" if acc is not None else "-"
            lines.append(f"| {setting} | {method} | {value} | {spread_text} | {gap} | {check} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="+", help="harness --out folders (results.json); runs of several are pooled")
    parser.add_argument("--last", type=int, default=3, help="average over this many final rounds")
    parser.add_argument("--no-spread", action="store_true", help="do not recompute the baselines' per-client spread")
    args = parser.parse_args(argv)
    results = [r for out in args.out for r in json.loads((out / "results.json").read_text())]
    text = table(results, args.last, spread=not args.no_spread)
    (args.out[0] / "personalised.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
