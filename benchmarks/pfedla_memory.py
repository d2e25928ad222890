"""Server memory of pFedLA against the number of clients (no Flower, no training).

    python -m benchmarks.pfedla_memory --clients 10 50 200 --out bench-out/pfedla-memory

For each N, a fresh process builds ``PFedLAStrategy`` for the real model
(``cnn`` on 28x28x1, 10 classes: 1,663,370 parameters), gives every client a
stored model (as after each has trained once), then drives ``--rounds`` rounds
of ``--active`` clients: the personalised model of each active client
(``node_state``), a synthetic reply of the real shapes (the personalised
model plus noise), and the aggregation (hypernetwork steps + store writes).
Reported: Python heap peak (tracemalloc; numpy buffers included), peak and
final resident set (``VmHWM``/``VmRSS``), the bytes on disk, and what keeping
every model and hypernetwork in RAM would take instead. The growth rate is
the slope of peak RSS over N between the smallest and largest N.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

MB = 1024 * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(num_clients: int, active: int, rounds: int, seed: int = 0) -> dict[str, float]:
    """Run the synthetic rounds in this process and return its memory numbers."""
    from flwr.app import MessageType

    from fedlayer.layers import torch_state_to_numpy
    from fedlayer.methods.base import NodePlan
    from fedlayer.methods.pfedla import PFedLAStrategy
    from fedlayer.methods.replies import TrainReply
    from fedlayer.models import build_model

    initial = torch_state_to_numpy(build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=seed).state_dict())
    rng = np.random.default_rng(seed)
    baseline_rss = _status_kb("VmRSS") / 1024
    tracemalloc.start()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="pfedla-memory-") as tmp:
        strategy = PFedLAStrategy(initial, num_clients=num_clients, seed=seed)
        strategy.attach_run_dir(Path(tmp))
        strategy.client_of = {client: client for client in range(num_clients)}  # node id = client id
        flat = strategy.store.flatten(initial)
        for client in range(num_clients):  # every client has trained once
            strategy.store.write(client, flat + rng.normal(0, 0.01, flat.shape).astype(np.float32))
        names = strategy.layers.names
        for server_round in range(1, rounds + 1):
            chosen = [(server_round * active + i) % num_clients for i in range(min(active, num_clients))]
            strategy.plans = {node: NodePlan(send=names, request=names) for node in chosen}
            replies = []
            for node in chosen:
                sent = strategy.node_state(node, names, MessageType.TRAIN)
                trained = {k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in sent.items()}
                replies.append(TrainReply(node, trained, set(names), 100, {"local-test-accuracy": 0.5}))
                del sent
            strategy.aggregate(server_round, replies)
            del replies
        disk = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        hn_bytes = sum(p.numel() * 4 for p in strategy.hypernetwork(0).parameters())
        model_bytes = strategy.store.numel * 4
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "clients": num_clients,
        "active_per_round": min(active, num_clients),
        "rounds": rounds,
        "heap_peak_mb": heap_peak / MB,
        "rss_peak_mb": _status_kb("VmHWM") / 1024,
        "rss_before_mb": baseline_rss,
        "disk_mb": disk / MB,
        "all_in_ram_mb": num_clients * (model_bytes + hn_bytes) / MB,
        "hypernetwork_mb_per_client": hn_bytes / MB,
        "seconds": time.time() - started,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--active", type=int, default=10, help="clients per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out/pfedla-memory"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: measure one N
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.active, args.rounds)))
        return
    rows = []
    for n in args.clients:  # one process per N: peak RSS is per process
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.pfedla_memory", "--one", str(n), "--active", str(args.active), "--rounds", str(args.rounds)],
            capture_output=True, text=True, check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    first, last = rows[0], rows[-1]
    slope = (last["rss_peak_mb"] - first["rss_peak_mb"]) / max(last["clients"] - first["clients"], 1)
    lines = [
        f"pFedLA server memory, cnn (1,663,370 parameters), {args.active} clients per round, {args.rounds} rounds after every client has a stored model.",
        "",
        "| clients | heap peak MB (tracemalloc) | RSS peak MB | RSS before strategy MB | on disk MB | all models + HNs in RAM would be MB | HN MB per client | s |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['clients']} | {r['heap_peak_mb']:.1f} | {r['rss_peak_mb']:.1f} | {r['rss_before_mb']:.1f} | {r['disk_mb']:.0f} | "
            f"{r['all_in_ram_mb']:.0f} | {r['hypernetwork_mb_per_client']:.3f} | {r['seconds']:.0f} |"
            for r in rows
        ),
        "",
        f"Growth of peak RSS: {slope:.3f} MB per extra client ({first['clients']} -> {last['clients']} clients).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
