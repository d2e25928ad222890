"""Flower's own FedAvg as a minimal Flower app: the baseline of ``benchmarks.flower_overhead``.

It trains on exactly what ``fedlayer-sim strategy=fedavg`` trains on: the same
dataset, standardisation and IID split (taken from ``fedlayer.data``), the same
model class and initial weights (``fedlayer.models.build_model``), one local
epoch of plain SGD, and central evaluation of the global model after every
round on the same central test set. Everything else is Flower's:
``flwr.serverapp.strategy.FedAvg`` and its ``start`` loop.

Per-round time: ``evaluate_fn`` stamps the wall clock when each central
evaluation ends (round 0 = the initial model), so round k's time is
``stamp[k] - stamp[k - 1]``: the whole round (training, aggregation, central
evaluation, Flower's own bookkeeping). The ServerApp writes the stamps to
``times-path`` (JSON).

Simulation (settings as flags, see ``--help``):

    python -m benchmarks.flower_baseline_app --rounds 3 --times-path /tmp/flower.json

Deployment: ``benchmarks.flower_overhead --deployment`` copies this file into
a generated Flower app project, so it imports nothing from ``benchmarks``;
settings then come from the run config (``num-clients``, ``times-path``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedlayer.client.warm.forward import process_age
from fedlayer.data import (
    ArrayDataset,
    FederatedSplit,
    load_dataset,
    make_federated_split,
)
from fedlayer.models import LayeredModel, build_model

EVAL_BATCH = 500  # what fedlayer's central evaluation uses


@dataclass(frozen=True)
class BaselineConfig:
    """One run's settings; run-config keys are the field names with ``-`` for ``_``."""

    rounds: int = 10
    num_clients: int = 20
    fraction_train: float = 0.5
    lr: float = 0.05
    batch_size: int = 32
    local_epochs: int = 1
    seed: int = 0
    dataset: str = "mnist5k"
    model: str = "cnn"
    # fedlayer's default (dataset.central_test_fraction): mnist5k has no official test set.
    central_test_fraction: float = 0.2
    times_path: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> BaselineConfig:
        """Settings from a Flower run config (keys missing there keep their defaults)."""
        values = {}
        for field in dataclasses.fields(cls):
            key = field.name.replace("_", "-")
            if key in run_config:
                values[field.name] = type(field.default)(run_config[key])
        return cls(**values)

    def run_config(self) -> dict[str, Any]:
        """The settings as Flower run-config entries."""
        return {field.name.replace("_", "-"): value for field, value in zip(dataclasses.fields(self), dataclasses.astuple(self))}


# ------------------------------------------------------------------ data and model
def federated_split(cfg: BaselineConfig, num_partitions: int) -> tuple[ArrayDataset, FederatedSplit]:
    """(train pool, split) exactly as fedlayer builds it for an IID run with no client test sets."""
    pool, official_test = load_dataset(cfg.dataset)
    return make_federated_split(
        pool,
        official_test,
        num_partitions=num_partitions,
        scheme="iid",
        seed=cfg.seed,
        alpha=0.5,  # unused by iid
        classes_per_partition=2,  # unused by iid
        client_test_fraction=0.0,
        central_test_fraction=cfg.central_test_fraction,
    )


def new_model(cfg: BaselineConfig, data: ArrayDataset) -> LayeredModel:
    """The model with fedlayer's seeded initial weights."""
    return build_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=cfg.seed)


def train_epochs(model: nn.Module, data: ArrayDataset, cfg: BaselineConfig, rng: np.random.Generator) -> float:
    """``local_epochs`` shuffled passes of plain SGD; returns the mean minibatch loss."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(cfg.local_epochs):
        order = rng.permutation(len(data))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(torch.from_numpy(data.x[idx])), torch.from_numpy(data.y[idx]))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``data``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), EVAL_BATCH):
        x = torch.from_numpy(data.x[start : start + EVAL_BATCH])
        y = torch.from_numpy(data.y[start : start + EVAL_BATCH])
        logits = model(x)
        total_loss += float(loss_fn(logits, y))
        correct += int((logits.argmax(dim=1) == y).sum())
    return total_loss / len(data), correct / len(data)


# ------------------------------------------------------------------ apps
def make_client_app(fixed: BaselineConfig | None = None) -> ClientApp:
    """The ClientApp; ``fixed`` settings, else the run config's (deployment)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        age, started = process_age(), time.perf_counter()
        cfg = fixed or BaselineConfig.from_run_config(context.run_config)
        torch.set_num_threads(1)  # as fedlayer's clients on CPU: one core per Ray actor / SuperNode
        partition_id = int(context.node_config["partition-id"])
        pool, split = federated_split(cfg, int(context.node_config["num-partitions"]))
        data = pool.subset(split.client_train[partition_id])
        model = new_model(cfg, data)
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        server_round = int(message.content["config"]["server-round"])
        loss = train_epochs(model, data, cfg, np.random.default_rng([cfg.seed, server_round, partition_id]))
        metrics = MetricRecord({"train-loss": loss, "num-examples": len(data)})
        reply = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=message)
        # fedlayer's ClientApp logs the same line (its imports happen in the handler; this app's, at load)
        flwr_log(INFO, "flower baseline: train message answered cold in %.3f s (imports 0.000 s), %s s after the ClientApp process started",
                 time.perf_counter() - started, "?" if age is None else f"{age:.2f}")
        return reply

    return app


def central_evaluation(model: nn.Module, test: ArrayDataset, stamps: list[float]) -> Callable[[int, ArrayRecord], MetricRecord]:
    """FedAvg's ``evaluate_fn``: evaluates on the central test set, then appends the time to ``stamps``."""

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test)
        stamps.append(time.time())
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    return evaluate_fn


def make_server_app(fixed: BaselineConfig | None = None) -> ServerApp:
    """The ServerApp: Flower's FedAvg with central evaluation every round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = fixed or BaselineConfig.from_run_config(context.run_config)
        pool, split = federated_split(cfg, cfg.num_clients)
        model = new_model(cfg, pool)
        # No federated evaluation (fedlayer's fraction_evaluate is 0); wait for
        # every node before round 1, as fedlayer does (min_available_nodes).
        strategy = FedAvg(fraction_train=cfg.fraction_train, fraction_evaluate=0.0, min_available_nodes=cfg.num_clients)
        stamps: list[float] = []
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=cfg.rounds,
            evaluate_fn=central_evaluation(new_model(cfg, pool), split.central_test, stamps),
        )
        accuracy = [float(m["accuracy"]) for _, m in sorted(result.evaluate_metrics_serverapp.items())]
        Path(cfg.times_path).write_text(json.dumps({"round_end_times": stamps, "accuracy": accuracy}))

    return app


server_app = make_server_app()
client_app = make_client_app()


def run_in_simulation(cfg: BaselineConfig) -> None:
    """Run in Flower's simulation engine with the engine settings ``fedlayer-sim`` uses."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # "local": a Ray instance of its own, as fedlayer-sim (else it joins a cluster running here)
            "init_args": {"logging_level": logging.WARNING, "log_to_driver": True, "address": "local"},
        },
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one flag per setting."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(BaselineConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    cfg = BaselineConfig(**vars(parser.parse_args(argv)))
    if not cfg.times_path:
        parser.error("--times-path is required")
    run_in_simulation(cfg)


if __name__ == "__main__":
    main()
