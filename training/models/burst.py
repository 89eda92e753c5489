"""Burst-by-burst inference (appendix E): reset the state every ``burst`` frames, optionally with
two overlapping states so that no output comes from the start of a burst."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor, nn


class Bursts(nn.Module):
    """``model`` run burst by burst, itself following the recurrent protocol.

    Without overlap, the inner state is reset to None at frames 0, burst, 2*burst, ... With
    overlap, state A is reset at frames k*burst and state B at frames burst//2 + k*burst (B starts
    at frame burst//2); both advance on every frame, and frame t is taken from the state that is
    further into its burst (A while B has not started). 0-indexed, burst=10: A on 0-9, B on
    10-14, A on 15-19, B on 20-24, ... (appendix E's "frames 1-10, 11-15, ..." in 1-indexed
    frames). The same model runs both states. State: ``(t, state_a, state_b)``; None starts at t=0.
    """

    def __init__(self, model: nn.Module, burst: int, overlap: bool = False) -> None:
        super().__init__()
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 2:
            raise ValueError(f"burst must be an int >= 2, got {burst!r}")
        self.model, self.burst, self.overlap = model, burst, bool(overlap)
        self.scale = getattr(model, "scale", 1)

    def step(self, x_t: Tensor, state=None):
        t, state_a, state_b = (0, None, None) if state is None else state
        half = self.burst // 2
        if t % self.burst == 0:
            state_a = None
        y_a, state_a = self.model.step(x_t, state_a)
        y = y_a
        if self.overlap and t >= half:
            if (t - half) % self.burst == 0:
                state_b = None
            y_b, state_b = self.model.step(x_t, state_b)
            y = y_a if t % self.burst > (t - half) % self.burst else y_b
        return y, (t + 1, state_a, state_b)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C, H, W)
        state, outputs = None, []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            outputs.append(y)
        return torch.stack(outputs, 1)


def run_bursts(model: nn.Module, frames_iter: Iterable[Tensor], burst: int, overlap: bool = False) -> Iterator[Tensor]:
    """Yield ``y_t`` (B, C, s*H, s*W) for each frame ``x_t`` (B, C, H, W) of ``frames_iter``,
    streaming (one frame in, one frame out; the video is never held); see ``Bursts``.
    Gradients follow the caller's grad mode (wrap in ``torch.no_grad()``)."""
    bursts, state = Bursts(model, burst, overlap), None
    for x_t in frames_iter:
        y, state = bursts.step(x_t, state)
        yield y
