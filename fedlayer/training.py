"""The one local training loop and the one evaluation loop, plus the central evaluator.

Everything here works on in-memory ``ArrayDataset``s and plain ``nn.Module``s;
methods pass their own per-batch loss (staged models, contrastive views) and
forward (a stage's head) where they need to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fedlayer.data import ArrayDataset
from fedlayer.layers import State, numpy_to_torch_state
from fedlayer.wire.records import TRAIN_SECONDS

#: ``step() -> loss`` run once under a meter: ``measure(step, x, y) -> (loss, metrics)``.
StepMeter = Callable[[Callable[[], Tensor], Tensor, Tensor], tuple[Tensor, dict[str, float]]]


def minibatches(
    dataset: ArrayDataset, batch_size: int, rng: np.random.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over the dataset as tensors on ``device``."""
    order = rng.permutation(len(dataset))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield (
            torch.from_numpy(dataset.x[idx]).to(device),
            torch.from_numpy(dataset.y[idx]).to(device),
        )


def make_optimizer(params: list[nn.Parameter], train: DictConfig) -> torch.optim.Optimizer:
    """The configured optimiser over ``params``."""
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def num_local_steps(train: DictConfig, num_examples: int) -> int:
    """Minibatch steps in one round: ``local_steps`` or ``local_epochs`` passes."""
    if train.local_steps > 0:
        return int(train.local_steps)
    return max(1, math.ceil(train.local_epochs * math.ceil(num_examples / train.batch_size)))


def train_steps(
    model: nn.Module,
    dataset: ArrayDataset,
    train: DictConfig,
    device: torch.device,
    seed: int,
    *,
    params: list[nn.Parameter] | None = None,
    batch_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    measure: StepMeter | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for one round; returns loss, step count and seconds taken.

    ``params`` restricts which parameters the optimiser updates (all by
    default). ``batch_loss(x, y)`` replaces cross-entropy of ``model(x)``; a
    caller passing it has set the modules' train/eval modes itself.
    ``measure`` wraps the first step (which also allocates optimiser state).
    Batches come from seeded shuffled passes (``rng``, default seeded by
    ``seed``), so a round is reproducible.
    """
    if len(dataset) == 0:
        raise ValueError("client has no training examples")
    start = time.perf_counter()
    rng = rng if rng is not None else np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.to(device)
    if batch_loss is None:
        model.train()
        loss_fn = nn.CrossEntropyLoss()

        def batch_loss(x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(model(x), y)

    optimizer = make_optimizer(params if params is not None else list(model.parameters()), train)
    steps = num_local_steps(train, len(dataset))
    total_loss, done = 0.0, 0
    metrics: dict[str, float] = {}
    while done < steps:
        for x, y in minibatches(dataset, int(train.batch_size), rng, device):

            def step() -> Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss(x, y)
                loss.backward()
                optimizer.step()
                return loss.detach()

            if done == 0 and measure is not None:
                loss, metrics = measure(step, x, y)
            else:
                loss = step()
            total_loss += float(loss)
            done += 1
            if done >= steps:
                break
    seconds = time.perf_counter() - start
    return {**metrics, "train-loss": total_loss / steps, "local-steps": float(steps), TRAIN_SECONDS: seconds}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ArrayDataset,
    device: torch.device,
    batch_size: int = 500,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` (or of ``forward``, e.g. a stage's head) on ``dataset``."""
    if len(dataset) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num-examples": 0.0}
    model.to(device).eval()
    forward = forward or model
    total_loss, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        x = torch.from_numpy(dataset.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(dataset.y[start : start + batch_size]).to(device)
        logits = forward(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = len(dataset)
    return {"loss": total_loss / n, "accuracy": correct / n, "num-examples": float(n)}


@dataclass
class Evaluator:
    """The server's test set and a model to score states on (CPU)."""

    model: nn.Module
    test_set: ArrayDataset

    def __call__(self, state: State) -> dict[str, float]:
        """Loss and accuracy of a full ``state`` of ``model`` on the test set."""
        self.model.load_state_dict(numpy_to_torch_state(state))
        return evaluate(self.model, self.test_set, torch.device("cpu"))

    def evaluate_module(self, module: nn.Module, forward: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Loss and accuracy of another module (a depth prefix, a staged model) on the test set."""
        return evaluate(module, self.test_set, torch.device("cpu"), forward=forward)
