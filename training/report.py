"""The run report: metrics JSON, PNG plots (matplotlib, headless) and a short Markdown page."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_metrics(folder: Path, metrics: Dict) -> Path:
    """``metrics.json`` (``inf`` written as the string "inf")."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
        return value

    path = folder / "metrics.json"
    path.write_text(json.dumps(clean(metrics), indent=1))
    return path


def _save(fig, ax, path: Path, xlabel: str, ylabel: str) -> Path:
    plt = _plt()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_psnr_per_frame(folder: Path, results: Dict[str, Dict]) -> Path:
    fig, ax = _plt().subplots(figsize=(5, 3.2))
    for method, r in results.items():
        ax.plot(range(1, len(r["per_frame"]) + 1), r["per_frame"], marker="o", label=method)
    return _save(fig, ax, folder / "psnr_per_frame.png", "frame", "PSNR (dB)")


def plot_long_sequence(folder: Path, results: Dict[str, Dict]) -> Path:
    """PSNR per frame of the instability test, each onset marked with a star."""
    fig, ax = _plt().subplots(figsize=(7, 3.2))
    for method, r in results.items():
        trace = r["psnr_trace"]
        line, = ax.plot(range(1, len(trace) + 1), trace, lw=0.8, label=f"{method} ({r['instabilities']} instabilities)")
        position = 0
        for onset in r["onsets"]:
            position += onset
            ax.plot(position, trace[position - 1], "*", color=line.get_color(), ms=9)
    return _save(fig, ax, folder / "psnr_long_sequence.png", "frame", "PSNR (dB, clamped output)")


def plot_spectra(folder: Path, spectra: Dict[str, list], average: Dict[str, list]) -> Path:
    """Left: sigma_1 of each layer's true operator. Right: the average singular value spectrum
    (circular-padding FFT, as in the paper's Table 2)."""
    fig, (left, right) = _plt().subplots(1, 2, figsize=(9, 3.2))
    for method, rows in spectra.items():
        left.plot([r["sigma_max"] for r in rows], marker="o", label=method)
    left.set_xlabel("conv layer")
    left.set_ylabel("sigma_1 of the true operator")
    left.legend()
    left.grid(alpha=0.3)
    for method, curve in average.items():
        right.plot([i / (len(curve) - 1) for i in range(len(curve))], curve, label=method)
    return _save(fig, right, folder / "spectra.png", "singular value index (fraction)", "average singular value")


def write_report(folder: Path, config: Dict, metrics: Dict) -> Path:
    lines = [f"# Run report: {config['model']} ({config['task']})", "",
             f"Config: `config.json`. Methods: {', '.join(metrics['train'])}.", "",
             "| method | steps | last loss | train time (s) | PSNR_1 | PSNR_T | PSNR mean | instabilities | onset d1 | onset d9 | max sigma_1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, t in metrics["train"].items():
        e, s = metrics["eval"][method], metrics["instability"][method]
        sig = max(r["sigma_max"] for r in metrics["spectra"][method])
        lines.append(f"| {method} | {t['steps']} | {t['last_loss']:.5f} | {t['seconds']:.1f} | {e['psnr_1']:.2f} | "
                     f"{e['psnr_T']:.2f} | {e['mean']:.2f} | {s['instabilities']} / {s['frames']} | "
                     f"{s['onset_decile_1']} | {s['onset_decile_9']} | {sig:.3f} |")
    lines += ["", "PSNR on clamped outputs (RGB, data range 1); instabilities: raw-output PSNR below 0 or a "
              "non-finite output, after which the state is reset (section 3.1); onset deciles are `inf` when none.",
              "", "![PSNR per frame](psnr_per_frame.png)", "", "![PSNR over a long sequence](psnr_long_sequence.png)",
              "", "![spectra](spectra.png)", "",
              "Spectra: left, sigma_1 of each layer's true operator (its padding, exact or ARPACK); right, the "
              "singular value spectrum averaged over the stride-1 convolutions, computed as in the paper (FFT, "
              "i.e. with circular padding).", "",
              "## Temporal receptive field (section 2.2)", "",
              "| method | verdict | extent (frames before t=0) | output growth after t=0 | reason |",
              "|---|---|---|---|---|"]
    for method, r in metrics.get("trf", {}).items():
        lines.append(f"| {method} | {r['verdict']} | {r['extent']} of {r['tau']} | {r['growth']:.3g} | {r['reason']} |")
    for method in metrics.get("trf", {}):
        lines += ["", f"![TRF {method}](trf_{method}.png)", "", f"![influence {method}](influence_{method}.png)"]
    lines.append("")
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
