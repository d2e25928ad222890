"""Every fault against every strategy: is the faulty reply refused, and does the model stay the honest one?

    python -m benchmarks.fault_matrix --out bench-out/fault-matrix [--strategies fedavg,laq] [--seed 0]

For each strategy (every method in ``fedlayer.methods.METHODS``) in the unit
setting of the fault tests (the cnn on digits, 7 clients, round 1 with every
node identified and sampled: ``benchmarks.faults.round_one_strategy``) and
each fault (``benchmarks.faults``: ``DENSE_FAULTS``; ``ANSWER_FAULTS``, honest
content answering another message than the node's train message of the round:
the round before's, the next round's, another node's, an evaluate message or an
identity query; ``CODEC_FAULTS``, run with ``codec.up_bits=4``: 2, 8, 16 bits,
dense or another reference version; for LAQ also the broken encodings of
``LAQ_MALFORMED`` and an upload at 8 bits instead of the configured 4), two
identical fresh strategies run one round of the real ``aggregate_train``
(round 2 for the stale reply, after a round 1 of honest replies):

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

Few carriers (``SOLE_FAULTS``, ``SOLE_CARRIER_FAULTS``): the faulty reply is
the round's only one (*alone* gets none), or, for FedLP, the only one carrying
some layer, oversized there only (*alone* gets the replies of the nodes that
did not keep the layer). And for every fault a third fresh strategy gets the
faulty reply as its round's only reply (*lone*): the round must be refused (or
dropped) and change nothing, the method's state (``state_dict``, the notes of
``REFUSAL_STATE`` aside), the global and client models and every file under
its run directory alike: the *state changed by a refused round* column.

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
    ANSWER_FAULTS,
    CODEC_FAULTS,
    CODEC_SETTING,
    DENSE_FAULTS,
    LAQ_BITS_FAULT,
    LAQ_MALFORMED,
    REPLY_FAULTS,
    ROUND_NODES,
    SOLE_CARRIER_FAULTS,
    SOLE_FAULTS,
    codec_faulty_reply,
    faulty_reply,
    honest_reply,
    honest_state,
    identity_query_to,
    laq_faulty_reply,
    laq_reply,
    laq_state,
    laq_upload,
    oversized,
    push,
    readdressed,
    round_one_strategy,
    sent_message,
    sole_carrier,
    train_reply,
)
from fedlayer.layers import copy_state, states_equal
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
    lone_changed: str = ""  # what a round with the faulty reply alone changed ("accepted": it was not refused)


def faults_of(strategy: str) -> list[str]:
    """The faults tried against ``strategy``: the dense ones, replies answering another message than
    the node's train message of the round, and the codec's other encodings (with ``CODEC_SETTING``);
    for LAQ, whose uplink is its own encoding, its broken encodings and another bit width instead."""
    sparse = [*SOLE_FAULTS, *(SOLE_CARRIER_FAULTS if strategy == "fedlp" else [])]
    if strategy != "laq":
        return [*DENSE_FAULTS, *ANSWER_FAULTS, *CODEC_FAULTS, *sparse]
    return [*DENSE_FAULTS, *(f"laq:{kind}" for kind in sorted(LAQ_MALFORMED)), *ANSWER_FAULTS, LAQ_BITS_FAULT, *sparse]


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


def _honest(name: str, strategy: LayerwiseStrategy, seed: int) -> list[Message]:
    """The honest replies of the first ``HONEST`` nodes to ``strategy`` (each strategy gets its own:
    the codec decodes a reply in place)."""
    return [honest_reply(strategy, node, i, seed) for i, node in enumerate(ROUND_NODES[:HONEST])]


def _replies(
    name: str, fault: str, mixed: LayerwiseStrategy, seed: int, workdir: Path, earlier: Message | None = None
) -> tuple[list[Message], Message]:
    """The honest replies to ``mixed`` and the faulty one (``earlier``: the faulty node's reply of the round before)."""
    faulty_node = ROUND_NODES[HONEST]
    honest = _honest(name, mixed, seed)
    if fault in ANSWER_FAULTS:
        own = honest_reply(mixed, faulty_node, HONEST, seed + 100)
        return honest, _misaddressed(name, fault, own, mixed, seed, workdir, earlier)
    if fault in CODEC_FAULTS:
        return honest, codec_faulty_reply(mixed, faulty_node, fault, seed + 100)
    if fault == LAQ_BITS_FAULT:
        assert mixed.options.bits != 8, "the LAQ bit-width fault needs a strategy configured for other than 8 bits"
        upload = laq_upload(laq_state(seed + 100, mixed.shapes), bits=8)[0]
        return honest, laq_reply(faulty_node, HONEST, upload, to=mixed)
    if name == "laq" and (fault.startswith("laq:") or fault in REPLY_FAULTS):
        bad = laq_faulty_reply(
            fault.removeprefix("laq:"),
            faulty_node,
            HONEST,
            honest=honest[0],
            seed=seed + 100,
            num_clients=len(ROUND_NODES),
            shapes=mixed.shapes,
            to=mixed,
            bits=mixed.options.bits,
        )
        return honest, bad
    by_node = {message.metadata.src_node_id: message for message in honest}
    node = ROUND_NODES[0] if fault == "duplicate" else faulty_node
    return honest, faulty_reply(mixed, node, fault, by_node, seed + 100, DATA)


def _misaddressed(
    name: str, fault: str, own: Message, mixed: LayerwiseStrategy, seed: int, workdir: Path, earlier: Message | None
) -> Message:
    """The faulty node's honest content ``own`` as a reply to another message than its train message of this round."""
    node = ROUND_NODES[HONEST]
    if fault == "stale":
        assert earlier is not None, "a stale reply needs the round before"
        return earlier
    if fault == "other-node":
        return readdressed(own, sent_message(mixed, ROUND_NODES[0]), node)
    if fault == "query-reply":
        return readdressed(own, identity_query_to(mixed, node), node)
    twin = round_one_strategy(name, workdir / "twin", ROUND_NODES)  # the same run, sending what mixed would
    if fault == "evaluate-reply":
        twin.fraction_evaluate = 1.0
        evaluate = {m.metadata.dst_node_id: m for m in push(twin.configure_evaluate(1, list(ROUND_NODES)))}
        return readdressed(own, evaluate[node], node)
    twin.aggregate_train(1, _honest(name, twin, seed))  # future: the message this node gets next round
    twin.configure_train(2, list(ROUND_NODES))
    return readdressed(own, sent_message(twin, node), node)


def run_case(name: str, fault: str, workdir: Path, seed: int = 0) -> Case:
    """One round with the honest replies plus ``fault`` against one with the honest replies alone."""
    if fault in SOLE_FAULTS or fault in SOLE_CARRIER_FAULTS:
        return run_sparse_case(name, fault, workdir, seed)
    overrides = CODEC_SETTING if fault in CODEC_FAULTS else ()
    mixed = round_one_strategy(name, workdir / "mixed", ROUND_NODES, overrides)
    alone = round_one_strategy(name, workdir / "alone", ROUND_NODES, overrides)
    server_round, earlier = 1, None
    if fault == "stale":  # round 1 goes by without the faulty node's reply, which comes in round 2
        earlier = honest_reply(mixed, ROUND_NODES[HONEST], HONEST, seed + 100)
        for strategy in (mixed, alone):
            strategy.aggregate_train(1, _honest(name, strategy, seed))
            strategy.configure_train(2, list(ROUND_NODES))
        server_round = 2
    honest, bad = _replies(name, fault, mixed, seed, workdir, earlier)
    mixed.aggregate_train(
        server_round, [bad, *honest]
    )  # the fault first: it is pulled before the honest ones
    alone.aggregate_train(server_round, _honest(name, alone, seed))
    return compare(name, fault, mixed, alone, workdir, seed)


def run_sparse_case(name: str, fault: str, workdir: Path, seed: int = 0) -> Case:
    """``SOLE_FAULTS``: the faulty reply is the round's only one; ``SOLE_CARRIER_FAULTS`` (FedLP):
    the only one carrying some layer, among the honest replies of the nodes that did not keep it."""
    mixed = round_one_strategy(name, workdir / "mixed", ROUND_NODES)
    alone = round_one_strategy(name, workdir / "alone", ROUND_NODES)
    if fault in SOLE_FAULTS:
        mixed.aggregate_train(1, [_sparse_fault(name, fault, mixed, seed)])
        return compare(name, fault, mixed, alone, workdir, seed)
    _, _, others = sole_carrier(mixed, ROUND_NODES)
    honest = {s: [train_reply(s, n, honest_state(s, n, seed + i), 10 + i) for i, n in enumerate(others)] for s in (mixed, alone)}
    mixed.aggregate_train(1, [_sparse_fault(name, fault, mixed, seed), *honest[mixed]])
    alone.aggregate_train(1, honest[alone])
    return compare(name, fault, mixed, alone, workdir, seed)


def _sparse_fault(name: str, fault: str, strategy: LayerwiseStrategy, seed: int) -> Message:
    """The faulty reply of a ``SOLE_FAULTS`` or ``SOLE_CARRIER_FAULTS`` case."""
    kind = fault.rsplit("-", 1)[1]
    if fault in SOLE_CARRIER_FAULTS:
        layer, node, _ = sole_carrier(strategy, ROUND_NODES)
        state = oversized(strategy, node, honest_state(strategy, node, seed + 100), strategy.layers[layer].keys, kind)
        return train_reply(strategy, node, state, 10)
    node = ROUND_NODES[HONEST]
    if name == "laq":
        return laq_faulty_reply(
            kind, node, HONEST, honest=None, seed=seed + 100, num_clients=len(ROUND_NODES),  # type: ignore[arg-type]
            shapes=strategy.shapes, to=strategy, bits=strategy.options.bits,
        )
    return faulty_reply(strategy, node, kind, {}, seed + 100, DATA)


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` (pFedLA's models, LAQ's updates, the codec's references), by relative path."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def lone_round(name: str, fault: str, workdir: Path, seed: int = 0) -> str:
    """What a round whose only reply is ``fault``'s changed: "" (nothing), "accepted" (the reply was
    neither refused nor its round dropped), else the parts that differ from before the round.
    A duplicate alone is an honest reply: nothing to try."""
    if fault == "duplicate":
        return ""
    run_dir = workdir / "lone"
    lone = round_one_strategy(name, run_dir, ROUND_NODES, CODEC_SETTING if fault in CODEC_FAULTS else ())
    server_round, earlier = 1, None
    if fault == "stale":
        earlier = honest_reply(lone, ROUND_NODES[HONEST], HONEST, seed + 100)
        lone.aggregate_train(1, _honest(name, lone, seed))
        lone.configure_train(2, list(ROUND_NODES))
        server_round = 2
    if fault in SOLE_FAULTS or fault in SOLE_CARRIER_FAULTS:
        bad = _sparse_fault(name, fault, lone, seed)
    else:
        bad = _replies(name, fault, lone, seed, workdir / "lone-faults", earlier)[1]

    def method_state() -> dict[str, Any]:
        state = lone.state_dict()
        for key in ("dropped_rounds", *REFUSAL_STATE.get(name, ())):
            state.pop(key, None)
        return state

    before = (copy_state(lone.global_state), method_state(), client_models(lone), files(run_dir))
    dropped_before = list(lone.dropped_rounds)
    lone.aggregate_train(server_round, [bad])
    if not lone.rejections and lone.dropped_rounds == dropped_before:
        return "accepted"
    after = (lone.global_state, method_state(), client_models(lone), files(run_dir))
    changed = []
    if not states_equal(before[0], after[0]):
        changed.append("global model")
    changed += [f"state {key!r}" for key in sorted(before[1].keys() | after[1].keys()) if not same(before[1].get(key), after[1].get(key))]
    if not all(states_equal(a, b) for a, b in zip(before[2], after[2])):
        changed.append("client models")
    if before[3] != after[3]:
        changed.append("files")
    return ", ".join(changed)


def compare(name: str, fault: str, mixed: LayerwiseStrategy, alone: LayerwiseStrategy, workdir: Path, seed: int) -> Case:
    """The ``Case`` of a fault: ``mixed`` (with the faulty reply) against ``alone`` (without), and its ``lone_round``."""
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
        lone_changed=lone_round(name, fault, workdir, seed),
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
    """The "rejected/handled", "models corrupted" and "state changed by a refused round" cells of ``rows``."""
    rejected, handled = sum(c.rejected for c in rows), sum(c.handled for c in rows)
    outcome = f"{rejected}/{sum(c.faulty for c in rows)} rejected"
    if handled:
        outcome += f", {handled} handled"
    return f"{outcome} | {sum(c.corrupted for c in rows)} | {sum(bool(c.lone_changed) for c in rows)}"


def table(cases: Sequence[Case], command: str = COMMAND) -> str:
    """The markdown report: a row per fault, a row per strategy, and the totals."""
    lines = [
        "| fault or input | strategies tried | rejected/handled | models corrupted (goal 0) | state changed by a refused round (goal 0) | command |",
        "|---|---|---|---|---|---|",
    ]
    for fault in dict.fromkeys(c.fault for c in cases):
        rows = [c for c in cases if c.fault == fault]
        names = ", ".join(c.strategy for c in rows)
        lines.append(
            f"| {fault} | {len(rows)}: {names} | {_cells(rows)} | `{command}` |"
        )
    lines += [
        "",
        "| strategy | faults tried | rejected/handled | models corrupted (goal 0) | state changed by a refused round (goal 0) |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(c.strategy for c in cases):
        rows = [c for c in cases if c.strategy == name]
        lines.append(f"| {name} | {len(rows)} | {_cells(rows)} |")
    lines.append(f"| **total** | {len(cases)} | {_cells(cases)} |")
    bad = [
        c
        for c in cases
        if c.corrupted or c.lone_changed or c.honest_rejected or c.rejected + c.handled != c.faulty
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
    return 1 if any(c.corrupted or c.lone_changed for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
