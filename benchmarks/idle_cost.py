"""CPU an idle SuperNode costs, by ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``.

    python -m benchmarks.idle_cost [--intervals 1.0 0.1] [--seconds 60] [--out bench-out/idle-cost.json]

For each interval, a fresh loopback SuperLink and one SuperNode start
(``benchmarks.flower_overhead.LoopbackDeployment``), wait ``--settle``
seconds, then the CPU time (user + system, from ``/proc/<pid>/stat``) of the
SuperNode's process tree (the SuperNode and the SuperExec it starts) is read
at the start and the end of ``--seconds`` with no run submitted. Reported as
CPU-seconds per minute per idle node.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.flower_overhead import LoopbackDeployment
from benchmarks.processes import command_line, process_tree

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each live process of the trees started from ``pids``."""
    used = {}
    for pid in process_tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)
    return used


def _name(command: str) -> str:
    """The Flower command a process runs (``flower-supernode``, ``flower-superexec``), else its program."""
    words = [w.rsplit("/", 1)[-1] for w in command.split(" ") if w]
    return next((w for w in words if w.startswith("flower-")), words[0] if words else "?")


def idle_cost(interval: str, seconds: float, settle: float, logs: Path) -> dict[str, object]:
    """CPU-seconds a minute of one idle SuperNode's tree with the SuperExec polling every ``interval`` s."""
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = interval
    logs.mkdir(parents=True, exist_ok=True)
    with LoopbackDeployment(logs, num_nodes=1) as deployment:
        time.sleep(settle)
        before = cpu_seconds(deployment.supernode_pids)
        time.sleep(seconds)
        after = cpu_seconds(deployment.supernode_pids)
    processes = {_name(command_line(pid)) for pid in after}
    used = sum(after[pid] - before.get(pid, 0.0) for pid in after)
    return {"interval_s": float(interval), "cpu_seconds_per_minute": used * 60 / seconds,
            "processes": sorted(processes), "load_average_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", nargs="+", default=["1.0", "0.1"])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=Path("bench-out/idle-cost.json"))
    args = parser.parse_args()
    results = [idle_cost(i, args.seconds, args.settle, args.out.parent / "idle-cost-logs" / i) for i in args.intervals]
    for r in results:
        print(f"task poll {r['interval_s']:.2f} s: {r['cpu_seconds_per_minute']:.2f} CPU-s/min per idle SuperNode "
              f"(processes {', '.join(r['processes'])}; load {r['load_average_1min']:.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
