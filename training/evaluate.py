"""Evaluation: PSNR per frame on clips, and the long-video instability test of section 3.1."""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .data import make_pair
from .metrics import psnr


@torch.no_grad()
def psnr_per_frame(model, clips, task: str, sigma: float, *, seed: int = 1, y_channel: bool = False,
                   crop_border: int = 0, device="cpu") -> Dict:
    """Mean PSNR of each frame position over ``clips`` (a dataset of ``(T, C, H, W)`` clips),
    on clamped outputs. Returns ``{"per_frame": [...], "psnr_1", "psnr_T", "mean"}``."""
    model.eval()
    totals: Optional[torch.Tensor] = None
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(clips)):
        degraded, target = make_pair(clips[i][None], task, sigma, gen)
        out = model(degraded.to(device)).clamp(0, 1).cpu()
        values = psnr(out, target, y_channel=y_channel, crop_border=crop_border)[0]  # (T,)
        totals = values if totals is None else totals + values
    per_frame = (totals / len(clips)).tolist()
    return {"per_frame": per_frame, "psnr_1": per_frame[0], "psnr_T": per_frame[-1],
            "mean": sum(per_frame) / len(per_frame)}


def _decile(values: List[int], q: float) -> float:
    if not values:
        return math.inf
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


@torch.no_grad()
def instability_test(model, frames: Iterable[torch.Tensor], degrade: Callable[[torch.Tensor], tuple],
                     *, device="cpu", record: bool = True) -> Dict:
    """Stream ``frames`` (each ``(C, H, W)`` clean) through ``model.step``; whenever the PSNR of
    the raw (unclamped) output is below 0 or the output is not finite, count an instability and
    reset the state. Returns the count, the onsets (frames since the last reset), their 1st and
    9th deciles (``inf`` when none) and, if ``record``, the PSNR of every frame (clamped output).
    """
    model.eval()
    state, since_reset, onsets, trace, n = None, 0, [], [], 0
    for clean in frames:
        degraded, target = degrade(clean[None])
        out, state = model.step(degraded.to(device), state)
        out = out.cpu()
        since_reset += 1
        n += 1
        raw = psnr(out, target)[0].item() if torch.isfinite(out).all() else -math.inf
        if record:
            trace.append(psnr(torch.nan_to_num(out, 0.0, 1.0, 0.0).clamp(0, 1), target)[0].item())
        if not raw >= 0:
            onsets.append(since_reset)
            state, since_reset = None, 0
    return {"frames": n, "instabilities": len(onsets), "onsets": onsets,
            "onset_decile_1": _decile(onsets, 0.1), "onset_decile_9": _decile(onsets, 0.9),
            "psnr_trace": trace}


def degrader(task: str, sigma: float, seed: int = 2):
    """``clean (1, C, H, W) -> (input, target)`` with a fixed noise stream."""
    gen = torch.Generator().manual_seed(seed)
    return lambda clean: make_pair(clean, task, sigma, gen)
