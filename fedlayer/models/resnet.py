"""ResNet-20 and ResNet-56 for CIFAR-sized inputs (He et al. 2016, section 4.2)."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from fedlayer.models.base import Block, LayeredModel
from fedlayer.models.checkpointing import checkpointed

_STAGE_CHANNELS = (16, 32, 64)


class Stem(Block):
    """conv3x3(16) + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(Block):
    """Two conv3x3+BN with a residual connection.

    Where the shape changes (stride 2 or new channel count) the shortcut is a
    1x1 conv + BN projection; otherwise it is the identity and the block is
    identity-compatible, i.e. depth dropout may skip it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.is_identity_compatible = stride == 1 and in_channels == out_channels
        self.shortcut = (
            nn.Identity()
            if self.is_identity_compatible
            else nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(
                        in_channels, out_channels, kernel_size=1, stride=stride, bias=False
                    ),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def forward_checkpointed(self, x: Tensor) -> Tensor:
        """Each conv + BN pair checkpointed: neither convolution's output is kept for backward.

        The ReLUs stay outside the segments: their outputs are kept anyway (as
        the next convolution's input and the block's output), and recomputing
        them would hold a second copy during backward (measured: 8.2 MB against
        11.4 MB at 16x28x28, batch 32; see benchmarks/README.md).
        """
        out = F.relu(checkpointed(self._conv_bn1, [self.bn1], x))
        out = checkpointed(self._conv_bn2, [self.bn2], out)
        return F.relu(out + self.shortcut(x))

    def _conv_bn1(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv1(x))

    def _conv_bn2(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(x))


class GlobalAvgPool(nn.Module):
    """Mean over spatial positions, accepting (N, C, H, W) or its flattening (N, C*H*W).

    The head receives the flattened last-block output (the LayeredModel
    convention); flattening is channel-major, so viewing it as (N, C, H*W)
    recovers the per-channel spatial values without knowing H and W.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.channels, -1).mean(dim=2)


class CifarResNet(LayeredModel):
    """CIFAR ResNet of depth ``6n + 2``: stem, then ``3n`` BasicBlocks as separate blocks;
    head = avg pool + FC. ResNet-20 has n = 3 (10 blocks), ResNet-56 n = 9 (28 blocks).

    Global average pooling makes any input size work (28x28 and 32x32 in practice).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, depth: int = 20) -> None:
        super().__init__(input_shape, num_classes)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, ...), got {depth}")
        blocks: list[Block] = [Stem(self.input_shape[0], _STAGE_CHANNELS[0])]
        in_channels = _STAGE_CHANNELS[0]
        for stage, out_channels in enumerate(_STAGE_CHANNELS):
            for index in range((depth - 2) // 6):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            OrderedDict(
                pool=GlobalAvgPool(in_channels),
                fc=nn.Linear(in_channels, num_classes),
            )
        )
