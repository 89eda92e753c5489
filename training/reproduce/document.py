"""``reproduction.md`` and its figures, from the cached records of a reproduce folder.

Per experiment: a table in the paper's layout (PSNR_1/PSNR_T/mean, the long-video test with the
1st/9th deciles of the onsets, max and mean sigma_1 of the true operators, the TRF verdict, extent,
growth and tail rate, training time), the TRF strip of every model (t, X - X0, Y every 5th frame),
the averaged singular value spectra, PSNR over the long video with the onsets. At the top, the
claim table of ``claims.judge``. TRF verdicts are recomputed from the cached influence profiles
with the current rule of ``srnc_ext.diagnostics.trf_verdict``.
"""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import report
from .claims import NOT_RUN, VERDICTS, judge, stability
from .runner import entry_config, library_state, model_key

_INPUT_PSNR: Dict[str, float] = {}


def input_psnr(config) -> float:
    """The degraded input's own PSNR on ``config``'s held-out clips (``evaluate.input_psnr``), cached."""
    from .. import run
    from ..evaluate import input_psnr as measure

    key = json.dumps([config.task, config.sigma, config.crop, config.frames, config.channels, config.eval_clips,
                      config.seed])
    if key not in _INPUT_PSNR:
        _INPUT_PSNR[key] = measure(run._eval_clips(config), config.task, config.sigma / 255.0)
    return _INPUT_PSNR[key]


def rejudge_trf(record: Dict) -> None:
    """Recompute the TRF verdict of a cached record with the current rule."""
    from srnc_ext.diagnostics import trf_verdict

    trf = record.get("trf")
    if not trf:
        return
    settings = trf.get("settings", {})
    kwargs = {k: settings[k] for k in ("threshold", "growth_factor", "max_decay_rate") if k in settings}
    trf.update(trf_verdict(trf["influence"], trf["tau"], trf["growth"], trf.get("nonfinite_at"), **kwargs))


def enrich(folder: Path, base: Dict, entries, records: Dict[str, Dict]) -> Dict[str, Dict]:
    """Records keyed by label, with ``input_psnr``, ``loss_curve`` and the TRF verdict of today's rule."""
    out = {}
    for entry in entries:
        rec = records.get(entry.label)
        if rec is None:
            continue
        rec = dict(rec)
        config = entry_config(base, entry)
        rec["input_psnr"] = input_psnr(config)
        log = folder / "models" / model_key(config, entry) / "log.jsonl"
        rec["loss_curve"] = ([(r["step"], r["loss"]) for r in map(json.loads, log.read_text().splitlines())]
                             if log.is_file() else [])
        rejudge_trf(rec)
        out[entry.label] = rec
    return out


def _library_states(results: Dict[str, Dict]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for name, recs in results.items():
        if name == "fig2b":
            continue
        for rec in recs.values():
            state = rec.get("library", "not recorded")
            counts[state] = counts.get(state, 0) + 1
    return counts


def _fmt(value, spec=".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _rel(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder)).replace("\\", "/")


def experiment_table(records: Dict[str, Dict]) -> List[str]:
    lines = ["| model | PSNR_1 | PSNR_T | PSNR mean | input PSNR | instabilities | onsets d1-d9 | max sigma_1 | "
             "mean sigma_1 | TRF | extent | growth | tail rate | stability | train (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, rec in records.items():
        t = rec["train"]
        if t.get("diverged_at") is not None:
            lines.append(f"| {label} | diverged at step {t['diverged_at']} (loss {t['last_loss']}) | | | "
                         f"{rec['input_psnr']:.2f} | | | | | | | | | diverged | {t['seconds']:.0f} |")
            continue
        e, s, trf = rec["eval"], rec["instability"], rec["trf"]
        state, _ = stability(rec)
        lines.append(
            f"| {label} | {e['psnr_1']:.2f} | {e['psnr_T']:.2f} | {e['mean']:.2f} | {rec['input_psnr']:.2f} | "
            f"{s['instabilities']} / {s['frames']} | {_fmt(s['onset_decile_1'], 'g')}-{_fmt(s['onset_decile_9'], 'g')} | "
            f"{rec['sigma_max']:.3f} | {rec['sigma_mean']:.3f} | {trf['verdict']} | {trf['extent']} / {trf['tau']} | "
            f"{_fmt(trf['growth'], '.3g')} | {_fmt(trf.get('tail_rate'), '.3f')} | {state} | {t['seconds']:.0f} |")
    return lines


def experiment_figures(folder: Path, name: str, records: Dict[str, Dict]) -> List[str]:
    """Spectra, long-video PSNR and TRF strips of one experiment; returns Markdown lines."""
    from srnc_ext import plots

    live = {k: r for k, r in records.items() if r["train"].get("diverged_at") is None}
    if not live:
        return []
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    spectra = plots.spectrum_figure({k: r["average_spectrum"] for k, r in live.items()}, out / "spectra.png")
    long_video = report.plot_long_sequence(out, {k: r["instability"] for k, r in live.items()}, name="long_video.png")
    lines += [f"![averaged singular value spectra]({_rel(spectra, folder)})", "",
              f"![PSNR over the long video, onsets starred]({_rel(long_video, folder)})", ""]
    if name == "appendixG":
        curves = report.plot_curves(out / "training_curves.png", {k: r["loss_curve"] for k, r in records.items()},
                                    "step", "training loss (MSE)", log=True)
        lines += [f"![training curves]({_rel(curves, folder)})", ""]
    lines += ["TRF of each model (t, X - X0, Y every 5th frame; the paper's layout):", ""]
    for label, rec in live.items():
        lines += [f"{label}: ![TRF {label}](measure/trf_{rec['key']}.png)", ""]
    return lines


def fig2b_section(folder: Path, data: Dict) -> List[str]:
    from ..figures import plot_figure2b

    path = plot_figure2b(data["curves"], folder / "fig2b" / "figure2b.png")
    settings = data.get("settings", {})
    rows = [f"Untrained models (`training.figures.output_norms`, {json.dumps(settings)}): output RMS on i.i.d. "
            "uniform random frames.", "", "| model | RMS frame 1 | RMS frame 10 | RMS last frame |", "|---|---|---|---|"]
    for name, rms in data["curves"].items():
        rows.append(f"| {name} | {_fmt(rms[0], '.3g')} | {_fmt(rms[min(9, len(rms) - 1)], '.3g')} | "
                    f"{_fmt(rms[-1], '.3g')} |")
    return rows + ["", f"![figure 2b]({_rel(path, folder)})", ""]


def recipe_section(records: Dict[str, Dict], levers) -> List[str]:
    """The recipe search table: lever by lever, every method with its numbers."""
    why = {name: reason for name, _, reason in levers}
    lines = ["| lever (one change from the baseline) | why | model | PSNR mean | PSNR_T | max sigma_1 | "
             "instabilities | onsets d1-d9 | TRF (extent, growth) | unstable by both | train (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    from .claims import unstable_by_both

    previous = None
    for label, rec in records.items():
        lever, _, method = label.partition(" | ")
        head = f"`{lever}` | {why.get(lever, '')}" if lever != previous else " | "
        previous = lever
        t = rec["train"]
        if t.get("diverged_at") is not None:
            lines.append(f"| {head} | {method} | diverged at step {t['diverged_at']} | | | | | | | {t['seconds']:.0f} |")
            continue
        e, s, trf = rec["eval"], rec["instability"], rec["trf"]
        lines.append(f"| {head} | {method} | {e['mean']:.2f} | {e['psnr_T']:.2f} | "
                     f"{rec['sigma_max']:.3f} | {s['instabilities']} / {s['frames']} | "
                     f"{_fmt(s['onset_decile_1'], 'g')}-{_fmt(s['onset_decile_9'], 'g')} | "
                     f"{trf['verdict']} ({trf['extent']}, {_fmt(trf['growth'], '.3g')}) | "
                     f"{'yes' if unstable_by_both(rec) else 'no'} | {t['seconds']:.0f} |")
    return lines


def compute_seconds(records: Dict[str, Dict]) -> float:
    """Training plus measurement seconds of an experiment's records (shared models counted in full)."""
    return sum(r["train"]["seconds"] + r.get("measure_seconds", 0.0) for r in records.values())


def write(folder: Path, *, base: Dict, recipe: Dict, experiments, results: Dict[str, Dict], command: str,
          date: str, wall_seconds: Dict[str, float], preset: str, claim_rows: Optional[list] = None) -> Path:
    """Write ``reproduction.md``; ``results``: experiment -> {label: enriched record} (fig2b: its data)."""
    from .experiments import LEVERS

    rows = judge(results) if claim_rows is None else claim_rows
    counts = {v: sum(1 for r in rows if r[2] == v) for v in VERDICTS + (NOT_RUN,)}
    lines = ["# The paper's stability claims at CPU scale", "",
             "Tanay et al., \"Diagnosing and Preventing Instabilities in Recurrent Video Processing\".", "",
             f"- Command: `{command}`", f"- Date: {date}",
             f"- Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"Python {platform.python_version()}",
             f"- Library when this report was written: {library_state()}; when the records were measured: "
             + "; ".join(f"{state} ({n} records)" for state, n in _library_states(results).items()),
             f"- Preset `{preset}`; base configuration (on top of `training.config.Config`): "
             f"`{json.dumps({k: v for k, v in base.items() if k in ('width', 'crop', 'frames', 'batch', 'lr', 'schedule', 'long_frames', 'trf_frames', 'trf_size', 'trf_iters', 'eval_clips', 'sigma', 'seed')})}`",
             f"- Training recipe of the paper experiments: `{json.dumps(recipe)}` (picked by the recipe search below)",
             "- Verdicts: " + ", ".join(f"{v}: {n}" for v, n in counts.items() if n), "",
             "## Claims", "",
             "Every verdict is computed from the numbers below by `training/reproduce/claims.py` (definitions in "
             "its docstring): *unstable* = the long-video test counted an instability or the TRF verdict is "
             "unstable (each is a proof); *stable* = neither; a model whose mean PSNR is not above its degraded "
             "input's PSNR has not learned its task, and claims about it are not testable at this scale.", "",
             "| # | claim (paper) | where | paper | measured here | verdict | why |", "|---|---|---|---|---|---|---|"]
    for i, (claim, measured, verdict, reason) in enumerate(rows, 1):
        lines.append(f"| {i} | {claim.quote} | {claim.source} | {claim.paper} | {measured} | **{verdict}** | {reason} |")
    lines += ["", "## Time", "",
              "| experiment | training + measurement, all its models (s) | wall time of the last run that computed "
              "something (s) |", "|---|---|---|"]
    for exp in experiments:
        recs = results.get(exp.name)
        if recs is None:
            continue
        cost = recs.get("seconds", 0.0) if exp.name == "fig2b" else compute_seconds(recs)
        lines.append(f"| {exp.name} | {cost:.0f} | {_fmt(wall_seconds.get(exp.name), '.0f')} |")
    lines.append("")
    for exp in experiments:
        recs = results.get(exp.name)
        if recs is None:
            continue
        lines += [f"## {exp.title}", "", f"Paper: {exp.source}.", ""]
        if exp.name == "fig2b":
            lines += fig2b_section(folder, recs)
        elif exp.name == "recipe":
            from .claims import pick_recipe
            from .experiments import BASELINE

            lever, why = pick_recipe(recs, LEVERS, BASELINE["steps"])
            change = dict(next((c for n, c, _ in LEVERS if n == lever), {}))
            matches = {**BASELINE, **change} == recipe
            lines += recipe_section(recs, LEVERS) + [
                "", f"The recipe rule (`claims.pick_recipe`: among the levers affordable for a whole experiment, "
                f"at most {BASELINE['steps']} steps, first an unstable trained unconstrained model, then SRN-C 2-1 "
                f"within 1 dB of it, then the best SRN-C 2-1) picks **{lever}** ({why}); "
                + ("the paper experiments above use it." if matches else
                   f"**the paper experiments above use another recipe** (`{json.dumps(recipe)}`)."), "",
                "The search's models are cached in the folder like the others (figures are left out here)."]
        else:
            lines += experiment_table(recs) + [""] + experiment_figures(folder, exp.name, recs)
    path = folder / "reproduction.md"
    from .store import write_text

    write_text(path, "\n".join(lines) + "\n")
    return path
