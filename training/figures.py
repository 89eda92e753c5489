"""Figure 2b of the paper: output norm against frame index for untrained models of every
architecture on random inputs (feedforward outputs stay bounded; recurrent ones may grow).

Initialization matters: with He initialization (Kaiming normal, ReLU gain, zero biases; the
default here) the recurrent VResNet models diverge within about ten frames while the
feedforward ones stay bounded, as in the paper's figure; with PyTorch's default initialization
the residual branches are so small that every curve is flat (both measured at width 16, 32x32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from .models import INITS, MODEL_NAMES, build_model


@torch.no_grad()
def output_norms(frames: int = 200, size: int = 32, width: int = 16, seed: int = 0, init: str = "he") -> Dict[str, List[float]]:
    """RMS of ``y_t`` for ``t = 1..frames`` for each untrained model (``init``: one of
    ``training.models.INITS``, seed ``seed``) on i.i.d. uniform random frames; ``inf`` once an
    output is not finite."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    curves = {}
    for name in MODEL_NAMES:
        torch.manual_seed(seed)
        model = build_model(name, width=width, init=init).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        state, norms = None, []
        for _ in range(frames):
            y, state = model.step(torch.rand(1, 3, size, size, generator=gen), state)
            rms = float(y.square().mean().sqrt())
            norms.append(rms if rms == rms and rms != float("inf") else float("inf"))
            if norms[-1] == float("inf"):
                norms += [float("inf")] * (frames - len(norms))
                break
        curves[name] = norms
    return curves


def plot_figure2b(curves: Dict[str, List[float]], path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, backbone in zip(axes, ("vdncnn", "vresnet")):
        for name, norms in curves.items():
            if name.startswith(backbone):
                finite = [v if v != float("inf") else float("nan") for v in norms]
                ax.plot(range(1, len(finite) + 1), finite, label=name.split("-", 1)[1])
        ax.set_yscale("log")
        ax.set_title(f"untrained {backbone}")
        ax.set_xlabel("frame")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("output RMS")
    fig.tight_layout()
    path = Path(path)
    from .report import save_figure

    save_figure(fig, path)
    plt.close(fig)
    return path
