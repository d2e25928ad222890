"""Staged models: a ``LayeredModel`` trained block group by block group.

Stage ``s`` trains a group of consecutive blocks plus a small *stage head* on
its output; the blocks before it are frozen and the ones after it do not run.
``StagedModel`` holds the model's blocks, its head and the stage heads
(``stage_heads.<s>.weight`` / ``.bias``), so its state dict is the model's
state plus the stage heads.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fedlayer.models.base import LayeredModel, forward_blocks


@dataclass(frozen=True)
class StageSpec:
    """How blocks are grouped into stages."""

    num_blocks: int
    blocks_per_stage: int = 1

    @property
    def num_stages(self) -> int:
        return math.ceil(self.num_blocks / self.blocks_per_stage)

    def blocks(self, stage: int) -> range:
        """Indices of the blocks trained in ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {stage}")
        start = stage * self.blocks_per_stage
        return range(start, min(start + self.blocks_per_stage, self.num_blocks))

    def is_last(self, stage: int) -> bool:
        return stage == self.num_stages - 1


def stage_features(x: Tensor, pool: int) -> Tensor:
    """What a stage head sees: the block output average-pooled to ``pool`` x ``pool``
    (0: not pooled), flattened."""
    if pool > 0 and x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, pool)
    return torch.flatten(x, 1)


#: Stage heads: ``linear`` on the pooled block output, or ``conv`` (``ConvStageHead``).
STAGE_HEADS = ("linear", "conv")
#: The conv head's convolution runs on the block output pooled to at most this size.
CONV_HEAD_SIZE = 8


class ConvStageHead(nn.Module):
    """An auxiliary classifier with one convolution, as greedy layer-wise learning uses
    (Belilovsky et al. 2019, https://arxiv.org/abs/1812.11446).

    The block output is average-pooled to at most ``CONV_HEAD_SIZE`` x ``CONV_HEAD_SIZE``
    first, so the head's activations stay small next to the block's; then
    conv3x3 + BN + ReLU, pooling to ``pool`` x ``pool`` and a linear layer.
    """

    def __init__(self, shape: tuple[int, ...], pool: int, num_classes: int) -> None:
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"a conv stage head needs a (C, H, W) block output, got {shape}")
        channels, height, width = shape
        self.size = (min(height, CONV_HEAD_SIZE), min(width, CONV_HEAD_SIZE))
        self.pool = pool
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        features = stage_features(torch.zeros(1, channels, *self.size), pool).shape[1]
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(F.adaptive_avg_pool2d(x, self.size))))
        return self.fc(stage_features(x, self.pool))


class StagedModel(nn.Module):
    """A ``LayeredModel``'s blocks and head plus one stage head per non-final stage.

    Parameters
    ----------
    model : LayeredModel
        The configured model (its modules are shared, not copied).
    spec : StageSpec
        Block grouping.
    pool : int
        Spatial size stage heads pool block outputs to (0: flatten as is).
    seed : int
        Seeds the stage heads' initialisation (server and clients agree).
    checkpoint : bool
        Trained blocks recompute their inner activations in backward
        (``Block.forward_checkpointed``): a lower peak, the same result.
    head : str
        Kind of the stage heads (``STAGE_HEADS``).
    """

    def __init__(
        self, model: LayeredModel, spec: StageSpec, pool: int, seed: int, *, checkpoint: bool = False, head: str = "linear"
    ) -> None:
        super().__init__()
        if spec.num_blocks != len(model.blocks):
            raise ValueError(f"spec has {spec.num_blocks} blocks, model {len(model.blocks)}")
        if head not in STAGE_HEADS:
            raise ValueError(f"head must be one of {STAGE_HEADS}, got {head!r}")
        self.blocks = model.blocks
        self.head = model.head
        self.input_shape = model.input_shape
        self.spec = spec
        self.pool = pool
        self.checkpoint = checkpoint
        self.head_kind = head
        heads: list[nn.Module] = []
        with torch.random.fork_rng(devices=[]):  # leave the caller's stream (and CUDA's) alone
            torch.default_generator.manual_seed(seed)
            for stage in range(spec.num_stages - 1):
                shape = model.block_output_shape(spec.blocks(stage)[-1] + 1)
                if head == "conv":
                    heads.append(ConvStageHead(shape, pool, model.num_classes))
                else:
                    features = stage_features(torch.zeros(1, *shape), pool).shape[1]
                    heads.append(nn.Linear(features, model.num_classes))
        self.stage_heads = nn.ModuleList(heads)

    def stage_head(self, stage: int) -> nn.Module:
        """The head trained (and evaluated) in ``stage``."""
        return self.head if self.spec.is_last(stage) else self.stage_heads[stage]

    def active_modules(self, stage: int) -> list[nn.Module]:
        """The modules trained in ``stage``: its blocks and its head."""
        return [*(self.blocks[b] for b in self.spec.blocks(stage)), self.stage_head(stage)]

    def frozen_blocks(self, stage: int) -> range:
        return range(self.spec.blocks(stage).start)

    def prepare(self, stage: int) -> list[nn.Parameter]:
        """Freeze all but the stage's modules; returns the parameters to train."""
        self.eval()
        self.requires_grad_(False)
        params: list[nn.Parameter] = []
        for module in self.active_modules(stage):
            module.train()
            module.requires_grad_(True)
            params.extend(module.parameters())
        return params

    def sample_skips(self, stage: int, p_drop: float, generator: torch.Generator) -> set[int]:
        """Frozen, identity-compatible blocks to skip in one forward pass."""
        if p_drop <= 0.0:
            return set()
        candidates = [b for b in self.frozen_blocks(stage) if self.blocks[b].is_identity_compatible]
        draws = torch.rand(len(candidates), generator=generator)
        return {b for b, u in zip(candidates, draws.tolist()) if u < p_drop}

    def features(self, x: Tensor, stage: int, skip: Collection[int] = ()) -> Tensor:
        """Output of the stage's last block: frozen blocks forward-only, then the stage's blocks."""
        with torch.no_grad():
            x = forward_blocks(self.blocks, x, self.frozen_blocks(stage), skip=skip)
        return forward_blocks(self.blocks, x, self.spec.blocks(stage), checkpoint=self.checkpoint and torch.is_grad_enabled())

    def forward_stage(self, x: Tensor, stage: int, skip: Collection[int] = ()) -> Tensor:
        """Logits of the stage's head on the stage's features."""
        return self.stage_logits(self.features(x, stage, skip), stage)

    def stage_logits(self, z: Tensor, stage: int) -> Tensor:
        """The stage head applied to the output ``z`` of the stage's last block."""
        if self.spec.is_last(stage):
            return self.head(torch.flatten(z, 1))
        if self.head_kind == "conv":
            return self.stage_heads[stage](z)
        return self.stage_heads[stage](stage_features(z, self.pool))


@torch.no_grad()
def stage_step_flops(net: StagedModel) -> list[float]:
    """FLOPs of one training step of each stage, per example: the frozen prefix's
    forward plus forward and backward (3 forwards) of the stage's blocks and head.

    Counted by ``torch.utils.flop_counter`` (convolutions and matrix products)
    on one example in eval mode, so nothing the model holds changes.
    """
    modes = [module.training for module in net.modules()]
    net.eval()
    x = torch.zeros(1, *net.input_shape, device=next(net.parameters()).device)
    blocks, outputs = [], []
    for block in net.blocks:
        with FlopCounterMode(display=False) as counter:
            x = block(x)
        blocks.append(float(counter.get_total_flops()))
        outputs.append(x)
    steps = []
    for stage in range(net.spec.num_stages):
        trained = net.spec.blocks(stage)
        with FlopCounterMode(display=False) as counter:
            net.stage_logits(outputs[trained[-1]], stage)
        prefix = sum(blocks[: trained.start])
        steps.append(prefix + 3 * (sum(blocks[b] for b in trained) + float(counter.get_total_flops())))
    for module, mode in zip(net.modules(), modes):
        module.training = mode
    return steps


def stage_layer_names(spec: StageSpec, layer_names: list[str], stage: int) -> list[str]:
    """The layers (of ``layer_names``, in their order) trained in ``stage``:
    its blocks' and its head's."""
    head = "head." if spec.is_last(stage) else f"stage_heads.{stage}."
    prefixes = (*(f"blocks.{b}." for b in spec.blocks(stage)), head)
    return [name for name in layer_names if f"{name}.".startswith(prefixes)]


def frozen_layer_names(spec: StageSpec, layer_names: list[str], stage: int) -> list[str]:
    """The layers of the blocks frozen in ``stage`` (all blocks before it)."""
    prefixes = tuple(f"blocks.{b}." for b in range(spec.blocks(stage).start))
    return [name for name in layer_names if f"{name}.".startswith(prefixes)]
