"""The three recurrences of the paper (section 3.1, appendix C). State layouts (undampened;
``dampening`` multiplies them on use):

- ``FeatRecurrent`` ("feat"): (B, width, H, W), the last hidden features of step t-1,
  concatenated to the input frame going into the first conv.
- ``FrameRecurrent`` ("frame"): (B, C, s*H, s*W), the previous output frame. For "sr2" it is
  brought back to input resolution by ``pixel_unshuffle(., 2)`` (space-to-depth, C*4 channels)
  before being concatenated to the input frame.
- ``RLSPRecurrent`` ("rlsp"): (B, state_channels, H, W), a latent produced by an extra 3x3 conv
  head (linear, no activation) on the last hidden features, concatenated to the next input.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones import conv3x3
from .base import VideoModel


class FeatRecurrent(VideoModel):
    kind, recurrent = "feat", True

    def __init__(self, backbone: str, *, task: str, width: int, channels: int, dampening: float, depth=None):
        super().__init__(backbone, task=task, width=width, channels=channels, dampening=dampening, extra_in=width, depth=depth)

    def init_state(self, x_t: Tensor) -> Tensor:
        return self._zeros(x_t, self.width)

    def _step(self, x_t: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        out, features = self.net(torch.cat([x_t, self._damp(state)], dim=1))
        return self._restore(x_t, out), features


class FrameRecurrent(VideoModel):
    kind, recurrent = "frame", True

    def __init__(self, backbone: str, *, task: str, width: int, channels: int, dampening: float, depth=None):
        scale = 2 if task == "sr2" else 1
        super().__init__(backbone, task=task, width=width, channels=channels, dampening=dampening,
                         extra_in=channels * scale * scale, depth=depth)

    def init_state(self, x_t: Tensor) -> Tensor:
        return self._zeros(x_t, self.channels, self.scale)

    def _step(self, x_t: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        previous = self._damp(state)
        if self.scale > 1:
            previous = F.pixel_unshuffle(previous, self.scale)
        out, _ = self.net(torch.cat([x_t, previous], dim=1))
        y = self._restore(x_t, out)
        return y, y


class RLSPRecurrent(VideoModel):
    kind, recurrent = "rlsp", True

    def __init__(self, backbone: str, *, task: str, width: int, channels: int, dampening: float, state_channels: int, depth=None):
        super().__init__(backbone, task=task, width=width, channels=channels, dampening=dampening,
                         extra_in=state_channels, depth=depth)
        self.state_channels = state_channels
        self.latent_head = conv3x3(width, state_channels)

    def init_state(self, x_t: Tensor) -> Tensor:
        return self._zeros(x_t, self.state_channels)

    def _step(self, x_t: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        out, features = self.net(torch.cat([x_t, self._damp(state)], dim=1))
        return self._restore(x_t, out), self.latent_head(features)
