"""Plain CNNs: the FedAvg paper's 2-conv CNN and FedLP's 6-conv CNN."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from fedlayer.models.base import Block, LayeredModel


class ConvPoolBlock(Block):
    """conv5x5 (padding 2) + ReLU + maxpool2: one stage of the FedAvg CNN."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=5, padding=2)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.conv(x)), 2)


class DoubleConvBlock(Block):
    """Two conv3x3+BN+ReLU layers then maxpool2: one stage of FedLP's CNN.

    The two convs stay separate modules (``conv1``/``bn1``, ``conv2``/``bn2``)
    so grouping state-dict keys by owning module sees every conv layer.
    Conv biases are omitted because the following BatchNorm cancels them.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, 2)


def _mlp_head(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(in_features, hidden),
            relu=nn.ReLU(),
            fc2=nn.Linear(hidden, num_classes),
        )
    )


class CNN(LayeredModel):
    """FedAvg CNN (McMahan et al. 2017): 1,663,370 parameters on 28x28x1, 10 classes.

    Two blocks (32 and 64 channels), head FC 512 + ReLU + FC. Any H and W
    divisible by 4 work; the head's input size follows from the dry run.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(input_shape, num_classes)
        channels, height, width = self.input_shape
        if height % 4 or width % 4:
            raise ValueError(
                f"cnn needs H and W divisible by 4 (e.g. 8, 28, 32), got {height}x{width}"
            )
        self.blocks = nn.ModuleList([ConvPoolBlock(channels, 32), ConvPoolBlock(32, 64)])
        c, h, w = self.block_output_shape(len(self.blocks))
        self.head = _mlp_head(c * h * w, 512, num_classes)


class CNN6(LayeredModel):
    """FedLP's 6-conv CNN for 32x32 inputs: three conv pairs (32, 64, 128) and FC 2048-128."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(input_shape, num_classes)
        channels, height, width = self.input_shape
        if (height, width) != (32, 32):
            raise ValueError(f"cnn6 needs 32x32 inputs (head expects 128*4*4), got {height}x{width}")
        self.blocks = nn.ModuleList(
            [DoubleConvBlock(channels, 32), DoubleConvBlock(32, 64), DoubleConvBlock(64, 128)]
        )
        self.head = _mlp_head(128 * 4 * 4, 128, num_classes)
