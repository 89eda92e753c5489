"""What every model of the training package offers, on top of the recurrent step protocol that
``srnc_ext.diagnostics`` states and relies on (``model.step(x_t, state) -> (y_t, state)``, ``state=None``
the zero state; stated there once).

- ``step``: ``y_t`` is (B, C, s*H, s*W); ``state=None`` is ``model.init_state(x_t)``. A state is a
  tensor or a tuple of tensors (layouts per kind in ``recurrent.py`` / ``feedforward.py``).
- ``model(x)``: ``x`` (B, T, C, H, W) -> (B, T, C, s*H, s*W), exactly stepping frame by frame
  from ``state=None``.
- ``model.scale`` (1 for "denoise", 2 for "sr2"), ``model.recurrent`` (whether the state depends
  on all past inputs), ``model.name`` (e.g. "vresnet-feat"), ``model.kind``, ``model.task``.
- ``model.dampening`` (lambda in [0, 1], appendix F): multiplies the state fed back into the
  current step before use; 1 is the plain model, 0 switches the temporal input off. The stored
  state is never dampened. Settable after construction.

Tasks: "denoise" is residual, ``y = x + out``; "sr2" makes the output conv produce C*4 channels,
``y = pixel_shuffle(out, 2) + bilinear_upsample(x, 2)``.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import build_backbone

TASKS = {"denoise": 1, "sr2": 2}
State = Union[Tensor, Tuple[Tensor, ...]]


class VideoModel(nn.Module):
    """Base class: a backbone taking ``channels + extra_in`` input channels at input resolution."""

    kind = ""
    recurrent = False

    def __init__(self, backbone: str, *, task: str, width: int, channels: int, dampening: float, extra_in: int,
                 depth=None):
        super().__init__()
        self.task, self.scale, self.width, self.channels = task, TASKS[task], width, channels
        self.name = f"{backbone}-{self.kind}"
        self.net = build_backbone(backbone, channels + extra_in, channels * self.scale ** 2, width, depth)
        self.dampening = dampening

    @property
    def dampening(self) -> float:
        return self._dampening

    @dampening.setter
    def dampening(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
            raise ValueError(f"dampening must be a number in [0, 1], got {value!r}")
        self._dampening = float(value)

    def init_state(self, x_t: Tensor) -> State:
        """The zero initial state for a batch shaped like ``x_t`` (B, C, H, W)."""
        raise NotImplementedError

    def _step(self, x_t: Tensor, state: State) -> Tuple[Tensor, State]:
        raise NotImplementedError

    def step(self, x_t: Tensor, state: State = None) -> Tuple[Tensor, State]:
        """One frame: ``x_t`` (B, C, H, W) and the state -> ``(y_t, next state)``."""
        if x_t.dim() != 4 or x_t.shape[1] != self.channels:
            raise ValueError(f"x_t must be (B, {self.channels}, H, W), got {tuple(x_t.shape)}")
        if state is None:
            state = self.init_state(x_t)
        return self._step(x_t, state)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, T, C, H, W) -> (B, T, C, s*H, s*W), from the zero state."""
        if x.dim() != 5:
            raise ValueError(f"x must be (B, T, C, H, W), got {tuple(x.shape)}")
        state, outputs = None, []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            outputs.append(y)
        return torch.stack(outputs, dim=1)

    # helpers for subclasses
    def _zeros(self, x_t: Tensor, channels: int, scale: int = 1) -> Tensor:
        b, _, h, w = x_t.shape
        return x_t.new_zeros(b, channels, h * scale, w * scale)

    def _damp(self, state: Tensor) -> Tensor:
        return state if self._dampening == 1.0 else state * self._dampening

    def _restore(self, x_t: Tensor, out: Tensor) -> Tensor:
        """The backbone output (B, C*s*s, H, W) -> frame (B, C, s*H, s*W), with the input as skip."""
        if self.scale == 1:
            return x_t + out
        skip = F.interpolate(x_t, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return F.pixel_shuffle(out, self.scale) + skip

    def extra_repr(self) -> str:
        return f"name={self.name!r}, task={self.task!r}, width={self.width}, dampening={self._dampening}"
