"""CPU an idle SuperNode costs, by ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` and by its idle poll.

    python -m benchmarks.idle_cost [--intervals 1.0 0.1] [--idle-polls 3 0.2] [--seconds 60] [--out bench-out/idle-cost.json]

For each interval, a fresh loopback SuperLink and one SuperNode start
(``benchmarks.flower_overhead.LoopbackDeployment``), wait ``--settle``
seconds, then the CPU time (user + system, from ``/proc/<pid>/stat``) of the
SuperNode's process tree (the SuperNode and the SuperExec it starts) is read
at the start and the end of ``--seconds`` with no run submitted. Reported as
CPU-seconds per minute per idle node, with the SuperLink's CPU over the same
time (it answers the node's pulls). ``--intervals`` runs plain
``flower-supernode`` (Flower's 3 s idle sleep) at each task poll;
``--idle-polls`` runs it through ``fedlayer.client.supernode_launcher`` at each
idle poll (3: plain ``flower-supernode``), with the task poll ``--task-poll``
(0.1 s, what ``fedlayer-client`` sets).
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
    """The Flower command a process runs (``flower-supernode``, ``flower-superexec``), fedlayer's SuperNode
    launcher, else its program."""
    words = [w.rsplit("/", 1)[-1] for w in command.split(" ") if w]
    return next((w for w in words if w.startswith("flower-") or w.endswith("supernode_launcher")), words[0] if words else "?")


def idle_cost(interval: str, seconds: float, settle: float, logs: Path, idle_poll: float = 3) -> dict[str, object]:
    """CPU-seconds a minute of one idle SuperNode's tree with the SuperExec polling every ``interval`` s and the
    SuperNode pulling every ``idle_poll`` s (3: Flower's own ``flower-supernode``), and of the SuperLink meanwhile."""
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = interval
    logs.mkdir(parents=True, exist_ok=True)
    with LoopbackDeployment(logs, num_nodes=1, idle_poll=None if idle_poll == 3 else idle_poll) as deployment:
        time.sleep(settle)
        pids = [deployment.superlink_pid, *deployment.supernode_pids]
        before = cpu_seconds(pids)
        time.sleep(seconds)
        after = cpu_seconds(pids)
        superlink = process_tree([deployment.superlink_pid]).keys() & after.keys()
        processes = {_name(command_line(pid)) for pid in after if pid not in superlink}
    used = {part: sum(after[pid] - before.get(pid, 0.0) for pid in after if (pid in superlink) == (part == "superlink"))
            for part in ("supernode", "superlink")}
    return {"interval_s": float(interval), "idle_poll_s": float(idle_poll), "cpu_seconds_per_minute": used["supernode"] * 60 / seconds,
            "superlink_cpu_seconds_per_minute": used["superlink"] * 60 / seconds,
            "processes": sorted(processes), "load_average_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", nargs="*", default=["1.0", "0.1"], help="task polls (s), Flower's 3 s idle sleep")
    parser.add_argument("--idle-polls", nargs="*", type=float, default=[], help="idle polls (s) at --task-poll; 3 is Flower's own")
    parser.add_argument("--task-poll", default="0.1", help="task poll (s) for --idle-polls")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=Path("bench-out/idle-cost.json"))
    args = parser.parse_args()
    logs = args.out.parent / "idle-cost-logs"
    results = [idle_cost(i, args.seconds, args.settle, logs / i) for i in args.intervals]
    results += [idle_cost(args.task_poll, args.seconds, args.settle, logs / f"idle-{p}", p) for p in args.idle_polls]
    for r in results:
        print(f"task poll {r['interval_s']:.2f} s, idle poll {r['idle_poll_s']:.2f} s: {r['cpu_seconds_per_minute']:.2f} CPU-s/min "
              f"per idle SuperNode, SuperLink {r['superlink_cpu_seconds_per_minute']:.2f} "
              f"(processes {', '.join(r['processes'])}; load {r['load_average_1min']:.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
