"""Every fault against every strategy: is the faulty reply refused, and does the model stay the honest one?

    python -m benchmarks.fault_matrix --out bench-out/fault-matrix [--strategies fedavg,laq] [--seed 0]

For each strategy (every method in ``fedlayer.methods.METHODS``) in the unit
setting of the fault tests (the cnn on digits, 7 clients, round 1 with every
node identified and sampled: ``benchmarks.faults.round_one_strategy``) and
each fault (``benchmarks.faults``: ``DENSE_FAULTS``, and for LAQ also the
broken encodings of ``LAQ_MALFORMED``), two identical fresh strategies run one
round of the real ``aggregate_train``:

- *mixed*: the honest replies of nodes 0..3 plus one faulty reply (first in
  pull order; a duplicate repeats node 0's reply, the others come from node 4);
- *alone*: the same honest replies only.

Measured per case: how many faulty replies the strategy refused (its
``rejections`` counter, the one the round loop writes to ``metrics.jsonl``),
whether the mixed global model is finite and bitwise equal to the honest-only
one, whether every client's next model (``node_state``: personalised for
pFedLA) and the method's checkpointed state (``state_dict``) are equal too.
A model is *corrupted* when any of these differs or is not finite. A faulty
reply that is not refused but leaves everything equal counts as *handled*.

Output in ``<out>``: ``results.json`` (every case), ``results.csv`` and
``results.md`` (a table per fault, a table per strategy, totals), also printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.faults import (
    DENSE_FAULTS,
    LAQ_MALFORMED,
    REPLY_FAULTS,
    ROUND_NODES,
    faulty_reply,
    honest_state,
    laq_faulty_reply,
    laq_reply,
    laq_state,
    laq_upload,
    round_one_strategy,
    train_reply,
)
from fedlayer.layers import states_equal
from fedlayer.methods import METHODS
from fedlayer.methods.base import LayerwiseStrategy, all_finite

#: How many of them reply honestly; the faulty reply comes from the next one.
HONEST = 4
COMMAND = "python -m benchmarks.fault_matrix --out bench-out/fault-matrix"
#: Bytes for the breaks that take arbitrary bytes (random array bytes, the NaN/Inf position).
DATA = b"fault-matrix: not an array"
#: Checkpointed state a method keeps about the refusals themselves, compared apart
#: (FedLAMA sends a refused client every layer next time: ``resend``).
REFUSAL_STATE = {"fedlama": ("resend",)}


@dataclass
class Case:
    """One strategy against one fault: what the strategy did and what it left."""

    strategy: str
    fault: str
    faulty: int  # faulty replies sent (always 1)
    rejected: int  # faulty replies refused (the strategy's rejections counter)
    honest_rejected: int  # refusals in the honest-only round (must be 0)
    finite: bool  # the mixed global model is finite
    global_equal: bool  # ... and bitwise equal to the honest-only one
    clients_equal: bool  # every client's next model equal (personalised models)
    state_equal: (
        bool  # the method's checkpointed state equal (paths and REFUSAL_STATE aside)
    )
    refusal_state: str  # REFUSAL_STATE entries that differ, mixed vs alone (what it noted about the refusal)
    corrupted: bool
    handled: bool  # not refused, yet nothing differs
    reason: str  # why it was refused (the first refusal)


def faults_of(strategy: str) -> list[str]:
    """The faults tried against ``strategy``: the dense ones, and LAQ's broken encodings for LAQ."""
    if strategy != "laq":
        return list(DENSE_FAULTS)
    return [*DENSE_FAULTS, *(f"laq:{kind}" for kind in sorted(LAQ_MALFORMED))]


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of nested checkpoint values (dicts, lists, numpy arrays, NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if (
        isinstance(a, float)
        and isinstance(b, float)
        and math.isnan(a)
        and math.isnan(b)
    ):
        return True
    return type(a) is type(b) and a == b


def checkpoint(strategy: LayerwiseStrategy, run_dir: Path) -> dict[str, Any]:
    """``strategy.state_dict()`` with ``run_dir`` in strings written as ``<run>`` (on-disk stores name their folder)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value.replace(str(run_dir), "<run>") if isinstance(value, str) else value

    return clean(strategy.state_dict())


def client_models(strategy: LayerwiseStrategy) -> list[dict[str, np.ndarray]]:
    """The model each node would be sent next (evaluation: no bookkeeping is written)."""
    return [
        strategy.node_state(node, strategy.layers.names, MessageType.EVALUATE)
        for node in ROUND_NODES
    ]


def _replies(
    name: str, fault: str, mixed: LayerwiseStrategy, seed: int
) -> tuple[list[Message], Message]:
    """The honest replies (built against ``mixed``; ``alone`` sent the same) and the faulty one."""
    faulty_node = ROUND_NODES[HONEST]
    if name == "laq":
        shapes = mixed.shapes
        honest = [
            laq_reply(node, pid, laq_upload(laq_state(seed + pid, shapes))[0])
            for pid, node in enumerate(ROUND_NODES[:HONEST])
        ]
        if fault.startswith("laq:") or fault in REPLY_FAULTS:
            kind = fault.removeprefix("laq:")
            bad = laq_faulty_reply(
                kind,
                faulty_node,
                HONEST,
                honest=honest[0],
                seed=seed + 100,
                num_clients=len(ROUND_NODES),
                shapes=shapes,
            )
            return honest, bad
    else:
        honest = [
            train_reply(mixed, node, honest_state(mixed, node, seed + i), 10 + i)
            for i, node in enumerate(ROUND_NODES[:HONEST])
        ]
    by_node = {message.metadata.src_node_id: message for message in honest}
    node = ROUND_NODES[0] if fault == "duplicate" else faulty_node
    return honest, faulty_reply(mixed, node, fault, by_node, seed + 100, DATA)


def run_case(name: str, fault: str, workdir: Path, seed: int = 0) -> Case:
    """One round with the honest replies plus ``fault`` against one with the honest replies alone."""
    mixed = round_one_strategy(name, workdir / "mixed", ROUND_NODES)
    alone = round_one_strategy(name, workdir / "alone", ROUND_NODES)
    honest, bad = _replies(name, fault, mixed, seed)
    mixed.aggregate_train(
        1, [bad, *honest]
    )  # the fault first: it is pulled before the honest ones
    alone.aggregate_train(1, honest)
    finite = all_finite(mixed.global_state)
    global_equal = states_equal(mixed.global_state, alone.global_state)
    clients_equal = all(
        states_equal(a, b) for a, b in zip(client_models(mixed), client_models(alone))
    )
    mixed_state, alone_state = (
        checkpoint(mixed, workdir / "mixed"),
        checkpoint(alone, workdir / "alone"),
    )
    noted = {
        key: (mixed_state.pop(key, None), alone_state.pop(key, None))
        for key in REFUSAL_STATE.get(name, ())
    }
    state_equal = same(mixed_state, alone_state)
    refusal_state = "; ".join(
        f"{key}: {m} (honest-only: {a})"
        for key, (m, a) in noted.items()
        if not same(m, a)
    )
    corrupted = not (finite and global_equal and clients_equal and state_equal)
    rejected = len(mixed.rejections)
    return Case(
        strategy=name,
        fault=fault,
        faulty=1,
        rejected=rejected,
        honest_rejected=len(alone.rejections),
        finite=finite,
        global_equal=global_equal,
        clients_equal=clients_equal,
        state_equal=state_equal,
        refusal_state=refusal_state,
        corrupted=corrupted,
        handled=rejected == 0 and not corrupted,
        reason=mixed.rejections[0].reason if mixed.rejections else "",
    )


def run_matrix(strategies: Iterable[str], workdir: Path, seed: int = 0) -> list[Case]:
    """Every fault of ``faults_of`` against every strategy, each case in its own folder under ``workdir``."""
    _ensure_task_identity()
    cases = []
    for name in strategies:
        for i, fault in enumerate(faults_of(name)):
            cases.append(run_case(name, fault, workdir / name / f"{i:02d}", seed))
    return cases


def _ensure_task_identity() -> None:
    """Messages need a run/task identity; a Flower app sets it, a bare process sets a fake one."""
    for attr in ("run_id", "node_id", "task_id"):
        if getattr(TaskIdentity, f"_{attr}") is None:
            setattr(TaskIdentity, attr, 1 if attr != "node_id" else 0)


def _cells(rows: Sequence[Case]) -> str:
    """The "rejected/handled" and "models corrupted" cells of ``rows``."""
    rejected, handled = sum(c.rejected for c in rows), sum(c.handled for c in rows)
    outcome = f"{rejected}/{sum(c.faulty for c in rows)} rejected"
    if handled:
        outcome += f", {handled} handled"
    return f"{outcome} | {sum(c.corrupted for c in rows)}"


def table(cases: Sequence[Case], command: str = COMMAND) -> str:
    """The markdown report: a row per fault, a row per strategy, and the totals."""
    lines = [
        "| fault or input | strategies tried | rejected/handled | models corrupted (goal 0) | command |",
        "|---|---|---|---|---|",
    ]
    for fault in dict.fromkeys(c.fault for c in cases):
        rows = [c for c in cases if c.fault == fault]
        names = ", ".join(c.strategy for c in rows)
        lines.append(
            f"| {fault} | {len(rows)}: {names} | {_cells(rows)} | `{command}` |"
        )
    lines += [
        "",
        "| strategy | faults tried | rejected/handled | models corrupted (goal 0) |",
        "|---|---|---|---|",
    ]
    for name in dict.fromkeys(c.strategy for c in cases):
        rows = [c for c in cases if c.strategy == name]
        lines.append(f"| {name} | {len(rows)} | {_cells(rows)} |")
    lines.append(f"| **total** | {len(cases)} | {_cells(cases)} |")
    bad = [
        c
        for c in cases
        if c.corrupted or c.honest_rejected or c.rejected + c.handled != c.faulty
    ]
    if bad:
        lines += ["", "Cases that missed the goal:", ""]
        lines += [f"- {c.strategy} / {c.fault}: {json.dumps(asdict(c))}" for c in bad]
    return "\n".join(lines) + "\n"


def write(cases: Sequence[Case], out: Path) -> str:
    """``results.json``, ``results.csv`` and ``results.md`` in ``out``; the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(c) for c in cases]
    (out / "results.json").write_text(
        json.dumps(
            {"command": COMMAND, "nodes": ROUND_NODES, "honest": HONEST, "cases": rows},
            indent=2,
        )
        + "\n"
    )
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = table(cases)
    (out / "results.md").write_text(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--strategies",
        default=",".join(sorted(METHODS)),
        help="comma-separated methods (default: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the honest updates"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.strategies.split(",") if n]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {sorted(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as workdir:
        cases = run_matrix(names, Path(workdir), args.seed)
    report = write(cases, args.out)
    print(report)
    return 1 if any(c.corrupted for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
