"""Degradations turning clean frames into network inputs (paper, Sec. 3.1 and 4.4).

All functions take tensors of shape ``(..., C, H, W)`` with arbitrary leading dimensions
(e.g. ``(B, T, C, H, W)``), values in [0, 1].
"""
import torch
import torch.nn.functional as F

SIGMA = 30 / 255  # the paper's Gaussian noise level, sigma = 30 on the 0-255 scale
TASKS = ("denoise", "sr2")


def add_noise(clean, sigma=SIGMA, generator=None):
    """Additive white Gaussian noise of std ``sigma`` (on [0, 1] data); the result is not clamped.

    clean: (..., C, H, W) -> noisy: same shape and dtype.
    """
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=clean.device)
    return clean + sigma * noise


def bicubic_downsample(x, factor=2):
    """Antialiased bicubic downsampling by an integer ``factor``, clamped to [0, 1].

    x: (..., C, H, W) with H, W divisible by ``factor`` -> (..., C, H // factor, W // factor).
    """
    *lead, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"bicubic_downsample: spatial size {h}x{w} is not divisible by {factor}")
    y = F.interpolate(x.reshape(-1, c, h, w), size=(h // factor, w // factor), mode="bicubic",
                      align_corners=False, antialias=True)
    return y.clamp_(0, 1).reshape(*lead, c, h // factor, w // factor)


def make_pair(clean, task="denoise", sigma=SIGMA, generator=None):
    """Return ``(degraded_input, target)`` for ``task``.

    "denoise": (add_noise(clean), clean), both (..., C, H, W);
    "sr2": (bicubic_downsample(clean, 2), clean), input (..., C, H/2, W/2), target (..., C, H, W).
    """
    if task == "denoise":
        return add_noise(clean, sigma, generator), clean
    if task == "sr2":
        return bicubic_downsample(clean, 2), clean
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
