"""One fedlayer run as an MLflow run (``logging.mlflow=true``; needs ``pip install 'fedlayer[mlflow]'``).

The whole config goes in as params, every round's scalars (the ones
TensorBoard gets) as metrics, and at the end the summary (as metrics), and
``summary.json``, ``config.yaml``, ``clients.csv`` and the run's PNGs as
artifacts. The default store is local and offline: ``<output_dir>/mlflow.db``
(SQLite; MLflow 3 keeps its ``mlruns/`` file store in maintenance mode) with
artifacts under ``<output_dir>/mlartifacts``. ``mlflow.json`` in the run
directory names the MLflow run, so a resumed run logs into the same one.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

EXPERIMENT = "fedlayer"
#: Written into the run directory: which MLflow run (and store) this run logs into.
RUN_FILE = "mlflow.json"
ARTIFACTS = ("summary.json", "config.yaml", "clients.csv", "metrics.jsonl")
BATCH = 100  # MLflow's limit on params per batch (metrics: 1000)


def tracking_uri(cfg: DictConfig) -> str:
    """``logging.mlflow_uri``, or the local SQLite store in ``output_dir``."""
    if cfg.logging.mlflow_uri:
        return str(cfg.logging.mlflow_uri)
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def metric_name(tag: str) -> str:
    """A TensorBoard tag as an MLflow metric name (letters, digits, ``_-. /`` only)."""
    return re.sub(r"[^\w\-. /]", "_", tag)


def _flat_params(cfg: DictConfig) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = str(value)[:6000]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


class MlflowRun:
    """Logs one fedlayer run into an MLflow tracking store."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        uri = tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=uri)
        saved = run_dir / RUN_FILE
        if saved.is_file() and json.loads(saved.read_text()).get("tracking_uri") == uri:
            self.run_id = str(json.loads(saved.read_text())["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri() if not cfg.logging.mlflow_uri else None
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(key, value) for key, value in _flat_params(cfg).items()]
        for chunk in _chunks(params):
            self.client.log_batch(self.run_id, params=chunk)
        saved.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    def log_round(self, scalars: dict[str, float], step: int) -> None:
        """One round's scalars, as metrics at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(tag), value, now, step) for tag, value in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def finish(self) -> None:
        """At the end of the run: the summary's numbers and the run's files; the MLflow run is finished."""
        summary = json.loads((self.run_dir / "summary.json").read_text())
        numbers = {f"summary/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log_round(numbers, int(summary["rounds"]))
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        for png in sorted(self.run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(png), artifact_path="plots")
        self.client.set_terminated(self.run_id, status="FINISHED")
