"""Process helpers shared by the deployment benchmarks and the end-to-end tests.

Flower 1.39's SuperLink and SuperNodes each start a ``flower-superexec`` in a
session of its own, which starts one ``flwr-serverapp`` / ``flwr-clientapp``
process per task. Killing the started processes' groups would miss those, so
the helpers here find a process tree through ``/proc`` (parent links and
session ids) and guard every signal with the process's start time, so that a
reused pid is never hit. ``tree_rss`` measures the same trees' memory.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def executable(name: str) -> str:
    """A Flower command next to this Python (its venv), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


# ------------------------------------------------------------ process trees
def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, session id, start time) of a live process, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    if fields[0] == "Z":  # a zombie has exited; only its parent can reap it
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _process_table() -> dict[int, tuple[int, int, int]]:
    """``{pid: (parent pid, session id, start time)}`` of every live process."""
    return {int(e): stat for e in os.listdir("/proc") if e.isdigit() and (stat := _proc_stat(int(e))) is not None}


def process_tree(roots: Iterable[int]) -> dict[int, int]:
    """Live processes started from ``roots``: ``{pid: start time}``.

    A process belongs to the tree when its parent does or when it runs in the
    session of one of the roots (the roots are started as session leaders), so
    a process whose parent already exited is still found.
    """
    table = _process_table()
    roots = set(roots)
    found = {pid for pid in roots if pid in table}
    grown = True
    while grown:
        new = {pid for pid, (ppid, sid, _) in table.items() if pid not in found and (ppid in found or sid in roots)}
        found |= new
        grown = bool(new)
    return {pid: table[pid][2] for pid in found}


def alive(tree: Mapping[int, int]) -> dict[int, int]:
    """The processes of ``tree`` still running (same start time: not a reused pid)."""
    return {pid: started for pid, started in tree.items() if (stat := _proc_stat(pid)) is not None and stat[2] == started}


def signal_tree(tree: Mapping[int, int], sig: int) -> None:
    """Send ``sig`` to the processes of ``tree`` still running."""
    for pid in alive(tree):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------ memory
def rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 once it has exited)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def command_line(pid: int) -> str:
    """A process's command line, arguments joined by spaces ("" once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def tree_rss(roots: Iterable[int]) -> dict[int, int]:
    """``{pid: resident bytes}`` of every live process of the trees started from ``roots``."""
    return {pid: rss_bytes(pid) for pid in process_tree(roots)}
