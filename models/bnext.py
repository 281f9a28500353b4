"""The BNext networks: BNext-T/S/M/L (``bnext.py``) and BNext-18 (``birealnet.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import BasicBlock, BNext18Block
from .fused_ops import batch_norm_prelu
from .layers import PReLU, frozen_prelu

STEMS = ("imagenet", "cifar")


class Stem(nn.Module):
    """Real-valued 3x3 stem, ``BN(Conv3x3(x))``, stride 2 on ImageNet and 1 on CIFAR.

    The official stem builds a PReLU but never calls it; it is kept (frozen) so
    that checkpoints load.
    """

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.prelu = frozen_prelu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In a CPU training step the batch norm is the fused kernel (models.fused_ops), else the module.
        return batch_norm_prelu(self.conv1(x), self.bn1, None, pooled=False)[0]


class _ClassifierNet(nn.Module):
    """Shared head of the BNext networks: ``PReLU -> GAP -> Linear`` (real-valued, no dropout)."""

    def _build_head(self, channels: int, num_classes: int) -> None:
        self.prelu = PReLU(channels)
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from a feature map."""
        return self.fc(torch.flatten(self.pool1(self.prelu(x)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def block_layout(channels: Sequence[int]) -> list[tuple[int, int, int, str]]:
    """The official rule turning a channel list into ``(in, out, stride, mode)`` per block.

    Block 1 is a stride-1 3x3 FFN; afterwards a block that changes the channel count
    (to anything but ``channels[1]``) has stride 2, and even-indexed blocks use
    ELM-attention (``"scale"``), odd-indexed ones the 3x3 FFN (``"bias"``).
    """
    layout = []
    for i in range(1, len(channels)):
        c_in, c_out = channels[i - 1], channels[i]
        if i == 1:
            layout.append((c_in, c_out, 1, "bias"))
            continue
        stride = 2 if c_in != c_out and c_out != channels[1] else 1
        layout.append((c_in, c_out, stride, "scale" if i % 2 == 0 else "bias"))
    return layout


class BNext(_ClassifierNet):
    """BNext-T/S/M/L: stem, BNext basic blocks, then ``PReLU -> GAP -> Linear``.

    ``channels[0]`` is the stem width and every further entry one block's output
    width (see :func:`block_layout`). The head has no dropout, as in the official code.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int = 1000,
        stem: str = "imagenet",
        elm_attention: bool = True,
        info_recoupling: bool = True,
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        self.num_classes = num_classes
        self.feature = nn.ModuleList([Stem(self.channels[0], 2 if stem == "imagenet" else 1)])
        for c_in, c_out, stride, mode in block_layout(self.channels):
            self.feature.append(BasicBlock(c_in, c_out, stride, mode, elm_attention, info_recoupling))
        self._build_head(self.channels[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before the head."""
        for block in self.feature:
            x = block(x)
        return x


class BNext18(_ClassifierNet):
    """BNext-18: ResNet-18 layout ``[2, 2, 2, 2]`` of BNext-18 blocks.

    ``channels`` are the four stage widths (official 64/128/256/512); the stem has
    the first stage's width. ImageNet stem: 7x7 stride-2 conv, BN, 3x3 max-pool;
    CIFAR stem: 3x3 stride-1 conv and BN. Neither applies an activation.
    """

    def __init__(self, channels: Sequence[int] = (64, 128, 256, 512), num_classes: int = 1000, stem: str = "imagenet"):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"BNext-18 has four stages; got {len(channels)} widths: {list(channels)}")
        self.channels = list(channels)
        self.num_classes = num_classes
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.channels[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, self.channels[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.channels[0])
        c_in = self.channels[0]
        for index, width in enumerate(self.channels):
            stride = 1 if index == 0 else 2
            self.add_module(
                f"layer{index}", nn.Sequential(BNext18Block(c_in, width, stride), BNext18Block(width, width))
            )
            c_in = width
        self._build_head(self.channels[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before the head."""
        x = self.maxpool(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(self.layer0(x))))
