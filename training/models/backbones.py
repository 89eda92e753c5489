"""The two backbones of the paper (appendix C), as plain CNNs mapping one input tensor to an
output tensor and the last hidden features.

Both take ``x`` of shape (B, in_channels, H, W) and return ``(out, features)`` with ``out`` of
shape (B, out_channels, H, W) (the output conv applied to the features) and ``features`` of shape
(B, width, H, W), the input of the output conv (what feature recurrence feeds back).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

BACKBONES = ("vdncnn", "vresnet")


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 convolution, padding 1, with bias (keeps H, W)."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class VDnCNN(nn.Module):
    """DnCNN-like stack of ``depth`` (10) 3x3 convs with a ReLU after each but the last:
    in -> width, (depth - 2) x width -> width, width -> out."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 64, depth: int = 10):
        super().__init__()
        layers = [conv3x3(in_channels, width), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [conv3x3(width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = conv3x3(width, out_channels)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.head(features), features


class ResBlock(nn.Module):
    """``x + conv2(relu(conv1(x)))`` with two width -> width 3x3 convs."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = conv3x3(width, width)
        self.conv2 = conv3x3(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class VResNet(nn.Module):
    """ResNet-like: input conv (in -> width, no activation), ``blocks`` (5) residual blocks,
    output conv (width -> out). The features are the last block's output."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 64, blocks: int = 5):
        super().__init__()
        self.tail = conv3x3(in_channels, width)
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.head = conv3x3(width, out_channels)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        features = self.body(self.tail(x))
        return self.head(features), features


def build_backbone(name: str, in_channels: int, out_channels: int, width: int, depth=None) -> nn.Module:
    """``VDnCNN`` or ``VResNet`` by name (one of ``BACKBONES``). ``depth``: the number of convs of
    VDnCNN (default 10; 3 is appendix G's tiny model with one internal conv) or of residual blocks
    of VResNet (default 5); None keeps the paper's."""
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                              or depth < (2 if name == "vdncnn" else 1)):
        raise ValueError(f"depth must be None or an int >= {2 if name == 'vdncnn' else 1} for {name}, got {depth!r}")
    if name == "vdncnn":
        return VDnCNN(in_channels, out_channels, width, **({} if depth is None else {"depth": depth}))
    if name == "vresnet":
        return VResNet(in_channels, out_channels, width, **({} if depth is None else {"blocks": depth}))
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
