"""Evaluation: PSNR per frame on clips, and the long-video instability test of section 3.1."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from srnc_ext import diagnostics

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


@torch.no_grad()
def input_psnr(clips, task: str, sigma: float, *, seed: int = 1) -> float:
    """Mean PSNR of the degraded input itself over ``clips`` (clamped; bilinearly upsampled for
    "sr2"), with the noise stream ``psnr_per_frame`` uses: what a model that learned nothing scores."""
    gen, values = torch.Generator().manual_seed(seed), []
    for i in range(len(clips)):
        degraded, target = make_pair(clips[i][None], task, sigma, gen)
        if task == "sr2":
            b, t = degraded.shape[:2]
            degraded = torch.nn.functional.interpolate(degraded.flatten(0, 1), scale_factor=2, mode="bilinear",
                                                       align_corners=False).unflatten(0, (b, t))
        values.append(psnr(degraded.clamp(0, 1), target).mean())
    return float(torch.stack(values).mean())


# The long-video test lives in the library (any recurrent model can use it).
instability_test = diagnostics.instability_onsets


def stability_state(instabilities: int, trf_verdict: str) -> str:
    """Both stability tests together: "unstable" when either found an instability (a long-video
    instability or an unstable TRF: each is a proof), "stable" when neither did (0 instabilities
    and TRF "no instability found"), "undetermined" otherwise (an inconclusive TRF)."""
    if instabilities > 0 or trf_verdict == "unstable":
        return "unstable"
    return "stable" if trf_verdict == "no instability found" else "undetermined"


def degrader(task: str, sigma: float, seed: int = 2):
    """``clean (1, C, H, W) -> (input, target)`` with a fixed noise stream."""
    gen = torch.Generator().manual_seed(seed)
    return lambda clean: make_pair(clean, task, sigma, gen)
