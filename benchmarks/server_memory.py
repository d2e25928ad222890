"""Server memory against the number of clients: per-client state in RAM or on disk (no Flower, no training).

    python -m benchmarks.server_memory --clients 10 100 1000 --out bench-out/server-memory

Three kinds of per-client server state, each measured for every N in a fresh
process (peak RSS is per process):

- ``laq-ram`` / ``laq-disk``: LAQ's stored updates ``Qhat_m`` (8 bits,
  ``state_memory_mb`` None / 0);
- ``codec8-ram`` / ``codec8-disk``: FedAvg with the codec stage at 8 bits both
  ways, its per-client references (``state_memory_mb`` None / 0);
- ``pfedla``: pFedLA's client models and hypernetworks (always on disk).

The strategy is built for a real model (default ``cnn`` on 8x8x1, 10 classes:
188,810 parameters, 0.72 MB a state), attached to a temporary run directory
(``attach_run_dir``, as in a run: with no budget, states are written *and*
kept in memory), and node ``10000 + c`` is registered as client ``c``. LAQ and
the codec then run rounds through the strategy's own ``configure_train`` and
``aggregate_train`` with synthetic replies of the real format (what a client
would send after one step of noise): first every client once, ``--fill`` per
round, then ``--rounds`` rounds of ``--active`` clients drawn at random, which
read their stored state back. (LAQ reads every stored update in every round:
filling 10 at a time would read 50,500 states for 1000 clients.) pFedLA,
whose round reads every stored model for every sampled client, gets its
models written straight into its store (every client trained once), then the
``--rounds`` rounds. Every reply must be accepted (a rejection aborts the
measurement). An N below ``--fill`` fills in one round of N: smaller rounds.

Reported per run: peak resident set (``VmHWM``) and the RSS before the strategy
was built, the Python heap peak (tracemalloc; numpy buffers included), the
bytes on disk at the end, and what keeping every client's state in RAM would
take. The growth of peak RSS with N is a least-squares line over the N whose
rounds have the full size (N >= ``--fill``; all N for pFedLA).
Output in ``--out``: ``results.json``, ``results.csv``, ``results.md`` and
``peak_rss_vs_clients.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.faults import push
from fedlayer.wire.tensors import encode_state
from fedlayer.layers import (
    State,
    from_arrayrecord,
    to_arrayrecord,
    torch_state_to_numpy,
)
from fedlayer.methods.base import LayerwiseStrategy
from fedlayer.methods.laq import LAQStrategy, lazy_decision, update_records
from fedlayer.methods.pfedla import PFedLAStrategy
from fedlayer.models import build_model
from fedlayer.wire.records import (
    ARRAYS,
    CODEC_VERSION,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MB = 1024 * 1024
#: Node ``NODE_OFFSET + c`` is client ``c`` (node ids and client ids differ, as in a run).
NODE_OFFSET = 10_000
#: Standard deviation of the synthetic training noise.
NOISE = 0.01
#: Bits of LAQ's updates and of the codec, both ways.
BITS = 8
CSV_FIELDS = (
    "variant", "clients", "fill_per_round", "active_per_round", "rounds", "states", "state_mb", "heap_peak_mb", "rss_peak_mb",
    "rss_before_mb", "disk_mb", "all_in_ram_mb", "seconds",
)

ReplyFn = Callable[[Any, Message, np.random.Generator], Message]


@dataclass(frozen=True)
class Variant:
    """A strategy and its state budget, as measured."""

    name: str
    method: str  # laq | codec | pfedla
    memory_mb: float | None
    label: str


VARIANTS = {
    v.name: v
    for v in (
        Variant("laq-ram", "laq", None, "LAQ 8 bit, budget none"),
        Variant("laq-disk", "laq", 0.0, "LAQ 8 bit, budget 0"),
        Variant("codec8-ram", "codec", None, "FedAvg + codec 8/8 bit, budget none"),
        Variant("codec8-disk", "codec", 0.0, "FedAvg + codec 8/8 bit, budget 0"),
        Variant("pfedla", "pfedla", None, "pFedLA (models on disk)"),
    )
}


# ------------------------------------------------------------------ process
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _state_bytes(state: State) -> int:
    return sum(value.nbytes for value in state.values())


def _noisy(state: State, rng: np.random.Generator) -> State:
    """``state`` plus Gaussian noise on its float tensors (a synthetic training step)."""
    return {
        key: value + NOISE * rng.standard_normal(value.shape, dtype=np.float32) if value.dtype.kind == "f" else value
        for key, value in state.items()
    }


# ------------------------------------------------------------------ replies
def _reply(sent: Message, client: int, arrays: ArrayRecord | None = None, metrics: dict[str, Any] | None = None,
           records: dict[str, ArrayRecord | ConfigRecord] | None = None) -> Message:
    """The train reply of ``client`` to ``sent`` (with ``records`` added), as the server would pull it."""
    content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 100, PARTITION_ID: client, **(metrics or {})})})
    if arrays is not None:
        content[ARRAYS] = arrays
    for name, record in (records or {}).items():
        content[name] = record
    return Message(content, reply_to=sent)


def _client_of(strategy: LayerwiseStrategy, sent: Message) -> int:
    return strategy.client_of[sent.metadata.dst_node_id]


def laq_reply(strategy: LAQStrategy, sent: Message, rng: np.random.Generator) -> Message:
    """An upload of a noise gradient, quantized around the client's last upload (the server's copy of it)."""
    client = _client_of(strategy, sent)
    base = strategy.versions.get(client, 0)
    stored = strategy.qhat.get(client) if base else None
    qhat = stored if stored is not None else {k: np.zeros(s, np.float32) for k, s in strategy.shapes.items()}
    g = _noisy({k: np.zeros(s, np.float32) for k, s in strategy.shapes.items()}, rng)
    decision = lazy_decision(g, qhat, bits=strategy.options.bits, ehat=0.0, clock=0, tbar=strategy.options.tbar,
                             drift=0.0, drift_scale=1.0, force=True)
    return _reply(sent, client, records=update_records(base, decision.tensors, decision.error))


def codec_reply(strategy: LayerwiseStrategy, sent: Message, rng: np.random.Generator) -> Message:
    """The trained model encoded against the reference the client holds after this download."""
    assert strategy.codec is not None
    client = _client_of(strategy, sent)
    version, reference = strategy.codec.pending[client]
    record, _, _ = encode_state(_noisy(reference, rng), reference, strategy.codec.up_bits)
    return _reply(sent, client, record, metrics={CODEC_VERSION: version})


def dense_reply(strategy: LayerwiseStrategy, sent: Message, rng: np.random.Generator) -> Message:
    """The model the node was sent plus noise, dense."""
    trained = _noisy(from_arrayrecord(sent.content[ARRAYS]), rng)
    return _reply(sent, _client_of(strategy, sent), to_arrayrecord(trained), metrics={"local-test-accuracy": 0.5})


# ------------------------------------------------------------------ rounds
def run_round(strategy: LayerwiseStrategy, server_round: int, clients: list[int], reply: ReplyFn,
              rng: np.random.Generator) -> None:
    """One round through ``configure_train``/``aggregate_train``: ``clients`` are the connected ones (all train)."""
    messages = push(strategy.configure_train(server_round, [NODE_OFFSET + c for c in clients]))  # as a grid gives them ids
    replies = [reply(strategy, sent, rng) for sent in messages]
    del messages
    strategy.aggregate_train(server_round, replies)
    if strategy.rejections:
        raise RuntimeError(f"round {server_round}: synthetic replies were refused: {strategy.rejections[:3]}")


def schedule(num_clients: int, fill: int, active: int, rounds: int, rng: np.random.Generator) -> list[list[int]]:
    """Each round's clients: every client once in cohorts of ``fill`` (none if 0), then ``rounds`` random cohorts of ``active``."""
    cohorts = [list(range(i, min(i + fill, num_clients))) for i in range(0, num_clients, fill)] if fill else []
    size = min(active, num_clients)
    return cohorts + [sorted(rng.choice(num_clients, size, replace=False).tolist()) for _ in range(rounds)]


def build(variant: Variant, initial: State, num_clients: int, total_rounds: int, seed: int) -> tuple[LayerwiseStrategy, ReplyFn]:
    """The variant's strategy (every node sampled each round) and its reply builder."""
    common: dict[str, Any] = {"fraction_train": 1.0, "seed": seed, "state_memory_mb": variant.memory_mb}
    if variant.method == "laq":
        # tbar beyond the run: no stored update goes stale and is dropped
        return LAQStrategy(initial, num_clients=num_clients, bits=BITS, tbar=total_rounds + 1, **common), laq_reply
    if variant.method == "codec":
        return LayerwiseStrategy(initial, up_bits=BITS, down_bits=BITS, **common), codec_reply
    return PFedLAStrategy(initial, num_clients=num_clients, **common), dense_reply


def stored_states(strategy: LayerwiseStrategy) -> int:
    """How many clients have a state on the server."""
    if isinstance(strategy, LAQStrategy):
        return len(strategy.qhat)
    if isinstance(strategy, PFedLAStrategy):
        return len(strategy.store.clients())
    assert strategy.codec is not None
    return len(strategy.codec.references)


def ram_bytes(strategy: LayerwiseStrategy, model_bytes: int) -> int:
    """What the stored states would take in RAM (pFedLA: a model and a hypernetwork per client)."""
    per_client = model_bytes
    if isinstance(strategy, PFedLAStrategy):
        per_client += sum(p.numel() * p.element_size() for p in strategy.hypernetwork(0).parameters())
    return stored_states(strategy) * per_client


def initial_model(model: str, size: int, seed: int) -> State:
    return torch_state_to_numpy(build_model(model, input_shape=(1, size, size), num_classes=10, seed=seed).state_dict())


def measure(variant: Variant, num_clients: int, fill: int, active: int, rounds: int, model: str, size: int,
            seed: int = 0) -> dict[str, Any]:
    """Build the variant for ``num_clients``, give every client a state, run the rounds; this process's memory numbers."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # messages need one outside a run
    initial = initial_model(model, size, seed)
    model_bytes = _state_bytes(initial)
    rng = np.random.default_rng(seed)
    plan = schedule(num_clients, 0 if variant.method == "pfedla" else fill, active, rounds, rng)
    rss_before = _status_kb("VmRSS") / 1024
    tracemalloc.start()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="server-memory-") as tmp:
        strategy, reply = build(variant, initial, num_clients, len(plan), seed)
        strategy.attach_run_dir(Path(tmp))
        strategy.client_of = {NODE_OFFSET + c: c for c in range(num_clients)}
        if isinstance(strategy, PFedLAStrategy):  # every client trained once
            flat = strategy.store.flatten(initial)
            for client in range(num_clients):
                strategy.store.write(client, flat + NOISE * rng.standard_normal(flat.shape, dtype=np.float32))
        for server_round, clients in enumerate(plan, start=1):
            run_round(strategy, server_round, clients, reply, rng)
        disk = _disk_bytes(Path(tmp))
        states = stored_states(strategy)
        in_ram = ram_bytes(strategy, model_bytes)
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "variant": variant.name,
        "clients": num_clients,
        "fill_per_round": 0 if variant.method == "pfedla" else min(fill, num_clients),
        "active_per_round": min(active, num_clients),
        "rounds": len(plan),
        "states": states,
        "state_mb": model_bytes / MB,
        "heap_peak_mb": heap_peak / MB,
        "rss_peak_mb": _status_kb("VmHWM") / 1024,
        "rss_before_mb": rss_before,
        "disk_mb": disk / MB,
        "all_in_ram_mb": in_ram / MB,
        "seconds": time.time() - started,
    }


# ------------------------------------------------------------------ report
def _round_size(row: dict[str, Any]) -> int:
    return max(row["fill_per_round"], row["active_per_round"])


def fitted_rows(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per variant, the rows a growth line is fitted to: those with its largest rounds.

    An N below ``--fill`` fills in smaller rounds, whose transient memory
    (replies, messages) is smaller too; it would pass for growth with N.
    """
    fitted = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        largest = max(_round_size(r) for r in mine)
        fitted[name] = [r for r in mine if _round_size(r) == largest]
    return fitted


def growth(rows: list[dict[str, Any]], field: str = "rss_peak_mb") -> dict[str, float]:
    """Least-squares slope (MB per client) of ``field`` against N, per variant with two N or more to fit."""
    return {
        name: float(np.polyfit([r["clients"] for r in mine], [r[field] for r in mine], 1)[0])
        for name, mine in fitted_rows(rows).items()
        if len({r["clients"] for r in mine}) > 1
    }


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The results table and the growth per client of each variant."""
    rss, heap, fitted = growth(rows), growth(rows, "heap_peak_mb"), fitted_rows(rows)
    lines = [
        header,
        "",
        "| variant | clients | rounds | clients per round | states | RSS peak MB | RSS before MB | heap peak MB | on disk MB "
        "| all in RAM MB | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['variant']} | {r['clients']} | {r['rounds']} | {r['fill_per_round'] or 'store'} then {r['active_per_round']} | "
            f"{r['states']} | {r['rss_peak_mb']:.0f} | {r['rss_before_mb']:.0f} | "
            f"{r['heap_peak_mb']:.0f} | {r['disk_mb']:.0f} | {r['all_in_ram_mb']:.0f} | {r['seconds']:.0f} |"
            for r in rows
        ),
        "",
        "| variant | fitted over N | peak RSS growth MB per client | heap peak growth MB per client |",
        "|---|---|---|---|",
        *(
            f"| {name} | {', '.join(str(r['clients']) for r in fitted[name])} | {rss[name]:.3f} | {heap[name]:.3f} |"
            for name in rss
        ),
    ]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Peak RSS against N, one line per variant (log x)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        ax.plot([r["clients"] for r in mine], [r["rss_peak_mb"] for r in mine], marker="o", label=VARIANTS[name].label)
    ax.set_xscale("log")
    ax.set_xlabel("clients (N)")
    ax.set_ylabel("server peak RSS (MB)")
    ax.set_title("Server peak memory vs number of clients")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_in_child(variant: str, num_clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` in a fresh process (peak RSS is per process)."""
    command = [
        sys.executable, "-m", "benchmarks.server_memory", "--one", variant, str(num_clients),
        "--fill", str(args.fill), "--active", str(args.active), "--rounds", str(args.rounds), "--model", args.model,
        "--input-size", str(args.input_size), "--seed", str(args.seed),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} with {num_clients} clients failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--fill", type=int, default=100, help="clients per round until every client has a state")
    parser.add_argument("--active", type=int, default=5, help="clients per round after that")
    parser.add_argument("--rounds", type=int, default=1, help="rounds after every client has a state")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--input-size", type=int, default=8, help="input is 1 x S x S, 10 classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out/server-memory"))
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.one is not None:
        row = measure(VARIANTS[args.one[0]], int(args.one[1]), args.fill, args.active, args.rounds, args.model, args.input_size, args.seed)
        print(json.dumps(row))
        return
    rows = []
    for variant in args.variants:
        for n in args.clients:
            rows.append(measure_in_child(variant, n, args))
            print(json.dumps(rows[-1]), flush=True)
    numel = sum(v.size for v in initial_model(args.model, args.input_size, args.seed).values())
    header = (
        f"Server memory, {args.model} on {args.input_size}x{args.input_size}x1 ({numel:,} parameters, "
        f"{rows[0]['state_mb']:.2f} MB a state): every client once, {args.fill} per round "
        f"(pFedLA: written to its store), then {args.rounds} round(s) of {args.active} clients."
    )
    text = markdown(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    write_csv(rows, args.out / "results.csv")
    (args.out / "results.md").write_text(text + "\n")
    plot(rows, args.out / "peak_rss_vs_clients.png")
    print(text)


if __name__ == "__main__":
    main()
