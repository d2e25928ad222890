"""The block/head convention every fedlayer model follows.

A model is a sequence of feature ``blocks`` followed by a ``head``. Layer-wise
training trains block prefixes, FedLP prunes block suffixes and depth dropout
swaps shape-preserving blocks for identity, so all of them need the model cut
at the same, explicit places instead of guessing from ``named_children``.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """One feature block of a :class:`LayeredModel`.

    ``is_identity_compatible`` is True only when the block's output shape
    always equals its input shape, so depth dropout may replace it by identity.
    """

    is_identity_compatible: bool = False

    def forward_checkpointed(self, x: Tensor) -> Tensor:
        """``forward`` recomputing inner activations in backward instead of keeping them.

        A block whose forward is a single segment keeps nothing it would not
        recompute, so by default this is ``forward``; blocks with inner
        segments override it (``BasicBlock``).
        """
        return self(x)


def forward_blocks(
    blocks: Sequence[nn.Module], x: Tensor, indices: Iterable[int], *, skip: Collection[int] = (), checkpoint: bool = False
) -> Tensor:
    """``x`` through ``blocks[i]`` for each ``i`` of ``indices`` in order, the one block-prefix forward
    of every model view (``LayeredModel``, FedLP's ``DepthNet``, FLL's ``StagedModel``).

    ``skip``: blocks left out (depth dropout); ``checkpoint``: each block recomputes its inner
    activations in backward (``Block.forward_checkpointed``).
    """
    for i in indices:
        if i not in skip:
            x = blocks[i].forward_checkpointed(x) if checkpoint else blocks[i](x)
    return x


def validate_input_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return ``input_shape`` as a (C, H, W) tuple of positive ints or raise ValueError."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive ints, got {input_shape!r}")
    return shape  # type: ignore[return-value]


class LayeredModel(nn.Module):
    """Base class: ``forward(x) = head(flatten(blocks(x)))``.

    Subclasses assign ``self.blocks`` (an ``nn.ModuleList`` of :class:`Block`)
    and then ``self.head``, which takes the flattened output of the last block.
    """

    blocks: nn.ModuleList
    head: nn.Module

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.input_shape = validate_input_shape(input_shape)
        self.num_classes = num_classes

    def forward_features(self, x: Tensor, upto: int) -> Tensor:
        """Output of the first ``upto`` blocks (``upto=0`` returns ``x``)."""
        if not 0 <= upto <= len(self.blocks):
            raise ValueError(f"upto must be in [0, {len(self.blocks)}], got {upto}")
        return forward_blocks(self.blocks, x, range(upto))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.forward_features(x, len(self.blocks)), 1))

    @torch.no_grad()
    def block_output_shape(self, upto: int) -> tuple[int, ...]:
        """(C, H, W) after the first ``upto`` blocks, from a dry run on zeros.

        The dry run is done in eval mode so that BatchNorm running statistics
        are left untouched; each module's own train/eval flag is restored.
        """
        reference = next(itertools.chain(self.parameters(), self.buffers()), None)
        kwargs = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            out = self.forward_features(torch.zeros(1, *self.input_shape, **kwargs), upto)
        finally:
            for module, training in modes.items():
                module.training = training
        return tuple(out.shape[1:])
