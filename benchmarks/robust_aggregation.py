"""FedAvg with one of ten clients sending scaled updates (x1e6) on mnist5k: mean, median, trimmed mean.

    python -m benchmarks.robust_aggregation --out bench-out/robust [--rounds 15] [--local-steps 10]

Every variant is FedAvg on mnist5k with the CNN, 10 clients on an IID split,
all of them trained every round, the same seed and data; each runs in its own
process through ``fedlayer.commands.sim.simulate``, the engine path of ``fedlayer-sim``
(Flower's ``run_simulation`` with fedlayer's ServerApp and ClientApp). In the
attacked variants the client of partition 0 is an attacker: its ClientApp is
fedlayer's, wrapped here so that it replies ``sent + 1e6 * (trained - sent)``
for every float tensor (fedlayer itself holds no attack code). Variants:

- ``reference``: no attacker, weighted mean, norm guard on (the defaults);
- ``mean-guard-off``: attacker, weighted mean, norm guard off (undefended);
- ``mean-guard-on``: attacker, weighted mean, norm guard on (the default defence);
- ``median-guard-off``: attacker, coordinate-wise median alone;
- ``trimmed-guard-off``: attacker, trimmed mean (trim 0.1: one value cut at
  each end of every coordinate) alone.

The robust rules run with the guard off so that the rule alone faces the
attacker (with the guard on, it refuses the attacker before any rule runs).

Output in a fresh ``<out>/<UTC time>/``: ``runs/`` (each variant's fedlayer
run directory), ``logs/`` (each variant's output), ``results.json``,
``results.csv``, ``results.md`` and ``accuracy_per_round.png``.
``python -m benchmarks.robust_aggregation variant [--attacker 0] OVERRIDES...``
runs one simulation (what each variant's process runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import matplotlib
import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

import fedlayer.client.app as fedlayer_client_app
from benchmarks.flower_overhead import FLOWER_ENV, ROUND_LINE, read_metrics
from fedlayer.commands.sim import simulate
from fedlayer.layers import State, from_arrayrecord, to_arrayrecord
from fedlayer.methods.client_half import received_state
from fedlayer.wire.records import ARRAYS, NO_PARTITION, PARTITION_ID

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ATTACKER = 0
SCALE = 1e6
NUM_CLIENTS = 10
TRIM = 0.1
#: What each variant's row takes from its run's summary.json.
SUMMARY_FIELDS = ("final_accuracy", "rejected_replies", "dropped_updates", "bytes_up", "bytes_down", "bytes_total", "wall_seconds")
CSV_FIELDS = ("variant", "attacker", "rule", "norm_guard", *SUMMARY_FIELDS)


@dataclass(frozen=True)
class Variant:
    """One simulation of the benchmark: with or without the attacker, an aggregation rule, the guard on or off."""

    name: str
    attacked: bool
    rule: str
    norm_guard: bool

    def overrides(self) -> list[str]:
        """This variant's aggregation settings as Hydra overrides."""
        return [f"aggregation.rule={self.rule}", f"aggregation.norm_guard={str(self.norm_guard).lower()}"]


VARIANTS = (
    Variant("reference", attacked=False, rule="mean", norm_guard=True),
    Variant("mean-guard-off", attacked=True, rule="mean", norm_guard=False),
    Variant("mean-guard-on", attacked=True, rule="mean", norm_guard=True),
    Variant("median-guard-off", attacked=True, rule="median", norm_guard=False),
    Variant("trimmed-guard-off", attacked=True, rule="trimmed_mean", norm_guard=False),
)


# ------------------------------------------------------------------ the attacker (benchmark only)
def scaled_update(sent: State, trained: State, scale: float) -> State:
    """``sent + scale * (trained - sent)`` for every float tensor that was sent; other tensors as trained."""
    out = dict(trained)
    for key, value in trained.items():
        if key in sent and np.issubdtype(value.dtype, np.floating):
            update = value.astype(np.float64) - sent[key].astype(np.float64)
            out[key] = (sent[key].astype(np.float64) + scale * update).astype(value.dtype)
    return out


def attacked_client_app(honest: ClientApp, attacker: int, scale: float) -> ClientApp:
    """``honest`` for every node, except that the node of partition ``attacker`` scales its train replies' updates."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        """The honest reply; the attacker's arrays replaced by the scaled update."""
        if int(context.node_config.get(PARTITION_ID, NO_PARTITION)) != attacker:
            return honest(message, context)
        sent = received_state(message.content)
        reply = honest(message, context)
        if reply.has_error():
            return reply
        if ARRAYS not in reply.content:  # e.g. an encoded upload: refuse rather than run without an attacker
            raise RuntimeError(f"the attacker needs dense layers in its reply's {ARRAYS!r} record; it has {list(reply.content)}")
        reply.content[ARRAYS] = to_arrayrecord(scaled_update(sent, from_arrayrecord(reply.content[ARRAYS]), scale))
        return reply

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """Unchanged."""
        return honest(message, context)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        """Unchanged."""
        return honest(message, context)

    return app


def simulate_variant(overrides: Sequence[str], attacker: int | None, scale: float) -> dict[str, Any]:
    """``fedlayer.commands.sim.simulate`` with fedlayer's ClientApp wrapped by the attacker (None: not wrapped)."""
    if attacker is None:
        return simulate(overrides)
    make_honest = fedlayer_client_app.make_client_app

    def make_attacked(cfg: DictConfig | None = None) -> ClientApp:
        return attacked_client_app(make_honest(cfg), attacker, scale)

    with mock.patch.object(fedlayer_client_app, "make_client_app", make_attacked):
        return simulate(overrides)


# ------------------------------------------------------------------ running the variants
def common_overrides(rounds: int, local_steps: int, seed: int) -> list[str]:
    """The settings every variant shares (pinned, not left to defaults)."""
    return [
        "strategy=fedavg", "dataset=mnist5k", "model=cnn", "dataset.partition.scheme=iid", f"seed={seed}",
        f"federation.num_clients={NUM_CLIENTS}", "federation.fraction_train=1.0", f"federation.rounds={rounds}",
        f"train.local_steps={local_steps}", f"aggregation.trim={TRIM}",
    ]


def run_streamed(command: Sequence[str], log_path: Path) -> None:
    """Run ``command`` with its output in ``log_path``, echoing its ``[round k/N]`` lines; raise if it fails."""
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **FLOWER_ENV}, text=True, errors="replace",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if match := ROUND_LINE.search(line):
                print(f"    {line[match.start():].strip()}", flush=True)
    if process.returncode != 0:
        raise RuntimeError(f"variant failed (exit {process.returncode}); log: {log_path}")


def run_variant(variant: Variant, common: list[str], scale: float, folder: Path) -> dict[str, Any]:
    """One variant in its own process; its results row. Any error reply fails it (every client must reply every round)."""
    overrides = [*common, *variant.overrides(), f"output_dir={folder / 'runs'}", f"run_name={variant.name}"]
    attack = ["--attacker", str(ATTACKER), "--scale", str(scale)] if variant.attacked else []
    log = folder / "logs" / f"{variant.name}.log"
    run_streamed([sys.executable, "-m", "benchmarks.robust_aggregation", "variant", *attack, *overrides], log)
    run_dir = folder / "runs" / variant.name
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir)
    if errors := sum(record["error_replies"] for record in records):
        raise RuntimeError(f"{variant.name}: {errors} error replies; log: {log}")
    return {
        "variant": variant.name, "attacker": ATTACKER if variant.attacked else None, "scale": scale if variant.attacked else None,
        "rule": variant.rule, "norm_guard": variant.norm_guard,
        **{key: summary[key] for key in SUMMARY_FIELDS},
        "accuracy_per_round": [record.get("accuracy") for record in records],
        "run_dir": str(run_dir),
    }


# ------------------------------------------------------------------ results
def accuracy_text(value: float | None) -> str:
    """An accuracy with 4 decimals ("-" when missing)."""
    return "-" if value is None else f"{value:.4f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Each variant: rule, guard, final accuracy and its difference from the reference, rejections, traffic."""
    reference = next((r["final_accuracy"] for r in rows if r["attacker"] is None), None)
    lines = [
        "| variant | attacker | rule | norm guard | final acc | vs reference | rejected replies | dropped updates | MB up + down |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r["final_accuracy"]
        delta = f"{(acc - reference) * 100:+.1f} pt" if acc is not None and reference is not None else "-"
        attacker = "none" if r["attacker"] is None else f"partition {r['attacker']}, x{r['scale']:g}"
        lines.append(
            f"| {r['variant']} | {attacker} | {r['rule']} | {'on' if r['norm_guard'] else 'off'} | {accuracy_text(acc)} | {delta} | "
            f"{r['rejected_replies']} | {r['dropped_updates']} | {r['bytes_total'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One line per variant with the fields of ``CSV_FIELDS``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy(rows: list[dict[str, Any]], scale: float, path: Path) -> None:
    """Central test accuracy against the round, one line per variant."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        rounds = [(k, a) for k, a in enumerate(r["accuracy_per_round"], 1) if a is not None]
        ax.plot([k for k, _ in rounds], [a for _, a in rounds], marker=".", label=r["variant"])
    ax.set_title(f"FedAvg, mnist5k, {NUM_CLIENTS} clients; partition {ATTACKER} scales its update x{scale:g}", fontsize=9)
    ax.set_xlabel("round")
    ax.set_ylabel("central test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_benchmark(args: argparse.Namespace) -> Path:
    """Every variant, one after the other; results written after each; the run folder."""
    folder = args.out / f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    (folder / "logs").mkdir(parents=True)
    print(f"robust aggregation benchmark: {folder}", flush=True)
    common = common_overrides(args.rounds, args.local_steps, args.seed)
    settings = {"attacker": ATTACKER, "scale": args.scale, "overrides": common}
    rows: list[dict[str, Any]] = []
    started = time.time()
    for index, variant in enumerate(VARIANTS, 1):
        print(f"[{index}/{len(VARIANTS)}] {variant.name} | {time.time() - started:.0f} s elapsed", flush=True)
        rows.append(run_variant(variant, common, args.scale, folder))
        row = rows[-1]
        print(f"  final accuracy {accuracy_text(row['final_accuracy'])}, {row['rejected_replies']} rejected, {row['wall_seconds']:.0f} s", flush=True)
        (folder / "results.json").write_text(json.dumps({"settings": settings, "variants": rows}, indent=2))
    write_csv(rows, folder / "results.csv")
    table = markdown_table(rows)
    (folder / "results.md").write_text(table + "\n")
    plot_accuracy(rows, args.scale, folder / "accuracy_per_round.png")
    print(f"\n{table}\n\n{time.time() - started:.0f} s in all; results in {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/robust"), help="folder for the run folder")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-steps", type=int, default=10, help="minibatch steps per client per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=SCALE, help="the attacker's update multiplier")
    commands = parser.add_subparsers(dest="command")
    one = commands.add_parser("variant", help="run one simulation in this process")
    one.add_argument("--attacker", type=int, default=None, help="partition id of the attacking client (default: none)")
    one.add_argument("--scale", type=float, default=SCALE)
    one.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedlayer-sim")
    args = parser.parse_args(argv)
    if args.command == "variant":
        simulate_variant(args.overrides, args.attacker, args.scale)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
