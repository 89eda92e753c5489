"""The paper's experiments at a CPU scale, as lists of ``Entry`` (one per row of the paper's table).

``BASES`` are the configurations every entry starts from (``default``: the CPU scale of
``python -m training.run``, with a 2000-frame long video; ``smoke``: seconds, for CI). ``RECIPE``
is the training recipe every model of the paper's experiments uses, picked by the measured search
of the ``recipe`` experiment, whose entries each change one lever of ``BASELINE``. Every method of an experiment gets the same recipe and the same
seed: nothing is tuned per method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

from ..config import PRESETS
from .runner import Entry

# configuration every entry starts from (on top of training.config.Config's defaults)
BASES: Dict[str, Dict] = {
    "default": dict(long_frames=2000),
    "smoke": dict(width=4, crop=8, frames=3, batch=2, steps=3, log_every=1, checkpoint_every=2, eval_clips=1,
                  long_frames=30, trf_frames=7, trf_size=8, trf_iters=2),
}

# the levers of the recipe search at their values in python -m training.run's default recipe
BASELINE: Dict = dict(steps=500, init="default", static_clips=0.0, warmup=0, grad_clip=None)

# the recipe of the paper experiments: the levers of the default preset of `python -m training.run`,
# set to what the recipe search's rule (claims.pick_recipe) picked from its measurements:
# "init=he, grad_clip=1" (reproduction.md checks that the two still agree)
RECIPE: Dict = {k: PRESETS["default"].get(k, v) for k, v in BASELINE.items()}


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    source: str          # where in the paper
    entries: Callable[[str], List[Entry]]  # preset -> entries
    budget_note: str = ""


def _scaled(preset: str, steps: int) -> int:
    """Training steps of a non-recipe entry (appendix G's tiny model): ``steps`` at the default
    scale, the smoke base's in smoke."""
    return BASES["smoke"]["steps"] if preset == "smoke" else steps


def _r(preset: str, **keys) -> Dict:
    """The recipe with ``keys``; in smoke the base's (few) steps."""
    recipe = {k: v for k, v in RECIPE.items() if not (preset == "smoke" and k == "steps")}
    return {**recipe, **keys}


def _label_srnc(alpha, beta) -> str:
    return f"SRN-C {alpha:g}-{beta:g}"


def fig2b_entries(preset: str) -> List[Entry]:
    return []  # untrained models: computed by training.figures, not trained


def table3_entries(preset: str) -> List[Entry]:
    entries = [Entry("none", "none", _r(preset)),
               Entry("SN 1", "sn", _r(preset, alpha=1.0)),
               Entry("SRN 1-1", "srn", _r(preset, alpha=1.0, beta=1.0))]
    entries += [Entry(_label_srnc(a, 1.0), "srnc", _r(preset, alpha=a, beta=1.0)) for a in (2.0, 1.5, 1.0, 0.5)]
    entries += [Entry(_label_srnc(2.0, b), "srnc", _r(preset, alpha=2.0, beta=b)) for b in (0.4, 0.2, 0.1, 0.05)]
    return entries


def table2_entries(preset: str) -> List[Entry]:
    return [Entry(f"{backbone}-{kind}", "none", _r(preset, model=f"{backbone}-{kind}"))
            for backbone in ("vdncnn", "vresnet") for kind in ("feat", "frame", "rlsp")]


def table5_entries(preset: str) -> List[Entry]:
    return [Entry("none", "none", _r(preset, task="sr2")),
            Entry(_label_srnc(1.0, 1.0), "srnc", _r(preset, alpha=1.0, beta=1.0, task="sr2")),
            Entry(_label_srnc(2.0, 0.05), "srnc", _r(preset, alpha=2.0, beta=0.05, task="sr2"))]


# appendix G: VDnCNN-feat with one internal conv, gray 32x32 crops, sigma 20
TINY = dict(model="vdncnn-feat", depth=3, width=32, channels=1, sigma=20.0)
APPENDIX_G_STEPS = 600  # at T = 56 a step costs 8x one at T = 7: the four models fit in about 12 minutes


def _tiny(preset: str) -> Dict:
    return dict(TINY, width=4) if preset == "smoke" else dict(TINY)


def appendixG_entries(preset: str) -> List[Entry]:
    steps = _scaled(preset, APPENDIX_G_STEPS)
    lengths = (7, 14, 28, 56)
    return [Entry(f"T={t}", "none", _r(preset, **_tiny(preset), frames=t, steps=steps)) for t in lengths]


def appendixEF_entries(preset: str) -> List[Entry]:
    none = _r(preset)
    return ([Entry("none", "none", none),
             Entry("bursts of 10", "none", none, {"burst": 10}),
             Entry("bursts of 10, overlap", "none", none, {"burst": 10, "burst_overlap": True})]
            + [Entry(f"dampening {lam:g}", "none", none, {"dampening": lam}) for lam in (0.95, 0.85, 0.55)]
            + [Entry(_label_srnc(2.0, 0.1), "srnc", _r(preset, alpha=2.0, beta=0.1))])


# ---------------------------------------------------------------- the recipe search (item 3 of issue 9)
# appendix G's tiny model trained long (T = 7), the last lever
TINY_LONG = dict(TINY, steps=12000)
LEVERS: List = [  # (name, what changes from BASELINE, why); run in this order
    # stage 1: one lever at a time
    ("baseline", {}, "the default run's recipe: PyTorch init, 500 steps, moving clips"),
    ("init=he", dict(init="he"), "He init is expansive at init (figure 2b); PyTorch's default is contractive"),
    ("init=glorot", dict(init="glorot"), "TensorFlow's default init, which the paper's models started from"),
    ("static_clips=0.5", dict(static_clips=0.5), "static scenes are the risky case (appendices A, H)"),
    ("warmup=100", dict(warmup=100), "learning-rate warm-up, for the alpha=2 beta=1 model"),
    ("grad_clip=1", dict(grad_clip=1.0), "gradient clipping, for the alpha=2 beta=1 model"),
    ("steps=2000", dict(steps=2000), "4x longer training (the paper trains 600k steps)"),
    # stage 2, chosen after stage 1: clipping made SRN-C 2-1 learn, He/Glorot made the unconstrained
    # model unstable but kept it from learning; do they combine?
    ("init=he, grad_clip=1", dict(init="he", grad_clip=1.0), "stage 2: He init with the clipping that let SRN-C 2-1 learn"),
    ("init=glorot, grad_clip=1", dict(init="glorot", grad_clip=1.0), "stage 2: Glorot init with clipping"),
    ("init=he, grad_clip=1, warmup=100", dict(init="he", grad_clip=1.0, warmup=100),
     "stage 2: He init, clipping and warm-up"),
    ("static_clips=1", dict(static_clips=1.0), "stage 2: only static clips (the longest TRF, appendix H)"),
    ("lr=3e-3 constant", dict(lr=3e-3, schedule="constant"),
     "stage 2: faster weight growth than the default's cosine decay from 1e-3 (steps=2000 grew sigma_1 to 2.06)"),
    # long runs (not affordable for a whole experiment; they test the training-length lever)
    ("tiny model, 12000 steps", TINY_LONG, "appendix G's tiny VDnCNN-feat (gray, sigma 20) trained 24x longer"),
    ("steps=6000", dict(steps=6000), "12x longer training"),
]
SEARCH_METHODS = (("none", "none", {}), (_label_srnc(2.0, 1.0), "srnc", dict(alpha=2.0, beta=1.0)),
                  (_label_srnc(2.0, 0.1), "srnc", dict(alpha=2.0, beta=0.1)))


def recipe_entries(preset: str) -> List[Entry]:
    entries = []
    for lever, change, _ in LEVERS:
        keys = {**BASELINE, **change}
        if preset == "smoke":
            keys["steps"] = BASES["smoke"]["steps"]
            if "depth" in keys:
                keys["width"] = _tiny(preset)["width"]
        entries += [Entry(f"{lever} | {label}", method, {**keys, **params}) for label, method, params in SEARCH_METHODS]
    return entries


EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in [
    Experiment("fig2b", "Figure 2b: untrained models on random inputs", "section 1.1, figure 2b", fig2b_entries),
    Experiment("table3", "Table 3: SN/SRN on the reshaped kernel and SRN-C on VResNet-feat", "section 3.2, table 3",
               table3_entries),
    Experiment("table2", "Table 2: unconstrained recurrent models", "section 3.1, table 2", table2_entries),
    Experiment("table5", "Table 5: x2 video super-resolution, VResNet-feat", "section 3.3, table 5", table5_entries),
    Experiment("appendixG", "Appendix G: training on long sequences (tiny VDnCNN-feat)", "appendix G, table 8",
               appendixG_entries),
    Experiment("appendixEF", "Appendices E and F: burst-by-burst inference and feature dampening",
               "appendices E, F, table 7", appendixEF_entries),
    Experiment("recipe", "Recipe search: which affordable recipe makes an unconstrained model unstable",
               "issue 9 item 3", recipe_entries),
]}
DEFAULT_EXPERIMENTS = ("fig2b", "table3", "table2", "table5", "appendixG", "appendixEF")
