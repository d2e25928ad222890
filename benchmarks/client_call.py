"""What a ClientApp costs per message: its import time and the time of train calls.

In deployment Flower starts a fresh ``flwr-clientapp`` process per message, so
the import and the first (cold) call are paid per client per round; in
simulation an actor serves many calls, so later (warm) calls matter there.
Runs the deployed path (config read from the run config; with and without a
state folder, where a node keeps its data split), FedAvg on mnist5k,
the CNN, 20 partitions, one local epoch; works on any fedlayer version that
has ``fedlayer.client.app.app``.

    python -m benchmarks.client_call --calls 3 --out bench-out/client-call.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from fedlayer.client.app import app
import_s = time.perf_counter() - t0
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedlayer.data import load_dataset
from fedlayer.layers import to_arrayrecord, torch_state_to_numpy
from fedlayer.models import build_model
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
pool, _ = load_dataset("mnist5k")
state = torch_state_to_numpy(build_model("cnn", input_shape=pool.input_shape, num_classes=pool.num_classes, seed=0).state_dict())
names = sorted({k.rsplit(".", 1)[0] for k in state})
run_config = {"strategy": "fedavg", "dataset": "mnist5k", "model": "",
              "overrides": "federation.num_clients=20 dataset.client_test_fraction=0"}
calls = []
for call in range(int(sys.argv[1])):
    node_config = {"partition-id": call % 20, "num-partitions": 20}
    if sys.argv[2]:
        node_config["state-dir"] = sys.argv[2]
    context = Context(run_id=1, node_id=7, node_config=node_config,
                      state=RecordDict(), run_config=run_config)
    config = ConfigRecord({"server-round": 1, "method": "fedavg", "request": names, "keep-model": False})
    message = Message(RecordDict({"config": config, "arrays": to_arrayrecord(state)}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = "m%d" % call
    t0 = time.perf_counter()
    reply = app(message, context)
    calls.append(time.perf_counter() - t0)
    assert not reply.has_error(), reply.error
print(json.dumps({"import_s": import_s, "calls_s": calls}))
"""


def measure(repo: Path, calls: int, state_dir: str = "", repeats: int = 3) -> dict:
    """Import and call times of the fedlayer at ``repo``, nodes using ``state_dir``: the
    smallest of ``repeats`` fresh processes, each figure on its own (the machine's noise only adds)."""
    runs = [_measure_once(repo, calls, state_dir) for _ in range(repeats)]
    return {
        "import_s": min(r["import_s"] for r in runs),
        "calls_s": [min(r["calls_s"][i] for r in runs) for i in range(calls)],
    }


def _measure_once(repo: Path, calls: int, state_dir: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(calls), state_dir], cwd=repo, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(repo), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
             "PATH": "/usr/bin:/bin"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a git worktree of an older commit) to compare")
    parser.add_argument("--out", type=Path, default=Path("bench-out/client-call.json"))
    args = parser.parse_args()
    results = {"current": measure(Path.cwd(), args.calls)}
    with tempfile.TemporaryDirectory() as state_dir:
        _measure_once(Path.cwd(), 20, state_dir)  # every node's first message: computes and keeps its split
        results["current, split kept in the node's state folder"] = measure(Path.cwd(), args.calls, state_dir)
    if args.baseline:
        results["baseline"] = measure(args.baseline.resolve(), args.calls)
    for name, result in results.items():
        calls = ", ".join(f"{s:.2f}" for s in result["calls_s"])
        print(f"{name}: import {result['import_s']:.2f} s; train calls {calls} s (first is cold)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
