"""Models split into feature blocks and a head (see :mod:`fedlayer.models.base`)."""

from fedlayer.models.base import Block, LayeredModel
from fedlayer.models.registry import MODELS, build_model

__all__ = ["MODELS", "Block", "LayeredModel", "build_model"]
