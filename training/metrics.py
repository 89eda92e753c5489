"""Image-quality metrics: PSNR per frame, RGB or Y channel, with border crop.

Shapes: ``(..., C, H, W)`` in ``[0, 1]`` (data range 1). PSNR is ``10 log10(1 / MSE)``; it is
computed on the tensors as given, so callers clamp outputs first for reporting and do not
clamp them for the instability test (where PSNR < 0 means MSE > 1).
"""
from __future__ import annotations

import torch

_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)  # ITU-R BT.601, as in SR papers


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB in [0, 1]: ``(..., 3, H, W) -> (..., 1, H, W)``, in [16/255, 235/255]."""
    if x.shape[-3] != 3:
        raise ValueError(f"rgb_to_y needs 3 channels, got shape {tuple(x.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * w).sum(-3, keepdim=True) + 16.0 / 255.0


def psnr(output: torch.Tensor, target: torch.Tensor, *, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB per image: ``(..., C, H, W) -> (...)``; ``inf`` where the images are equal."""
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if y_channel:
        output, target = rgb_to_y(output), rgb_to_y(target)
    if crop_border:
        output = output[..., crop_border:-crop_border, crop_border:-crop_border]
        target = target[..., crop_border:-crop_border, crop_border:-crop_border]
    mse = (output.double() - target.double()).square().mean((-3, -2, -1))
    return 10.0 * torch.log10(1.0 / mse)
