"""Model names and the single constructor the rest of fedlayer uses."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from fedlayer.models.base import LayeredModel
from fedlayer.models.cnn import CNN, CNN6
from fedlayer.models.linear import LinearModel
from fedlayer.models.resnet import CifarResNet

_FACTORIES: dict[str, Callable[[tuple[int, int, int], int], LayeredModel]] = {
    "cnn": CNN,
    "cnn6": CNN6,
    "resnet20": partial(CifarResNet, depth=20),
    "resnet56": partial(CifarResNet, depth=56),
    "linear": LinearModel,
}
MODELS: tuple[str, ...] = tuple(_FACTORIES)


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int | None = None,
) -> LayeredModel:
    """Build model ``name``; with ``seed``, the initial weights depend on it alone.

    Server and clients build the same initial model from the same seed. The
    seed is applied inside a fork of the CPU RNG, so the caller's random
    stream is left as it was. Only the CPU generator is seeded (not
    ``torch.manual_seed``, which would also reseed CUDA generators that the
    fork does not restore): modules are initialised on the CPU.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if seed is None:
        return factory(input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return factory(input_shape, num_classes)
