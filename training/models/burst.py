"""Burst-by-burst inference (appendix E): reset the state every ``burst`` frames, optionally with
two overlapping states so that no output comes from the start of a burst."""
from __future__ import annotations

from typing import Iterable, Iterator

from torch import Tensor, nn


def run_bursts(model: nn.Module, frames_iter: Iterable[Tensor], burst: int, overlap: bool = False) -> Iterator[Tensor]:
    """Yield ``y_t`` (B, C, s*H, s*W) for each frame ``x_t`` (B, C, H, W) of ``frames_iter``,
    streaming (one frame in, one frame out; the video is never held).

    Without overlap, the state is reset to None at frames 0, burst, 2*burst, ... With overlap,
    state A is reset at frames k*burst and state B at frames burst//2 + k*burst (B starts at frame
    burst//2); both advance on every frame, and frame t is taken from the state that is further
    into its burst (A while B has not started). 0-indexed, burst=10: A on 0-9, B on 10-14, A on
    15-19, B on 20-24, ... (appendix E's "frames 1-10, 11-15, ..." in 1-indexed frames). The same
    model runs both states. Gradients follow the caller's grad mode (wrap in ``torch.no_grad()``).
    """
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 2:
        raise ValueError(f"burst must be an int >= 2, got {burst!r}")
    half = burst // 2
    state_a = state_b = None
    for t, x_t in enumerate(frames_iter):
        if t % burst == 0:
            state_a = None
        y_a, state_a = model.step(x_t, state_a)
        if not overlap or t < half:
            yield y_a
            continue
        if (t - half) % burst == 0:
            state_b = None
        y_b, state_b = model.step(x_t, state_b)
        yield y_a if t % burst > (t - half) % burst else y_b
