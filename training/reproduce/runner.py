"""Train and measure one model of an experiment, with every result cached in the reproduce folder.

An ``Entry`` is one row of a paper table: a label, a constraint method, the config keys its
training uses (``train``) and the inference-time keys its measurement uses (``infer``: dampening,
burst-by-burst). Models are keyed by a hash of their full training configuration and method, so
two experiments that need the same model (table 2's and table 3's unconstrained VResNet-feat)
train it once. Layout of a folder:

    models/<method>-<model>-<hash>/   checkpoint.pt, log.jsonl/csv, train.json (the summary, or
                                      the step at which the loss became non-finite)
    measure/<model key>-<hash>.json, trf_<...>.png, influence_<...>.png

A rerun skips every model whose ``train.json`` exists and every measurement whose JSON exists; a
model interrupted mid-training resumes from its last checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

from ..config import Config
from ..train import TrainingDiverged, load_trained, train
from .store import read_json, write_json

INFER_KEYS = ("dampening", "burst", "burst_overlap")


@dataclass(frozen=True)
class Entry:
    """One model of an experiment: ``label`` (as in the paper's table), ``method`` (a constraint of
    ``training.constraints.METHODS``), ``train`` (config keys for training, on top of the
    experiment's base) and ``infer`` (``INFER_KEYS`` applied to the trained model at measurement)."""

    label: str
    method: str
    train: Dict = field(default_factory=dict)
    infer: Dict = field(default_factory=dict)

    def __post_init__(self):
        bad = sorted(set(self.infer) - set(INFER_KEYS))
        if bad:
            raise ValueError(f"entry {self.label!r}: infer keys must be among {INFER_KEYS}, got {bad}")


@functools.lru_cache(maxsize=1)
def library_state() -> str:
    """The git commit of the checkout and whether ``srnc_ext`` (its C++ sources included) had uncommitted changes,
    read once per process (the process runs the library it imported; read-only git calls;
    "unknown" outside a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "srnc_ext"], cwd=root, capture_output=True,
                              timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    if not diff:
        return f"commit {head}"
    return f"commit {head} with uncommitted changes to srnc_ext (diff sha1 {hashlib.sha1(diff).hexdigest()[:10]})"


def entry_config(base: Dict, entry: Entry, measure: bool = False) -> Config:
    """The validated config of ``entry``: ``base`` with its training keys (and, if ``measure``,
    its inference keys) applied."""
    values = {**base, **entry.train, **(entry.infer if measure else {})}
    return Config(**values).validate()


def model_key(config: Config, entry: Entry) -> str:
    """Folder name of the trained model: a slug of the label and a hash of everything training uses."""
    train_dict = {k: v for k, v in config.to_dict().items() if k not in INFER_KEYS + ("log_every", "device")}
    digest = hashlib.sha1(json.dumps([entry.method, train_dict], sort_keys=True).encode()).hexdigest()[:10]
    return f"{entry.method}-{config.model}-{digest}"


def measure_key(config: Config, entry: Entry) -> str:
    infer = {k: getattr(config, k) for k in INFER_KEYS}
    digest = hashlib.sha1(json.dumps(infer, sort_keys=True).encode()).hexdigest()[:6]
    return f"{model_key(config, entry)}-{digest}"


def train_entry(folder: Path, base: Dict, entry: Entry, log: Callable[[str], None] = print) -> Dict:
    """Train ``entry``'s model unless cached; returns ``train.json``'s content (with ``cached``)."""
    config = entry_config(base, entry)
    model_dir = folder / "models" / model_key(config, entry)
    done = read_json(model_dir / "train.json")
    if done is not None:
        return {**done, "cached": True}
    resume = (model_dir / "checkpoint.pt").is_file()
    log(f"  training {entry.label} ({entry.method}, {config.steps} steps{', resuming' if resume else ''})")
    start = time.perf_counter()
    try:
        summary = train(config, entry.method, model_dir, resume=resume, progress=False)
        result = {"steps": summary["steps"], "last_loss": summary["last_loss"], "diverged_at": None,
                  "seconds": summary["seconds"]}
    except TrainingDiverged as err:
        result = {"steps": err.step, "last_loss": err.loss, "diverged_at": err.step,
                  "seconds": time.perf_counter() - start}
        log(f"  {entry.label}: the loss became {err.loss} at step {err.step}; recorded, going on")
    if resume:  # time spent before the interruption is lost; say so rather than under-report
        result["resumed"] = True
    write_json(model_dir / "train.json", result)
    return {**result, "cached": False}


def measure_model(config: Config, model, out: Path, name: str) -> Dict:
    """Every measurement of one trained model (the inference keys of ``config`` applied):
    PSNR per frame on held-out clips, the long-video instability test, sigma_1 of every layer's
    true operator, the averaged singular value spectrum, the TRF (figures written to ``out``)."""
    from .. import run

    inference = run._inference_model(config, model)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    evaluation = run.stage_eval(config, model)
    instability = run.stage_instability(config, model)
    layers = run.stage_spectra(config, model)
    spectrum = run.average_spectrum(config, model)
    trf = run.stage_trf(config, inference, out, name)
    sigmas = [row["sigma_max"] for row in layers]
    return {"eval": evaluation, "instability": instability,
            "sigma_max": max(sigmas), "sigma_mean": sum(sigmas) / len(sigmas), "sigma_layers": sigmas,
            "stable_rank_fraction_layers": [row["stable_rank_fraction"] for row in layers],
            "average_spectrum": spectrum, "trf": trf, "measure_seconds": time.perf_counter() - start}


def run_entry(folder: Path, base: Dict, entry: Entry, log: Callable[[str], None] = print) -> Dict:
    """Train (cached) and measure (cached) ``entry``; returns the measurement record, which holds
    the training summary under ``"train"`` (and no measurements when training diverged)."""
    folder = Path(folder)
    trained = train_entry(folder, base, entry, log)
    config = entry_config(base, entry, measure=True)
    key = measure_key(config, entry)
    path = folder / "measure" / f"{key}.json"
    record = read_json(path)
    if record is None:
        record = {"label": entry.label, "method": entry.method, "train_keys": entry.train, "infer": entry.infer,
                  "library": library_state()}
        if trained["diverged_at"] is None:
            model_dir = folder / "models" / model_key(entry_config(base, entry), entry)
            model = load_trained(config, entry.method, model_dir / "checkpoint.pt")
            record.update(measure_model(config, model, folder / "measure", key))
        record["train"] = {k: v for k, v in trained.items() if k != "cached"}
        write_json(path, record)
        record["cached"] = False
    else:
        record["cached"] = trained["cached"]
    record["key"] = key
    return record


def diverged(record: Dict) -> Optional[int]:
    """The training step at which ``record``'s model diverged, or None."""
    return record["train"].get("diverged_at")


def cached_record(folder: Path, base: Dict, entry: Entry) -> Optional[Dict]:
    """``entry``'s measurement record if it is in the cache (nothing is trained or measured)."""
    config = entry_config(base, entry, measure=True)
    key = measure_key(config, entry)
    record = read_json(Path(folder) / "measure" / f"{key}.json")
    if record is not None:
        record.update(cached=True, key=key)
    return record
