"""The run report: metrics JSON, PNG plots (matplotlib, headless) and a short Markdown page."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Dict

from .run_folder import write_bytes_atomic, write_text_atomic


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_metrics(folder: Path, metrics: Dict, name: str = "metrics.json") -> Path:
    """``metrics.json`` (or ``name``; ``inf`` written as the string "inf"), written whole."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
        return value

    return write_text_atomic(Path(folder) / name, json.dumps(clean(metrics), indent=1))


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, outside: bool = False) -> Path:
    plt = _plt()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if outside:  # many lines: the legend beside the axes, not over the data
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_figure(fig, path) -> Path:
    """A PNG written whole (a kill mid-write leaves the previous file, not half a new one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_bytes_atomic(path, buffer.getvalue())


def plot_psnr_per_frame(folder: Path, results: Dict[str, Dict]) -> Path:
    fig, ax = _plt().subplots(figsize=(5, 3.2))
    for method, r in results.items():
        ax.plot(range(1, len(r["per_frame"]) + 1), r["per_frame"], marker="o", label=method)
    return _save(fig, ax, folder / "psnr_per_frame.png", "frame", "PSNR (dB)")


def plot_long_sequence(folder: Path, results: Dict[str, Dict], name: str = "psnr_long_sequence.png") -> Path:
    """PSNR per frame of the instability test, each onset marked with a star."""
    many = len(results) > 4
    fig, ax = _plt().subplots(figsize=(10, 3.6) if many else (7, 3.2))
    if many:
        ax.set_prop_cycle(color=[_plt().get_cmap("tab20")(i) for i in range(20)])
    for method, r in results.items():
        trace = r["psnr_trace"]
        line, = ax.plot(range(1, len(trace) + 1), trace, lw=0.8, label=f"{method} ({r['instabilities']} instabilities)")
        position = 0
        for onset in r["onsets"]:
            position += onset
            ax.plot(position, trace[position - 1], "*", color=line.get_color(), ms=9)
    return _save(fig, ax, folder / name, "frame", "PSNR (dB, clamped output)", outside=many)


def plot_curves(path: Path, curves: Dict[str, list], xlabel: str, ylabel: str, log: bool = False) -> Path:
    """One line per ``(x, y)`` list (e.g. training loss against step)."""
    fig, ax = _plt().subplots(figsize=(6, 3.2))
    for name, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=0.8, label=name)
    if log:
        ax.set_yscale("log")
    return _save(fig, ax, path, xlabel, ylabel)


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


def _span(values) -> str:
    return f"{min(values):.3f}-{max(values):.3f} (mean {sum(values) / len(values):.3f})"


def summary_lines(metrics: Dict) -> list:
    """The report's three-line summary: which models are stable by which test, what stability
    cost in PSNR_T against the unconstrained model, and what the constraints' true sigma_1 is."""
    from .evaluate import stability_state

    groups = {"unstable": [], "stable": [], "undetermined": []}
    for spec, t in metrics["train"].items():
        if t.get("diverged_at") is not None:
            continue
        s, trf = metrics["instability"][spec], metrics["trf"][spec]
        groups[stability_state(s["instabilities"], trf["verdict"])].append(
            f"{spec} ({s['instabilities']}/{s['frames']} long-video instabilities, TRF {trf['verdict']})")
    diverged = [f"{spec} (step {t['diverged_at']})" for spec, t in metrics["train"].items()
                if t.get("diverged_at") is not None]
    first = ("1. **Stability.** Unstable (an unstable input was found): " + ("; ".join(groups["unstable"]) or "none")
             + ". Stable by both tests: " + ("; ".join(groups["stable"]) or "none") + "."
             + (" Undetermined (TRF inconclusive): " + "; ".join(groups["undetermined"]) + "." if groups["undetermined"] else "")
             + (" Diverged in training: " + ", ".join(diverged) + "." if diverged else ""))
    ev = metrics["eval"]
    if "none" in ev:
        costs = [f"{spec} {e['psnr_T']:.2f} dB ({e['psnr_T'] - ev['none']['psnr_T']:+.2f})" for spec, e in ev.items()
                 if spec != "none"]
        second = (f"2. **Cost.** PSNR_T (last frame, held-out clips): unconstrained {ev['none']['psnr_T']:.2f} dB; "
                  + "; ".join(costs) + "."
                  + (f" Mean over the frames: the degraded input itself {metrics['input_psnr']:.2f} dB, the "
                     f"unconstrained model {ev['none']['mean']:.2f} dB." if "input_psnr" in metrics else ""))
    else:
        second = "2. **Cost.** No unconstrained model in `methods` to compare with."
    sigmas = []
    for spec, rows in metrics["spectra"].items():
        asked = metrics.get("asked", {}).get(spec, {})
        if asked.get("method", spec) == "none":
            continue
        where = "on the reshaped kernel" if asked.get("method") in ("sn", "srn") else "on the true operator"
        sigmas.append(f"{spec} ({where}, asked {asked.get('alpha', float('nan')):g}): "
                      f"{_span([r['sigma_max'] for r in rows])}")
    third = ("3. **True sigma_1** of every conv layer's operator (exact / ARPACK): " + ("; ".join(sigmas) or "-") + "."
             + (" The reshaped-kernel constraints miss the sigma_1 they are asked for." if any(
                 metrics.get("asked", {}).get(k, {}).get("method") in ("sn", "srn") and
                 max(r["sigma_max"] for r in rows) > 1.05 * metrics["asked"][k]["alpha"]
                 for k, rows in metrics["spectra"].items()) else ""))
    return [first, second, third]


def write_report(folder: Path, config: Dict, metrics: Dict) -> Path:
    lines = [f"# Run report: {config['model']} ({config['task']})", ""] + summary_lines(metrics) + ["",
             f"Config: `config.json`. Methods: {', '.join(metrics['train'])}.", "",
             "| method | steps | last loss | train time (s) | PSNR_1 | PSNR_T | PSNR mean | instabilities | onset d1 | onset d9 | max sigma_1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, t in metrics["train"].items():
        if t.get("diverged_at") is not None:
            lines.append(f"| {method} | diverged at step {t['diverged_at']} (loss {t['last_loss']}) | | | | | | | | | |")
            continue
        e, s = metrics["eval"][method], metrics["instability"][method]
        sig = max(r["sigma_max"] for r in metrics["spectra"][method])
        lines.append(f"| {method} | {t['steps']} | {t['last_loss']:.5f} | {t['seconds']:.1f} | {e['psnr_1']:.2f} | "
                     f"{e['psnr_T']:.2f} | {e['mean']:.2f} | {s['instabilities']} / {s['frames']} | "
                     f"{s['onset_decile_1']} | {s['onset_decile_9']} | {sig:.3f} |")
    lines += ["", "PSNR on clamped outputs (RGB, data range 1); instabilities: raw-output PSNR below 0 or a "
              "non-finite output, after which the state is reset (section 3.1); onset deciles are `inf` when none. "
              "A model is unstable when either test finds an instability (each is a proof), stable when neither "
              "does.",
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
    write_text_atomic(path, "\n".join(lines))
    return path
