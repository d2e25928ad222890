"""Softmax regression: no feature blocks, a single linear head."""

from __future__ import annotations

from collections import OrderedDict
from math import prod

from torch import nn

from fedlayer.models.base import LayeredModel


class LinearModel(LayeredModel):
    """Multinomial logistic regression on the flattened input."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(input_shape, num_classes)
        self.blocks = nn.ModuleList()
        self.head = nn.Sequential(OrderedDict(fc=nn.Linear(prod(self.input_shape), num_classes)))
