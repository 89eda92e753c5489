"""How far sigma_1 of the trained layers drifts from alpha, against n_power_iterations.

Trains a small feature-recurrent denoiser, ``training.models``' ``vdncnn-feat`` with 16 channels and
``depth=6`` (input conv, 4 hidden convs, output conv, ReLU after all but the last), with SRN-C on
32x32 crops of smooth random images moving one pixel per frame (batch 4, 5 frames, noise sigma
30/255, Adam lr 1e-3, 200 steps), and reports, per setting, the largest and the median of
sigma_1(W_eff) / alpha over its 6 layers, measured with ARPACK (tol 1e-8) on the final weights with
the vectors of the last refresh, as the next training forward would use them (the one-step lag
included), and after ``refresh(500)``. Run: ``python docs/measure_tracking.py`` (CPU, a few minutes).

``python docs/measure_tracking.py refresh_every``: the same for the amortized refresh
(``refresh_every`` k = 1, 2, 4, 8 at one power iteration), trained 199 steps so that the final
vectors are k - 1 steps old, the most the schedule allows.
"""
import sys
import math
import statistics
import time

import torch
import torch.nn.functional as F

from srnc_ext import SRNCConv2d, convert, spectral
from training.models import build_model


def moving_clips(batch: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images translated by one pixel per frame: (B, T, 3, size, size) in [0, 1]."""
    big = torch.rand(batch, 3, size // 4 + frames, size // 4 + frames, generator=generator)
    big = F.interpolate(big, scale_factor=4, mode="bilinear", align_corners=False)
    return torch.stack([big[..., t : t + size, t : t + size] for t in range(frames)], 1).clamp(0, 1)


def train(model: torch.nn.Module, steps: int, generator: torch.Generator, sigma: float = 30 / 255) -> float:
    """``steps`` Adam steps of denoising; returns the last training PSNR (dB)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        clean = moving_clips(4, 5, 32, generator)
        noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
        loss = (model(noisy) - clean).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 10 * math.log10(1 / loss.item())


def run(alpha, beta, n_iterations, steps=200, seed=0, refresh_every=1):
    torch.manual_seed(seed)
    model = build_model("vdncnn-feat", width=16, depth=6)
    convert(model, alpha=alpha, beta=beta, input_size=32, n_power_iterations=n_iterations, refresh_every=refresh_every)
    start = time.perf_counter()
    train(model, steps, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if isinstance(m, SRNCConv2d)]
    lagged = [spectral.spectral_norm(m, method="arpack") / alpha for m in layers]
    for m in layers:
        m.refresh(500)
    settled = [spectral.spectral_norm(m, method="arpack") / alpha for m in layers]
    return max(lagged), statistics.median(lagged), max(settled), seconds


def main():
    print("| alpha | beta | n_power_iterations | max sigma_1/alpha | median | after refresh(500): max | train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for alpha, beta in ((1.0, 1.0), (2.0, 0.1)):
        for n in (1, 2, 4, 8, 16):
            worst, median, settled, seconds = run(alpha, beta, n)
            print(f"| {alpha} | {beta} | {n} | {worst:.3f} | {median:.3f} | {settled:.4f} | {seconds:.1f} |")


def main_refresh_every():
    print("| alpha | beta | refresh_every | max sigma_1/alpha | median | after refresh(500): max | train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for alpha, beta in ((1.0, 1.0), (2.0, 0.1)):
        for every in (1, 2, 4, 8):
            worst, median, settled, seconds = run(alpha, beta, 1, steps=199, refresh_every=every)
            print(f"| {alpha} | {beta} | {every} | {worst:.3f} | {median:.3f} | {settled:.4f} | {seconds:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main_refresh_every() if sys.argv[1:] == ["refresh_every"] else main()
