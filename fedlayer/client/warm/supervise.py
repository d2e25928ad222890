"""Keep a node's warm worker running next to its SuperNode (``fedlayer-client``)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path


class WorkerSupervisor:
    """Runs ``python -m fedlayer.client.warm.worker --state-dir DIR`` as a child, restarting it when it ends.

    While it is down (starting, crashed, cancelled), messages run cold. A
    worker that ends within ``stable_s`` of its start waits twice as long
    before the next start (up to ``max_delay_s``), so a worker that cannot
    start does not spin. Its output goes to ``log`` (appended), else to this
    process's stderr.
    """

    def __init__(self, state_dir: Path, restart_delay_s: float = 1.0, max_delay_s: float = 60.0, stable_s: float = 30.0,
                 log: Path | None = None) -> None:
        self.command = [sys.executable, "-m", "fedlayer.client.warm.worker", "--state-dir", str(state_dir)]
        self.restart_delay_s = restart_delay_s
        self.max_delay_s = max_delay_s
        self.stable_s = stable_s
        self.log = log
        self.starts = 0
        self.child: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="warm-worker", daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    @property
    def pid(self) -> int | None:
        child = self.child
        return child.pid if child is not None and child.poll() is None else None

    def _run(self) -> None:
        delay = self.restart_delay_s
        while not self._stopping.is_set():
            started = time.monotonic()
            self.child = self._start_child()
            self.starts += 1
            if self._stopping.is_set():  # stop() came between the check and the start
                self.child.terminate()
            status = self.child.wait()
            if self._stopping.is_set():
                return
            delay = self.restart_delay_s if time.monotonic() - started >= self.stable_s else min(2 * delay, self.max_delay_s)
            self._say(f"fedlayer-client: the warm worker ended (status {status}); messages run cold until it is back, "
                      f"restarting in {delay:g} s")
            self._stopping.wait(delay)

    def _start_child(self) -> subprocess.Popen:
        if self.log is None:
            return subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        with open(self.log, "ab") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stderr=out)

    def _say(self, line: str) -> None:
        if self.log is None:
            print(line, file=sys.stderr, flush=True)
        else:
            with open(self.log, "a") as out:
                out.write(line + "\n")

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop restarting, and end the worker (SIGTERM, then SIGKILL after ``grace_s``)."""
        self._stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._thread.join(timeout=grace_s)
