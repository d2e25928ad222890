"""The run directory: metrics.jsonl, summary.json, config and plots."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedlayer.files import atomic_write


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON crash-safely (never half a file)."""
    atomic_write(path, json.dumps(_jsonable(data), indent=2).encode())


def default_run_name(cfg: DictConfig) -> str:
    """``<UTC time>-<strategy>-<dataset>``: unique and readable."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S-%f}-{cfg.strategy.name}-{cfg.dataset.name}"


class RunDirectory:
    """One run's outputs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = path / "metrics.jsonl"

    @classmethod
    def create(cls, cfg: DictConfig) -> RunDirectory:
        """A fresh directory under ``cfg.output_dir`` named by ``cfg.run_name``."""
        run = cls(Path(cfg.output_dir).resolve() / (cfg.run_name or default_run_name(cfg)))
        if not cfg.resume:
            (run.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        return run

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one round's line to ``metrics.jsonl``."""
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rounds written so far."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (work lost in a crash)."""
        kept = [r for r in self.read_metrics() if r["round"] <= last_round]
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json``."""
        path = self.path / "summary.json"
        write_json_atomic(path, summary)
        return path
