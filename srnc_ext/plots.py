"""PNG figures for the stability diagnostics (matplotlib, imported lazily, headless)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Sequence

import torch


def _plt():
    try:
        import matplotlib
    except ImportError as err:  # matplotlib is optional for the library
        raise ImportError("srnc_ext.plots needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image(x: torch.Tensor):
    """``(C, H, W)`` -> an array for imshow, non-finite values shown as 0."""
    x = torch.nan_to_num(x.detach().float().cpu(), 0.0, 0.0, 0.0).clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def trf_figure(result, path, every: int = 5) -> Path:
    """The paper's TRF layout: a row of times t (relative to the optimized output t = 0), the
    input X shown as its deviation from the initial random sequence (grey = unchanged), and the
    output Y, every ``every``-th frame."""
    plt = _plt()
    tau = result.tau
    frames = list(range(tau % every, result.X.shape[0], every))
    fig, axes = plt.subplots(2, len(frames), figsize=(1.1 * len(frames), 2.6), squeeze=False)
    deviation = 0.5 + 0.5 * (result.X - result.X_initial)
    for col, t in enumerate(frames):
        axes[0, col].imshow(_image(deviation[t]), cmap="gray", vmin=0, vmax=1)
        y = result.Y[t] if t < len(result.Y) else torch.zeros_like(result.X[t])  # a search stopped early
        axes[1, col].imshow(_image(y), cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(f"t={t - tau}", fontsize=7)
        for row in range(2):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    axes[0, 0].set_ylabel("X - X0", fontsize=8)
    axes[1, 0].set_ylabel("Y", fontsize=8)
    fig.suptitle(f"TRF: {result.verdict} (extent {result.extent} frames, output growth {result.growth:.3g})", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, path)


def influence_figure(result, path) -> Path:
    """``||dp/dx_t||_1`` against t (log scale), with the receptive-field threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    t = [i - result.tau for i in range(len(result.influence))]
    values = [float(v) if float(v) > 0 else float("nan") for v in result.influence]
    ax.semilogy(t, values, marker=".")
    peak = float(result.influence.max())
    if peak > 0 and math.isfinite(peak):
        ax.axhline(result.threshold * peak, ls="--", color="gray", label=f"threshold ({result.threshold:g} of max)")
        ax.legend(fontsize=8)
    ax.set_xlabel("frame t (t = 0: the optimized output)")
    ax.set_ylabel("influence ||dp/dx_t||_1")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, path)


def spectrum_figure(spectra: Dict[str, Sequence[float]], path) -> Path:
    """Average singular value spectra (each a decreasing curve over [0, 1])."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, curve in spectra.items():
        ax.plot([i / max(len(curve) - 1, 1) for i in range(len(curve))], list(curve), label=name)
    ax.set_xlabel("singular value index (fraction)")
    ax.set_ylabel("average singular value")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt, fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
