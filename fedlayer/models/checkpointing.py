"""Activation checkpointing that leaves BatchNorm's running statistics as one forward pass would.

``torch.utils.checkpoint`` runs a segment's forward a second time in backward
to rebuild the activations it did not keep. That second forward would update
every BatchNorm running mean and variance in the segment again; restoring the
segment's buffers around it keeps training bitwise what it is without
checkpointing (the recomputed outputs already are: BatchNorm normalises with
the batch's own statistics in training mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def buffers_restored(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put the modules' buffers back to their values at entry on exit."""
    buffers = [buffer for module in modules for buffer in module.buffers()]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def checkpointed(segment: Callable[..., Tensor], modules: Sequence[nn.Module], *inputs: Tensor) -> Tensor:
    """``segment(*inputs)`` keeping only its inputs for backward, which recomputes the rest.

    ``modules``: the modules ``segment`` runs, whose buffers the recomputation must not change.
    """
    return checkpoint(
        segment, *inputs, use_reentrant=False, context_fn=lambda: (nullcontext(), buffers_restored(modules))
    )
