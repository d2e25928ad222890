"""Peak training memory of one step: live tensor bytes, on any device.

On CPU there is no allocator statistic to read, so ``LiveTensorMeter`` counts
it directly. It is a ``TorchDispatchMode``: every tensor an operator creates
while the meter is active (forward, autograd's backward, the optimiser step)
has its storage registered with a weak reference, so the count rises when a
storage is created and falls the moment the last reference to it dies
(activations freed after their use in a no-grad forward, saved tensors freed
by ``backward``, gradients dropped by ``zero_grad``). Tensors that exist before
the step and that the step needs (parameters and buffers of the modules that
run, the input batch) are registered up front with ``track``. Storages are
counted once however many views share them. ``peak`` is the largest sum of
live bytes seen, i.e. what the step needs resident at its worst moment:
parameters + gradients + optimiser state + activations kept for backward +
temporaries.

On CUDA the allocator's own figure (``torch.cuda.max_memory_allocated``) is
reported next to it by ``measure_step``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

T = TypeVar("T")


class LiveTensorMeter(TorchDispatchMode):
    """Counts bytes of live tensor storages created inside it (plus tracked ones)."""

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that already exist (parameters, buffers, inputs)."""
        for tensor in tensors:
            self._see(tensor)

    def _see(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        ref = self._refs.get(key)
        if ref is not None and ref() is storage:
            # Known storage; an out= or resize_ op may have grown it.
            self.current += nbytes - self._sizes[key]
            self._sizes[key] = nbytes
        else:
            self._sizes[key] = nbytes
            self._refs[key] = weakref.ref(storage, lambda _, key=key: self._release(key))
            self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._see(leaf)
        return out


def resident_tensors(modules: Iterable[torch.nn.Module], *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Parameters and buffers of ``modules`` plus ``inputs``: what a step starts with."""
    tensors = list(inputs)
    for module in modules:
        tensors.extend(module.parameters())
        tensors.extend(module.buffers())
    return tensors


def measure_step(
    step: Callable[[], T], resident: Iterable[torch.Tensor], device: torch.device
) -> tuple[T, dict[str, float]]:
    """Run ``step`` once under the meter; returns its result and its peak memory.

    Keys: ``peak-train-memory-bytes`` (live tensor bytes, any device) and, on
    CUDA, ``cuda-peak-memory-bytes`` (``torch.cuda.max_memory_allocated``
    during the step, which also counts the allocator's rounding).
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    meter = LiveTensorMeter()
    meter.track(resident)
    with meter:
        out = step()
    result = {"peak-train-memory-bytes": float(meter.peak)}
    if cuda:
        torch.cuda.synchronize(device)
        result["cuda-peak-memory-bytes"] = float(torch.cuda.max_memory_allocated(device))
    return out, result
