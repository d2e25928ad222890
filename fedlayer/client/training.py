"""Local training and evaluation loops on in-memory array datasets."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from fedlayer.data import ArrayDataset


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
    params: list[nn.Parameter] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for one round; returns loss and step count.

    ``params`` restricts which parameters the optimiser updates (all by default).
    Batches come from seeded shuffled passes, so a round is reproducible.
    """
    if len(dataset) == 0:
        raise ValueError("client has no training examples")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = make_optimizer(params if params is not None else list(model.parameters()), train)
    loss_fn = nn.CrossEntropyLoss()
    steps = num_local_steps(train, len(dataset))
    total_loss, done = 0.0, 0
    while done < steps:
        for x, y in minibatches(dataset, int(train.batch_size), rng, device):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            done += 1
            if done >= steps:
                break
    return {"train-loss": total_loss / steps, "local-steps": float(steps)}


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: ArrayDataset, device: torch.device, batch_size: int = 500
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``dataset``."""
    if len(dataset) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num-examples": 0.0}
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        x = torch.from_numpy(dataset.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(dataset.y[start : start + batch_size]).to(device)
        logits = model(x)
        total_loss += float(loss_fn(logits, y))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = len(dataset)
    return {"loss": total_loss / n, "accuracy": correct / n, "num-examples": float(n)}
