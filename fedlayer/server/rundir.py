"""The run directory: metrics.jsonl, summary.json, config and plots."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedlayer.files import atomic_write

#: The file in a run directory holding the run's key.
RUN_KEY_FILE = "run-key"


def jsonable(value: Any, replaced: list[str] | None = None, where: str = "") -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN); numpy scalars as Python ones.

    The dotted path of each replaced value is appended to ``replaced``.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        if replaced is not None:
            replaced.append(where)
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v, replaced, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, replaced, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write strict JSON crash-safely (never half a file)."""
    atomic_write(path, json.dumps(jsonable(data), indent=2, allow_nan=False).encode())


def default_run_name(cfg: DictConfig) -> str:
    """``<UTC time>-<strategy>-<dataset>``: unique and readable."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S-%f}-{cfg.strategy.name}-{cfg.dataset.name}"


class RunDirectory:
    """One run's outputs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = path / "metrics.jsonl"
        self.error_path = path / "error.txt"

    @classmethod
    def create(cls, cfg: DictConfig) -> RunDirectory:
        """A fresh directory under ``cfg.output_dir`` named by ``cfg.run_name``."""
        run = cls(Path(cfg.output_dir).resolve() / (cfg.run_name or default_run_name(cfg)))
        if not cfg.resume:
            (run.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            run.new_run_key()
        return run

    @property
    def run_key(self) -> str:
        """This run's key (``wire.records.RUN_KEY``), which nodes key their saved round state by.

        Made once with the directory and kept in it, so ``resume=`` (a new
        Flower run) keeps it; a directory without one (an older run) gets one.
        """
        path = self.path / RUN_KEY_FILE
        if not path.exists():
            self.new_run_key()
        return path.read_text().strip()

    def new_run_key(self) -> None:
        """Give the run a fresh key: 16 random hex digits."""
        atomic_write(self.path / RUN_KEY_FILE, os.urandom(8).hex().encode())

    def append_metrics(self, record: dict[str, Any]) -> list[str]:
        """Add one round's line to ``metrics.jsonl``; the fields that were not finite.

        They are written as ``null`` and named in the line's ``nonfinite`` list.
        """
        replaced: list[str] = []
        line = jsonable(record, replaced)
        if replaced:
            line["nonfinite"] = replaced
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, allow_nan=False) + "\n")
        return replaced

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rounds written so far."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (work lost in a crash)."""
        kept = [r for r in self.read_metrics() if r["round"] <= last_round]
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write_error(self, message: str) -> Path:
        """Write ``error.txt``: why the run stopped (the command line shows it)."""
        atomic_write(self.error_path, (message + "\n").encode())
        return self.error_path

    def clear_error(self) -> None:
        """Forget why an earlier attempt of this run stopped (it is being resumed)."""
        self.error_path.unlink(missing_ok=True)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json``."""
        path = self.path / "summary.json"
        write_json_atomic(path, summary)
        return path
