"""The server's time and memory for per-client codec references, with and without shared downloads (issue #26).

    python -m benchmarks.shared_downlink --clients 20 100 --fractions 0.3 1.0 --rounds 10 --out bench-out/shared-downlink

FedAvg with the codec at 4 bits both ways on the real ``cnn`` (mnist-sized
input, 1.66M parameters), driven through the strategy's own
``configure_train``/``aggregate_train`` (no Flower engine, no training): each
sampled client answers with the model it was sent plus noise, encoded by
``benchmarks.server_memory.codec_reply``. Per variant: the seconds the server
spent encoding downloads per round (``ServerCodec.encode_seconds``, which
includes the digests that find shared references), the downloads that reused an encoding, and the references' memory:
what one copy per client takes against the distinct arrays actually held (with
``shared_downlink`` clients that received the same encoding share its arrays).
Written to ``--out``: ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.faults import push
from benchmarks.server_memory import NODE_OFFSET, codec_reply, initial_model
from fedlayer.codec.options import CodecOptions
from fedlayer.methods import LayerwiseStrategy


def measure(clients: int, fraction: float, rounds: int, shared: bool, seed: int = 0) -> dict[str, Any]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # messages need one outside a run
    initial = initial_model("cnn", 28, seed)
    strategy = LayerwiseStrategy(initial, fraction_train=fraction, seed=seed, up_bits=4, down_bits=4,
                                 codec_options=CodecOptions(shared_downlink=shared))
    assert strategy.codec is not None
    strategy.client_of = {NODE_OFFSET + c: c for c in range(clients)}
    rng = np.random.default_rng(seed)
    seconds, configure, hits, downloads = [], [], 0, 0
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        messages = push(strategy.configure_train(server_round, [NODE_OFFSET + c for c in range(clients)]))
        configure.append(time.perf_counter() - started)
        downloads += len(messages)
        replies = [codec_reply(strategy, sent, rng) for sent in messages]
        strategy.aggregate_train(server_round, replies)
        if strategy.rejections:
            raise RuntimeError(f"round {server_round}: synthetic replies were refused: {strategy.rejections[:3]}")
        seconds.append(strategy.codec.encode_seconds)
        hits += strategy.codec.shared_hits
    references = [strategy.codec.references.get(c) for c in strategy.codec.references.clients()]
    per_client = sum(v.nbytes for state in references for v in state.values())
    distinct = {id(v): v.nbytes for state in references for v in state.values()}
    return {
        "clients": clients, "fraction": fraction, "rounds": rounds, "shared_downlink": shared,
        "codec_seconds_per_round": float(np.mean(seconds)), "configure_seconds_per_round": float(np.mean(configure)),
        "downloads": downloads, "shared_downloads": hits,
        "reference_mb_per_client_copies": per_client / 2**20, "reference_mb_distinct": sum(distinct.values()) / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[20])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench-out/shared-downlink"))
    args = parser.parse_args(argv)
    results = [measure(n, f, args.rounds, shared) for n in args.clients for f in args.fractions for shared in (False, True)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| clients | fraction | shared | download encoding s/round | downloads reusing an encoding | references MB (one per client) | references MB (distinct) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['clients']} | {r['fraction']} | {r['shared_downlink']} | {r['codec_seconds_per_round']:.3f} | "
                     f"{r['shared_downloads']}/{r['downloads']} | {r['reference_mb_per_client_copies']:.1f} | {r['reference_mb_distinct']:.1f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
