"""Short in-process runs of every method, reduced to a fingerprint.

A fingerprint is what must hold on any x86-64 CPU: the ledger's byte totals
(bytes on the wire follow from the method's decisions, compared exactly), a
summary of the final global model per tensor (dtype, shape, sum, L1 and L2
norms and a few values at fixed positions, compared with a tolerance, because
float results differ in the last bits between CPU families, e.g. AVX-512 and
AVX2 kernels) and the final accuracy (within a few test examples).
``fingerprints.json`` holds the values recorded for the code of the
restructure of issue #13 (whose model hashes the summaries replace);
``test_fingerprints.py`` checks the code still gives those.

Record again (only when a change of results is intended):
``python -m tests.fingerprints --write``; compare without pytest:
``python -m tests.fingerprints --check [CASE ...]``.
"""

from __future__ import annotations

import argparse
import json
import zlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedlayer.config import compose_config
from fedlayer.server.builder import build_strategy
from fedlayer.workload import load_workload
from tests.inprocess import run_in_process

PATH = Path(__file__).with_name("fingerprints.json")
NUM_CLIENTS = 4
COMMON = [
    "dataset=digits", "model=cnn", f"federation.num_clients={NUM_CLIENTS}", "federation.fraction_train=0.5",
    "federation.rounds=3", "train.local_steps=3", "train.batch_size=16", "evaluation.max_examples=200",
]
#: case name -> overrides on top of COMMON
CASES: dict[str, list[str]] = {
    "fedavg": ["strategy=fedavg", "federation.fraction_evaluate=0.5"],
    "fedlama": ["strategy=fedlama", "strategy.phi=2", "strategy.min_round_to_adjust=0", "federation.rounds=4"],
    "fedlp-homogeneous": ["strategy=fedlp", "strategy.p=0.5"],
    "fedlp-heterogeneous": ["strategy=fedlp", "strategy.scheme=heterogeneous"],
    "laq-gradient": ["strategy=laq", "federation.fraction_train=1.0"],
    "laq-delta": ["strategy=laq", "strategy.mode=delta", "strategy.alpha=0.25", "federation.fraction_train=1.0"],
    "pfedla": ["strategy=pfedla", "federation.fraction_train=1.0"],
    "pfedla-k1": ["strategy=pfedla", "strategy.k=1"],
    "fll": ["strategy=fll", "strategy.rounds_per_stage=1"],
    "fll-resnet-dropout": ["strategy=fll", "model=resnet20", "strategy.rounds_per_stage=1", "strategy.p_drop=0.5"],
    "local": ["strategy=local"],
}


#: Tolerance of the model statistics, relative to the norm of the run's whole
#: update (final model minus initial model, all float tensors). Measured on one
#: Xeon with AVX-512 against the same runs with AVX2 kernels
#: (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``): 10 of 11 models
#: differ bitwise, by at most 2e-6 of that norm, except the homogeneous FedLP
#: run, in which one local step crosses a kink (a ReLU or max-pool switch) and
#: a bias moves by 9e-3 of it. A 10% change of learning rate moves the
#: statistics by several times this tolerance.
RTOL = 3e-2
#: Final accuracy may differ by this much (a few of the 200 test examples
#: near a decision boundary).
ACCURACY_TOLERANCE = 0.02
#: Random directions each tensor's update is projected on (they catch permuted
#: or re-signed values, which leave norms unchanged).
PROJECTIONS = 3


def model_summary(final: dict[str, np.ndarray], initial: dict[str, np.ndarray]) -> dict[str, Any]:
    """The final model as statistics of its update from ``initial``.

    Per tensor (keys sorted): dtype, shape, and of its update (for integer
    tensors, of its value) the L2 norm and projections on ``PROJECTIONS``
    fixed random directions seeded by the tensor's name (both move by at most
    about the norm of a change, unlike sums and L1 norms, which grow with the
    tensor's size); plus
    ``update_norm``, the L2 norm of the whole float update (the tolerances' scale).
    """
    tensors = {}
    for key in sorted(final):
        value = np.asarray(final[key])
        floating = np.issubdtype(value.dtype, np.floating)
        flat = (value.astype(np.float64) - (initial[key] if floating else 0)).ravel()
        directions = np.random.default_rng(zlib.crc32(key.encode())).standard_normal((PROJECTIONS, flat.size))
        tensors[key] = {
            "dtype": str(value.dtype),
            "shape": list(value.shape),
            "l2": float(np.sqrt((flat**2).sum())),
            "projections": [float(p) for p in directions @ flat],
        }
    norm = float(np.sqrt(sum(t["l2"] ** 2 for t in tensors.values() if np.issubdtype(np.dtype(t["dtype"]), np.floating))))
    return {"update_norm": norm, "tensors": tensors}


def fingerprint_mismatches(got: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints beyond the tolerances (empty: they agree).

    Bytes, dtypes, shapes and integer tensors are compared exactly; the float
    update statistics within ``RTOL`` of the recorded ``update_norm`` (a
    projection on a random direction moves by about the norm of the change).
    """
    problems = [
        f"{key}: {got[key]} != recorded {recorded[key]}"
        for key in ("bytes_up", "bytes_down", "fedavg_bytes_up", "fedavg_bytes_down")
        if got[key] != recorded[key]
    ]
    if abs(got["final_accuracy"] - recorded["final_accuracy"]) > ACCURACY_TOLERANCE:
        problems.append(f"final_accuracy: {got['final_accuracy']} vs recorded {recorded['final_accuracy']}")
    have_model, want_model = got["model"]["tensors"], recorded["model"]["tensors"]
    if sorted(have_model) != sorted(want_model):
        return [*problems, f"tensors: {sorted(have_model)} != recorded {sorted(want_model)}"]
    tolerance = RTOL * recorded["model"]["update_norm"]
    for key, want in want_model.items():
        have = have_model[key]
        if (have["dtype"], have["shape"]) != (want["dtype"], want["shape"]):
            problems.append(f"{key}: {have['dtype']}{have['shape']} != recorded {want['dtype']}{want['shape']}")
            continue
        allowed = tolerance if np.issubdtype(np.dtype(want["dtype"]), np.floating) else 0.0
        pairs = [(stat, have[stat], want[stat]) for stat in ("l2",)]
        pairs += [(f"projections[{i}]", a, b) for i, (a, b) in enumerate(zip(have["projections"], want["projections"]))]
        problems += [f"{key}.{name}: {a!r} vs recorded {b!r}" for name, a, b in pairs if abs(a - b) > allowed]
    return problems


def run_case(case: str, output_dir: Path, extra: list[str] = (), keep_state: bool = False) -> dict[str, Any]:
    """Run one case in process; return its fingerprint (with ``keep_state``, also the
    final global state and the metrics records)."""
    overrides = [*COMMON, *CASES[case], *extra, f"output_dir={output_dir}", f"run_name={case}"]
    cfg = compose_config(overrides)
    initial = build_strategy(cfg, load_workload(cfg, NUM_CLIENTS)).global_state
    run, summary = run_in_process(cfg)
    totals = run.ledger.totals()
    kept = {"state": run.strategy.global_state, "records": run.rundir.read_metrics()} if keep_state else {}
    return {
        **kept,
        "model": model_summary(run.strategy.global_state, initial),
        "bytes_up": totals["bytes_up"],
        "bytes_down": totals["bytes_down"],
        "fedavg_bytes_up": totals["fedavg_bytes_up"],
        "fedavg_bytes_down": totals["fedavg_bytes_down"],
        "final_accuracy": summary["final_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"record the fingerprints in {PATH.name}")
    mode.add_argument("--check", action="store_true", help=f"compare with {PATH.name}; exit 1 on a mismatch")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {case: run_case(case, Path(tmp)) for case in args.cases}
    if args.check:
        recorded = json.loads(PATH.read_text())
        mismatches = {case: fingerprint_mismatches(results[case], recorded[case]) for case in args.cases}
        for case, problems in mismatches.items():
            print(f"{case}: " + ("as recorded" if not problems else "; ".join(problems)))
        raise SystemExit(1 if any(mismatches.values()) else 0)
    print(json.dumps(results, indent=2))
    if args.write:  # the named cases are recorded again; the others keep their values
        recorded = json.loads(PATH.read_text()) if PATH.exists() else {}
        PATH.write_text(json.dumps({**recorded, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
