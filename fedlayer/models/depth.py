"""Depth prefixes of a ``LayeredModel``: the first ``c`` blocks and a head for that depth.

FedLP's heterogeneous scheme trains such sub-models; their heads below full
depth are linear classifiers on the flattened block output, named
``level-heads.<c>.weight`` / ``.bias`` so they travel and are averaged like layers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from fedlayer.layers import State, numpy_to_torch_state, torch_state_to_numpy
from fedlayer.models.base import LayeredModel, forward_blocks

#: State-dict prefix of the per-level heads (``level-heads.<c>.weight``/``.bias``).
LEVEL_HEAD_PREFIX = "level-heads."


def level_head_name(level: int) -> str:
    """Layer name of the head of depth ``level`` (below full depth)."""
    return f"{LEVEL_HEAD_PREFIX}{level}"


def block_index(name: str) -> int | None:
    """Index of the block a layer belongs to (``blocks.<i>.*``); None for head layers."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


def level_layers(names: list[str], level: int, depth: int) -> list[str]:
    """Layers of a level-``level`` sub-model: its blocks, then the model's head
    at full depth or the level head below it."""
    blocks = [n for n in names if (i := block_index(n)) is not None and i < level]
    if level == depth:
        return blocks + [n for n in names if block_index(n) is None]
    return blocks + [level_head_name(level)]


def init_level_head(model: LayeredModel, level: int, seed: int) -> State:
    """The initial level-``level`` head: a linear classifier on the flattened
    block output, seeded by (``seed``, ``level``) so server and clients agree."""
    features = int(np.prod(model.block_output_shape(level)))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed * 1009 + level)
        head = nn.Linear(features, model.num_classes)
    name = level_head_name(level)
    return {f"{name}.{key}": value for key, value in torch_state_to_numpy(head.state_dict()).items()}


def level_head_module(state: State, level: int) -> nn.Linear:
    """A linear head loaded from the ``level-heads.<level>.*`` keys of ``state``."""
    name = level_head_name(level)
    weight = state[f"{name}.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(numpy_to_torch_state({"weight": weight, "bias": state[f"{name}.bias"]}))
    return head


class DepthNet(nn.Module):
    """The first ``level`` blocks of ``model`` followed by ``head``.

    Shares the model's blocks (training updates ``model`` in place); at full
    depth with ``head=None`` it is the model itself.
    """

    def __init__(self, model: LayeredModel, level: int, head: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(model.blocks[:level])
        self.head = model.head if head is None else head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(forward_blocks(self.blocks, x, range(len(self.blocks))), 1))
