"""A short end-to-end demo: train a small feature-recurrent denoiser with and without SRN-C,
then print the true spectra of its layers and how its output behaves on a long sequence.

Run: ``python -m srnc_ext.demo [--steps 200] [--width 16] [--seed 0]``. CPU, about a minute.
The training package (``python -m training.run``) will replace this script as the main job.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from . import convert, spectral


class FeatureRecurrentNet(nn.Module):
    """y_t, h_t = f(x_t, h_{t-1}): the previous features are concatenated to the input frame."""

    def __init__(self, width: int, depth: int = 4) -> None:
        super().__init__()
        self.width = width
        self.inp = nn.Conv2d(3 + width, width, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def step(self, x: torch.Tensor, state):
        if state is None:
            state = x.new_zeros(x.shape[0], self.width, *x.shape[-2:])
        h = torch.relu(self.inp(torch.cat([x, state], 1)))
        for conv in self.body:
            h = torch.relu(conv(h))
        return x + self.out(h), h

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W)
        state, outputs = None, []
        for t in range(frames.shape[1]):
            y, state = self.step(frames[:, t], state)
            outputs.append(y)
        return torch.stack(outputs, 1)


def moving_clips(batch: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images translated by one pixel per frame: (B, T, 3, size, size) in [0, 1]."""
    big = torch.rand(batch, 3, size // 4 + frames, size // 4 + frames, generator=generator)
    big = nn.functional.interpolate(big, scale_factor=4, mode="bilinear", align_corners=False)
    return torch.stack([big[..., t : t + size, t : t + size] for t in range(frames)], 1).clamp(0, 1)


def train(model: nn.Module, steps: int, generator: torch.Generator, sigma: float = 30 / 255) -> float:
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


@torch.no_grad()
def long_run_peak(model: FeatureRecurrentNet, frames: int, generator: torch.Generator) -> float:
    """Largest output RMS over ``frames`` frames of noise, streamed one frame at a time."""
    model.eval()
    state, peak = None, 0.0
    for _ in range(frames):
        y, state = model.step(torch.rand(1, 3, 32, 32, generator=generator), state)
        peak = max(peak, float(y.square().mean().sqrt()))
        if not math.isfinite(peak):
            break
    return peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per model (default 200)")
    parser.add_argument("--width", type=int, default=16, help="feature channels (default 16)")
    parser.add_argument("--alpha", type=float, default=1.0, help="SRN-C spectral norm (default 1.0)")
    parser.add_argument("--beta", type=float, default=1.0, help="SRN-C stable rank fraction (default 1.0)")
    parser.add_argument("--long-frames", type=int, default=300, help="frames of the long run (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    for name in ("plain", "srnc"):
        torch.manual_seed(args.seed)
        model = FeatureRecurrentNet(args.width)
        if name == "srnc":
            convert(model, alpha=args.alpha, beta=args.beta, input_size=32)
        start = time.perf_counter()
        psnr = train(model, args.steps, torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - start
        print(f"\n## {name}: {args.steps} steps in {seconds:.1f} s, last training PSNR {psnr:.2f} dB")
        rows = spectral.model_report(model, 32)
        print(spectral.format_report(rows))
        product = math.prod(r.sigma_max for r in rows if r.name.startswith(("inp", "body")))
        peak = long_run_peak(model, args.long_frames, torch.Generator().manual_seed(args.seed + 1))
        print(f"product of sigma_1 over the recurrent path: {product:.3f}; "
              f"peak output RMS over {args.long_frames} frames: {peak:.3f}")


if __name__ == "__main__":
    main()
