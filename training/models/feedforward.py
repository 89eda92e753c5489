"""Feedforward comparisons (figure 2a), following the same step/state protocol (``recurrent`` is
False: the state depends on a bounded number of past frames). ``dampening`` multiplies their
state on use too, so 0 means "no temporal input" for every kind. State layouts:

- ``SingleFrame`` ("single"): the empty tuple ``()``; one frame in, one frame out.
- ``MultiFrame`` ("multi"): ``(x_{t-1}, x_{t-2})``, each (B, C, H, W) (zeros before the start);
  the input is ``cat([x_t, x_{t-1}, x_{t-2}])`` (causal, online).
- ``FeatureShift`` ("shift"): (B, width, H, W), the last hidden features the same network computes
  from frame t-1 *alone* (i.e. with a zero shifted-feature input), concatenated to the input at
  step t. Each step therefore runs the backbone twice: once on ``[x_t, h_{t-1}]`` for the
  output, once on ``[x_t, 0]`` for the next state ``h_t`` (never depends on earlier frames).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .base import VideoModel


class SingleFrame(VideoModel):
    kind = "single"

    def __init__(self, backbone: str, *, task: str, width: int, channels: int, dampening: float, depth=None):
        super().__init__(backbone, task=task, width=width, channels=channels, dampening=dampening, extra_in=0, depth=depth)

    def init_state(self, x_t: Tensor) -> Tuple[()]:
        return ()

    def _step(self, x_t: Tensor, state) -> Tuple[Tensor, Tuple[()]]:
        out, _ = self.net(x_t)
        return self._restore(x_t, out), ()


class MultiFrame(VideoModel):
    kind = "multi"

    def __init__(self, backbone: str, *, task: str, width: int, channels: int, dampening: float, depth=None):
        super().__init__(backbone, task=task, width=width, channels=channels, dampening=dampening,
                         extra_in=2 * channels, depth=depth)

    def init_state(self, x_t: Tensor) -> Tuple[Tensor, Tensor]:
        return (torch.zeros_like(x_t), torch.zeros_like(x_t))

    def _step(self, x_t: Tensor, state: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        prev1, prev2 = state
        out, _ = self.net(torch.cat([x_t, self._damp(prev1), self._damp(prev2)], dim=1))
        return self._restore(x_t, out), (x_t, prev1)


class FeatureShift(VideoModel):
    kind = "shift"

    def __init__(self, backbone: str, *, task: str, width: int, channels: int, dampening: float, depth=None):
        super().__init__(backbone, task=task, width=width, channels=channels, dampening=dampening, extra_in=width, depth=depth)

    def init_state(self, x_t: Tensor) -> Tensor:
        return self._zeros(x_t, self.width)

    def _step(self, x_t: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        out, _ = self.net(torch.cat([x_t, self._damp(state)], dim=1))
        _, features = self.net(torch.cat([x_t, self._zeros(x_t, self.width)], dim=1))
        return self._restore(x_t, out), features
