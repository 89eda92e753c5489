"""``python -m training.run reproduce [--only NAME,...]``: run the selected experiments (all six
by default) in a resumable folder and write ``reproduction.md``.

The folder's configuration is the preset's base (``experiments.BASES``) with ``--config`` and
``--set`` applied; a folder made with another configuration is refused, naming the key. The
report covers the selected experiments and every other experiment whose results are all cached in
the folder (e.g. a recipe search run earlier with ``--only recipe``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..config import Config, parse_overrides, read_config_file
from . import document
from .experiments import BASES, DEFAULT_EXPERIMENTS, EXPERIMENTS, RECIPE
from .runner import cached_record, run_entry
from .store import claim_folder, read_json, write_json

# figure 2b as the paper draws it: 50 random frames, Gaussian init with sigma 0.1 (width 64, the
# paper's; 32x32 frames)
FIG2B = {"default": dict(frames=50, size=32, width=64, init="normal"),
         "smoke": dict(frames=20, size=8, width=4, init="normal")}


def select(only: Optional[str]) -> List[str]:
    """Experiment names from ``--only`` (comma-separated), in the canonical order; ValueError
    listing the valid names for an unknown one."""
    if not only:
        return list(DEFAULT_EXPERIMENTS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise ValueError(f"unknown experiment(s) {unknown or names!r} for --only; valid: {', '.join(EXPERIMENTS)}")
    return [n for n in EXPERIMENTS if n in names]


def base_config(preset: str, config_file: Optional[str] = None, overrides: Optional[List[str]] = None) -> Dict:
    """The folder's base configuration: Config's defaults, the preset's base, a JSON file, ``--set``."""
    if preset not in BASES:
        raise ValueError(f"reproduce presets are {', '.join(BASES)}, got {preset!r}")
    values = {**Config().to_dict(), **BASES[preset]}
    if config_file:
        values.update(read_config_file(config_file))  # typed, one line naming the file on any problem
    values.update(parse_overrides(overrides))
    return Config(**values).validate().to_dict()


def _fig2b(folder: Path, preset: str, compute: bool) -> Optional[Dict]:
    from ..figures import output_norms

    path = folder / "fig2b" / "curves.json"
    data = read_json(path)
    if data is None and compute:
        start = time.perf_counter()
        data = {"curves": output_norms(**FIG2B[preset]), "settings": FIG2B[preset]}
        data["seconds"] = time.perf_counter() - start
        write_json(path, data)
    return data


def reproduce(folder, *, preset: str = "default", only: Optional[str] = None, config_file: Optional[str] = None,
              overrides: Optional[List[str]] = None, command: str = "python -m training.run reproduce",
              log: Callable[[str], None] = print, export_to: Optional[str] = None) -> Path:
    """Run the experiments of ``only`` (default: all six) in ``folder``; returns reproduction.md's path."""
    names = select(only)
    base = base_config(preset, config_file, overrides)
    folder = claim_folder(Path(folder), {"preset": preset, "base": base})
    timings = read_json(folder / "timings.json") or {}
    results: Dict[str, Dict] = {}
    for name, experiment in EXPERIMENTS.items():
        selected = name in names
        start, computed = time.perf_counter(), False
        if name == "fig2b":
            cached = (folder / "fig2b" / "curves.json").is_file()
            data = _fig2b(folder, preset, compute=selected)
            if data is not None:
                results[name] = data
                computed = selected and not cached
        else:
            entries = experiment.entries(preset)
            records = {}
            if selected:
                log(f"[{name}] {experiment.title}: {len(entries)} models")
            for i, entry in enumerate(entries, 1):
                if selected:
                    rec = run_entry(folder, base, entry, log)
                    document.rejudge_trf(rec)
                    computed |= not rec["cached"]
                    log(f"[{name}] {i}/{len(entries)} {entry.label}: {_summary(rec)}{' (cached)' if rec['cached'] else ''}")
                else:
                    rec = cached_record(folder, base, entry)
                    if rec is None:
                        break
                records[entry.label] = rec
            else:
                results[name] = document.enrich(folder, base, entries, records)
        if computed:
            timings[name] = time.perf_counter() - start
            write_json(folder / "timings.json", timings)
    experiments = [EXPERIMENTS[n] for n in EXPERIMENTS if n in results]
    path = document.write(folder, base=base, recipe=RECIPE, experiments=experiments, results=results,
                          command=command, date=time.strftime("%Y-%m-%d %H:%M %Z"), wall_seconds=timings,
                          preset=preset)
    log(f"report: {path}")
    if export_to:
        keys = [rec["key"] for name, recs in results.items() if name != "fig2b" for rec in recs.values()]
        log(f"exported: {export(folder, Path(export_to), keys)}")
    return path


def export(folder: Path, dest: Path, keys) -> Path:
    """Copy ``reproduction.md``, every file it links, the measurement records it was computed from
    (``measure/<key>.json`` for ``keys``) and the folder's configuration to ``dest`` (no
    checkpoints). A previous export there is replaced; any other non-empty ``dest`` is refused."""
    import re
    import shutil

    folder, dest = Path(folder), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        if not (dest / "reproduce.json").is_file():
            raise ValueError(f"--export {dest} is not empty and is not a previous export: choose another folder")
        shutil.rmtree(dest)
    text = (folder / "reproduction.md").read_text()
    files = {"reproduction.md", "reproduce.json", "timings.json"}
    files |= set(re.findall(r"\]\(([^)]+\.png)\)", text))
    files |= {f"measure/{key}.json" for key in keys}
    files |= {str(p.relative_to(folder)) for p in (folder / "fig2b").glob("*.json")}
    for name in sorted(files):
        if (folder / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, dest / name)
    return dest / "reproduction.md"


def _summary(rec: Dict) -> str:
    if rec["train"].get("diverged_at") is not None:
        return f"diverged in training at step {rec['train']['diverged_at']}"
    e, s, trf = rec["eval"], rec["instability"], rec["trf"]
    return (f"PSNR_T {e['psnr_T']:.2f} dB, {s['instabilities']}/{s['frames']} instabilities, max sigma_1 "
            f"{rec['sigma_max']:.3f}, TRF {trf['verdict']} (extent {trf['extent']})")
