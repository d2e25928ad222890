"""Short in-process runs of every method, reduced to a fingerprint.

A fingerprint is the SHA-256 of the final global model (keys, dtypes, shapes,
bytes), the ledger's byte totals and the final accuracy. ``fingerprints.json``
holds the values recorded before the restructure of issue #13; the test
``test_fingerprints.py`` checks the code still gives exactly those.

Record again (only when a change of results is intended):
``python -m tests.fingerprints --write``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedlayer.config import compose_config
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


def state_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over a state's keys, dtypes, shapes and bytes (keys sorted)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key])
        digest.update(f"{key}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def run_case(case: str, output_dir: Path, extra: list[str] = (), keep_state: bool = False) -> dict[str, Any]:
    """Run one case in process; return its fingerprint (with ``keep_state``, also the
    final global state and the metrics records)."""
    overrides = [*COMMON, *CASES[case], *extra, f"output_dir={output_dir}", f"run_name={case}"]
    run, summary = run_in_process(compose_config(overrides))
    totals = run.ledger.totals()
    kept = {"state": run.strategy.global_state, "records": run.rundir.read_metrics()} if keep_state else {}
    return {
        **kept,
        "model": state_digest(run.strategy.global_state),
        "bytes_up": totals["bytes_up"],
        "bytes_down": totals["bytes_down"],
        "fedavg_bytes_up": totals["fedavg_bytes_up"],
        "fedavg_bytes_down": totals["fedavg_bytes_down"],
        "final_accuracy": summary["final_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record the fingerprints in {PATH.name}")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {case: run_case(case, Path(tmp)) for case in args.cases}
    print(json.dumps(results, indent=2))
    if args.write:  # the named cases are recorded again; the others keep their values
        recorded = json.loads(PATH.read_text()) if PATH.exists() else {}
        PATH.write_text(json.dumps({**recorded, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
