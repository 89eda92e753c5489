"""The paper's claims and their verdicts, computed from the measured numbers (never written by hand).

``results`` maps an experiment name to ``{label: record}`` (records of ``runner.run_entry``, with
``input_psnr`` added: the PSNR of the degraded input itself, and for appendix G ``loss_curve``);
``results["fig2b"]`` is ``{"curves": {model: [rms per frame]}}``. ``judge(results)`` returns one
row per claim: ``(claim, measured, verdict, reason)``, the verdict one of ``VERDICTS`` (or "not
run" when the claim's experiment has no results).

Definitions the verdicts use, stated in the report:

- **unstable**: the long-video test counted an instability or the TRF verdict is "unstable"
  (each is a proof: an unstable input was found); **stable**: neither (0 instabilities and TRF
  "no instability found"); **undetermined**: 0 instabilities and an inconclusive TRF.
- **trained**: mean PSNR on the held-out clips above the degraded input's own PSNR (a model below
  it has not learned its task, and its stability says nothing about the paper's trained models).
- a claim about models that diverged in training or did not learn is "not testable at this scale".
- PSNR differences are on PSNR_T (the last frame, the paper's PSNR_7); "no significant loss" is a
  loss of at most ``NO_LOSS_DB``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..evaluate import stability_state

REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE, NOT_RUN = ("reproduced", "not reproduced", "not testable at this scale",
                                                     "not run")
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE)
NO_LOSS_DB = 0.5  # "no significant performance loss": at most this many dB of PSNR_T
SIGMA_TOLERANCE = 0.05  # "precisely set to alpha": every layer's sigma_1 within 5 % of alpha
MISSED_SIGMA = 1.1  # "fails to set the spectral norm to alpha": mean sigma_1 above 1.1 alpha
SPIKE = 3.0  # a "sharp drop" of a training curve: a logged loss above 3x the running minimum
COMPARABLE_DB = 1.0  # the recipe search's "comparable PSNR": within 1 dB of the unconstrained model

Results = Dict[str, Dict]
Row = Tuple[str, str, str]  # measured, verdict, reason


class _Missing(Exception):
    """A record the claim needs is absent: the experiment (or that entry) was not run."""


@dataclass(frozen=True)
class Claim:
    id: str
    experiment: str
    quote: str
    source: str
    paper: str
    judge: Callable[[Results], Row]


# ---------------------------------------------------------------- reading records
def _rec(results: Results, experiment: str, label: str) -> Dict:
    try:
        return results[experiment][label]
    except KeyError:
        raise _Missing(f"{experiment}: {label}") from None


def _diverged(rec: Dict) -> Optional[int]:
    return rec["train"].get("diverged_at")


def _psnr_t(rec: Dict) -> float:
    return rec["eval"]["psnr_T"]


def trained(rec: Dict) -> bool:
    """Mean held-out PSNR above the degraded input's own PSNR (and training did not diverge)."""
    return _diverged(rec) is None and rec["eval"]["mean"] > rec["input_psnr"]


def stability(rec: Dict) -> Tuple[str, str]:
    """``(state, detail)``: state "unstable", "stable", "undetermined" or "diverged"."""
    step = _diverged(rec)
    if step is not None:
        return "diverged", f"diverged in training (loss non-finite at step {step})"
    s, verdict = rec["instability"], rec["trf"]["verdict"]
    n = s["instabilities"]
    detail = f"{n}/{s['frames']} instabilities"
    if n:
        detail += f" (onsets d1 {s['onset_decile_1']:g}, d9 {s['onset_decile_9']:g})"
    detail += f", TRF {verdict} (extent {rec['trf']['extent']})"
    return stability_state(n, verdict), detail


def unstable_by_both(rec: Dict) -> bool:
    return _diverged(rec) is None and rec["instability"]["instabilities"] > 0 and rec["trf"]["verdict"] == "unstable"


def _untrained_reason(recs: Dict[str, Dict]) -> Optional[str]:
    bad = []
    for label, rec in recs.items():
        if _diverged(rec) is not None:
            bad.append(f"{label} diverged in training at step {_diverged(rec)}")
        elif not trained(rec):
            bad.append(f"{label} did not learn its task (PSNR {rec['eval']['mean']:.2f} dB <= input "
                       f"{rec['input_psnr']:.2f} dB)")
    return "; ".join(bad) or None


# ---------------------------------------------------------------- verdict rules
def all_in_state(results: Results, experiment: str, labels: Sequence[str], want: str) -> Row:
    """Every model of ``labels`` is ``want`` ("unstable" or "stable")."""
    recs = {label: _rec(results, experiment, label) for label in labels}
    states = {label: stability(rec) for label, rec in recs.items()}
    measured = "; ".join(f"{label}: {state} ({detail})" for label, (state, detail) in states.items())
    untrained = _untrained_reason(recs)
    if untrained:
        return measured, NOT_TESTABLE, untrained
    other = "stable" if want == "unstable" else "unstable"
    against = [label for label, (state, _) in states.items() if state == other]
    if against:
        return measured, NOT_REPRODUCED, f"{', '.join(against)}: {other}"
    open_ = [label for label, (state, _) in states.items() if state != want]
    if open_:
        return measured, NOT_TESTABLE, (f"{', '.join(open_)}: no long-video instability and an inconclusive TRF "
                                        "(a field longer than the TRF sequence)")
    return measured, REPRODUCED, f"all {want}"


def psnr_difference(results: Results, experiment: str, a: str, b: str, *, at_least: float,
                    meaning: str) -> Row:
    """PSNR_T(a) - PSNR_T(b) >= ``at_least`` (dB), both models trained."""
    ra, rb = _rec(results, experiment, a), _rec(results, experiment, b)
    untrained = _untrained_reason({a: ra, b: rb})
    if untrained:
        measured = "; ".join(f"{k}: PSNR_T {_psnr_t(r):.2f}" for k, r in ((a, ra), (b, rb)) if _diverged(r) is None)
        return measured or "no PSNR (training diverged)", NOT_TESTABLE, untrained
    diff = _psnr_t(ra) - _psnr_t(rb)
    measured = f"PSNR_T {a} {_psnr_t(ra):.2f} - {b} {_psnr_t(rb):.2f} = {diff:+.2f} dB"
    ok = diff >= at_least
    reason = f"{meaning}: {diff:+.2f} dB {'>=' if ok else '<'} {at_least:+.2f} dB"
    if at_least < 0 and diff > NO_LOSS_DB:  # a "no significant loss" claim met with a large gain
        reason += (f"; {a} is {diff:.2f} dB better, so this compares how well the two trained at this scale "
                   "more than what the constraint costs")
    return measured, REPRODUCED if ok else NOT_REPRODUCED, reason


def sigma_at_alpha(results: Results, experiment: str, labels_alpha: Sequence[Tuple[str, float]]) -> Row:
    worst, parts = 0.0, []
    for label, alpha in labels_alpha:
        rec = _rec(results, experiment, label)
        if _diverged(rec) is not None:
            return f"{label} diverged", NOT_TESTABLE, f"{label} diverged in training at step {_diverged(rec)}"
        dev = max(abs(s / alpha - 1) for s in rec["sigma_layers"])
        worst = max(worst, dev)
        parts.append(f"{label}: sigma_1 {min(rec['sigma_layers']):.3f}-{max(rec['sigma_layers']):.3f}")
    ok = worst <= SIGMA_TOLERANCE
    return ("; ".join(parts), REPRODUCED if ok else NOT_REPRODUCED,
            f"largest deviation of a layer's sigma_1 from alpha: {100 * worst:.1f} % "
            f"({'<=' if ok else '>'} {100 * SIGMA_TOLERANCE:g} %)")


def sigma_missed(results: Results, experiment: str, label: str, alpha: float) -> Row:
    rec = _rec(results, experiment, label)
    if _diverged(rec) is not None:
        return "diverged", NOT_TESTABLE, f"{label} diverged in training at step {_diverged(rec)}"
    sig = rec["sigma_layers"]
    mean = sum(sig) / len(sig)
    std = math.sqrt(sum((s - mean) ** 2 for s in sig) / len(sig))
    ok = mean > MISSED_SIGMA * alpha
    return (f"{label} (alpha {alpha:g}): true sigma_1 {mean:.2f} +- {std:.2f} (max {max(sig):.2f})",
            REPRODUCED if ok else NOT_REPRODUCED,
            f"mean true sigma_1 {'above' if ok else 'within'} {MISSED_SIGMA:g} alpha")


# ---------------------------------------------------------------- claim-specific judges
def _fig2b(results: Results) -> Row:
    if "fig2b" not in results:
        raise _Missing("fig2b")
    curves = results["fig2b"]["curves"]
    diverging, bounded, wrong = [], [], []
    for name, rms in curves.items():
        # early: the first 5 frames (a feature-shifting model's second frame already sees a shifted
        # state); late: the second half
        early, late = max(rms[:5]), max(rms[len(rms) // 2:])
        diverges = not all(math.isfinite(v) for v in rms) or late > 1e3 * early
        is_bounded = not diverges and late <= 10 * early
        recurrent = name.split("-")[1] in ("feat", "frame", "rlsp")
        (diverging if diverges else bounded if is_bounded else []).append(name)
        if (recurrent and not diverges) or (not recurrent and not is_bounded):
            wrong.append(name)
    measured = f"diverge: {', '.join(diverging) or 'none'}; bounded: {', '.join(bounded) or 'none'}"
    if wrong:
        return measured, NOT_REPRODUCED, f"against the claim: {', '.join(wrong)}"
    return measured, REPRODUCED, ("every recurrent model diverges (non-finite, or its late RMS above 1e3x its first "
                                  "5 frames'), every feedforward one stays bounded (late RMS within 10x)")


def _tests_agree(results: Results) -> Row:
    pairs, seen = [], 0
    for experiment, recs in results.items():
        if experiment in ("fig2b", "recipe"):
            continue
        for label, rec in recs.items():
            seen += 1
            if _diverged(rec) is None and trained(rec):
                pairs.append((f"{experiment}/{label}", rec["instability"]["instabilities"] > 0, rec["trf"]["verdict"]))
    if not seen:
        raise _Missing("any trained-model experiment")
    if not pairs:
        return f"{seen} models, none trained", NOT_TESTABLE, "no model learned its task"
    decided = [(name, long, verdict) for name, long, verdict in pairs if verdict != "inconclusive"]
    disagree = [name for name, long, verdict in decided if long != (verdict == "unstable")]
    unstable = [name for name, long, verdict in decided if long or verdict == "unstable"]
    measured = (f"{len(decided) - len(disagree)} of {len(decided)} trained models agree "
                f"({len(pairs) - len(decided)} with an inconclusive TRF left out)")
    if disagree:
        return measured, NOT_REPRODUCED, f"the tests disagree on {', '.join(disagree)}"
    if not unstable:
        return measured, NOT_TESTABLE, "no trained model was unstable by either test: agreement only on stable models"
    return measured, REPRODUCED, f"they agree on every model, {len(unstable)} of them unstable"


def _spectra_uninformative(results: Results) -> Row:
    labels = ["vdncnn-feat", "vdncnn-frame", "vdncnn-rlsp", "vresnet-feat", "vresnet-frame", "vresnet-rlsp"]
    recs = {label: _rec(results, "table2", label) for label in labels}
    recs = {k: r for k, r in recs.items() if _diverged(r) is None}
    if not recs:
        return "every model diverged", NOT_TESTABLE, "no trained model"
    sig = {k: r["sigma_max"] for k, r in recs.items()}
    measured = ", ".join(f"{k} {v:.2f}" for k, v in sig.items())
    ok = all(v > 1 for v in sig.values())
    return (f"max sigma_1: {measured}", REPRODUCED if ok else NOT_REPRODUCED,
            "every model has a layer with sigma_1 > 1: the product bound (5) cannot show contraction" if ok else
            f"{', '.join(k for k, v in sig.items() if v <= 1)}: every layer at most 1, the bound (5) shows contraction")


def _trf_shorter_with_alpha(results: Results) -> Row:
    a1, a05 = _rec(results, "table3", "SRN-C 1-1"), _rec(results, "table3", "SRN-C 0.5-1")
    untrained = _untrained_reason({"SRN-C 1-1": a1, "SRN-C 0.5-1": a05})
    if untrained:
        return "-", NOT_TESTABLE, untrained
    e1, e05, tau = a1["trf"]["extent"], a05["trf"]["extent"], a1["trf"]["tau"]
    measured = f"TRF extent: alpha 1 {e1}, alpha 0.5 {e05} (of {tau} frames)"
    if e1 >= tau:
        return measured, NOT_TESTABLE, "the alpha = 1 field reaches the first frame: longer than the TRF sequence"
    ok = e05 < e1
    return measured, REPRODUCED if ok else NOT_REPRODUCED, f"extent {'shorter' if ok else 'not shorter'} at alpha 0.5"


def _stable_rank_with_beta(results: Results) -> Row:
    labels = ["SRN-C 2-0.4", "SRN-C 2-0.2", "SRN-C 2-0.1", "SRN-C 2-0.05"]
    recs = [(label, _rec(results, "table3", label)) for label in labels]
    if any(_diverged(r) is not None for _, r in recs):
        return "-", NOT_TESTABLE, "a model diverged in training"
    fractions = [(label, sum(r["stable_rank_fraction_layers"]) / len(r["stable_rank_fraction_layers"]))
                 for label, r in recs]
    measured = "mean stable rank / full rank: " + ", ".join(f"{k} {v:.3f}" for k, v in fractions)
    ok = all(fractions[i][1] > fractions[i + 1][1] for i in range(len(fractions) - 1))
    return measured, REPRODUCED if ok else NOT_REPRODUCED, f"stable rank {'falls' if ok else 'does not fall'} with beta"


def _stable_and_better(results: Results, experiment: str, stable: str, other: str, at_least: float, meaning: str) -> Row:
    measured, verdict, reason = psnr_difference(results, experiment, stable, other, at_least=at_least, meaning=meaning)
    state, detail = stability(_rec(results, experiment, stable))
    measured = f"{measured}; {stable}: {state} ({detail})"
    if verdict == REPRODUCED and state != "stable":
        return measured, NOT_REPRODUCED if state == "unstable" else NOT_TESTABLE, f"{stable} is {state}"
    return measured, verdict, reason


def _training_spikes(results: Results) -> Row:
    labels = ["T=7", "T=14", "T=28", "T=56"]
    recs = {label: _rec(results, "appendixG", label) for label in labels}

    def spike(rec):
        if _diverged(rec) is not None:
            return math.inf
        losses = [loss for _, loss in rec.get("loss_curve", [])]
        start = max(1, len(losses) // 10)
        worst = 1.0
        for i in range(start, len(losses)):
            worst = max(worst, losses[i] / max(min(losses[:i]), 1e-30))
        return worst

    ratios = {k: spike(r) for k, r in recs.items()}
    measured = "largest loss / running minimum: " + ", ".join(
        f"{k} {'diverged' if math.isinf(v) else format(v, '.2f')}" for k, v in ratios.items())
    long_spikes = ratios["T=56"] > SPIKE
    short_spikes = [k for k in labels[:3] if ratios[k] > SPIKE]
    if long_spikes and not short_spikes:
        return measured, REPRODUCED, f"only T=56 has a spike above {SPIKE:g}x (or diverges)"
    if not long_spikes:
        return measured, NOT_REPRODUCED, f"T=56 has no spike above {SPIKE:g}x"
    return measured, NOT_REPRODUCED, f"{', '.join(short_spikes)} spike too"


def _bursts_prevent(results: Results) -> Row:
    none = _rec(results, "appendixEF", "none")
    labels = ["bursts of 10", "bursts of 10, overlap"]
    recs = {label: _rec(results, "appendixEF", label) for label in labels}
    counts = {k: r["instability"]["instabilities"] for k, r in recs.items() if _diverged(r) is None}
    state, detail = stability(none)
    measured = f"none: {detail}; " + ", ".join(f"{k}: {v} instabilities" for k, v in counts.items())
    if _diverged(none) is not None or none["instability"]["instabilities"] == 0:
        return measured, NOT_TESTABLE, "the unconstrained model has no long-video instability for bursts to prevent"
    ok = all(v == 0 for v in counts.values())
    return measured, REPRODUCED if ok else NOT_REPRODUCED, "no instability burst by burst" if ok else "bursts still fail"


def _long_mean(rec: Dict) -> float:
    trace = [v for v in rec["instability"]["psnr_trace"] if math.isfinite(v)]
    return sum(trace) / max(len(trace), 1)


def _srnc_beats_bursts(results: Results) -> Row:
    labels = ["SRN-C 2-0.1", "bursts of 10", "bursts of 10, overlap"]
    recs = {label: _rec(results, "appendixEF", label) for label in labels}
    untrained = _untrained_reason(recs)
    if untrained:
        return "-", NOT_TESTABLE, untrained
    means = {k: _long_mean(r) for k, r in recs.items()}
    measured = "mean PSNR over the long video: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items())
    ok = means["SRN-C 2-0.1"] > max(means["bursts of 10"], means["bursts of 10, overlap"])
    return measured, REPRODUCED if ok else NOT_REPRODUCED, f"SRN-C 2-0.1 {'above' if ok else 'not above'} both"


def _dampening_costs_more(results: Results) -> Row:
    none, damp, srnc = (_rec(results, "appendixEF", k) for k in ("none", "dampening 0.55", "SRN-C 2-0.1"))
    untrained = _untrained_reason({"none": none, "dampening 0.55": damp, "SRN-C 2-0.1": srnc})
    if untrained:
        return "-", NOT_TESTABLE, untrained
    d_damp, d_srnc = _psnr_t(damp) - _psnr_t(none), _psnr_t(srnc) - _psnr_t(none)
    measured = f"PSNR_T vs none: dampening 0.55 {d_damp:+.2f} dB, SRN-C 2-0.1 {d_srnc:+.2f} dB"
    ok = d_damp < d_srnc
    reason = f"dampening {'costs more' if ok else 'does not cost more'}"
    if d_damp > 0:
        reason += " (both are above the unconstrained model here: neither costs anything at this scale)"
    return measured, REPRODUCED if ok else NOT_REPRODUCED, reason


def _recipe(results: Results) -> Row:
    """Which recipe levers made the unconstrained model unstable by both tests, and whether
    SRN-C 2-1 then reached a comparable PSNR."""
    if "recipe" not in results:
        raise _Missing("recipe")
    recs = results["recipe"]
    levers = []
    for label in recs:
        lever, _, method = label.partition(" | ")
        if method == "none" and lever not in levers:
            levers.append(lever)
    hits, comparable, tried = [], [], []
    for lever in levers:
        none = recs[f"{lever} | none"]
        tried.append(lever)
        if unstable_by_both(none) and trained(none):
            hits.append(lever)
            other = recs.get(f"{lever} | SRN-C 2-1")
            if other is not None and trained(other) and _psnr_t(other) >= _psnr_t(none) - COMPARABLE_DB:
                comparable.append(lever)
    def names(items):
        return ", ".join(f"`{item}`" for item in items) or "none"

    measured = (f"tried: {names(tried)}; unconstrained unstable by both tests and trained: {names(hits)}; "
                f"with SRN-C 2-1 within {COMPARABLE_DB:g} dB too: {names(comparable)}")
    if hits:  # how well the unstable unconstrained models denoise (their instability may come with poor training)
        measured += "; their PSNR mean / input PSNR: " + ", ".join(
            f"{recs[f'{h} | none']['eval']['mean']:.2f} / {recs[f'{h} | none']['input_psnr']:.2f} dB" for h in hits)
    if hits:
        return measured, REPRODUCED, f"{len(hits)} of {len(tried)} recipes make a trained unconstrained model unstable"
    return measured, NOT_TESTABLE, f"no affordable recipe of the {len(tried)} tried made a trained unconstrained model unstable"


def pick_recipe(recipe: Dict[str, Dict], levers, max_steps: int) -> Tuple[Optional[str], str]:
    """The recipe rule, applied to the search's records: among the affordable levers (at most
    ``max_steps`` training steps, the paper's models, not appendix G's), the one that best meets
    the search's two goals, in this order: (a) the unconstrained model is trained and unstable by
    both tests, (b) SRN-C 2-1 is trained and within ``COMPARABLE_DB`` of it on PSNR_T, (c) the
    highest PSNR_T of SRN-C 2-1 (so that the claims about alpha > 1 are tested on a model that
    learned). Ties go to the earlier lever. Returns ``(lever, why)``; ``(None, why)`` without records."""
    best, best_score, why = None, None, "no affordable lever has all its records"
    for name, change, _ in levers:
        if change.get("steps", 0) > max_steps or "depth" in change:
            continue
        none, other = recipe.get(f"{name} | none"), recipe.get(f"{name} | SRN-C 2-1")
        if none is None or other is None:
            continue
        a = trained(none) and unstable_by_both(none)
        b = trained(other) and trained(none) and _psnr_t(other) >= _psnr_t(none) - COMPARABLE_DB
        c = _psnr_t(other) if _diverged(other) is None else -math.inf
        score = (a, b, c)
        if best_score is None or score > best_score:
            best, best_score = name, score
            why = (f"unconstrained trained and unstable by both tests: {'yes' if a else 'no'}; SRN-C 2-1 within "
                   f"{COMPARABLE_DB:g} dB: {'yes' if b else 'no'}; SRN-C 2-1 PSNR_T {c:.2f} dB")
    return best, why


# ---------------------------------------------------------------- the claims
def _u(experiment, *labels):
    return lambda r: all_in_state(r, experiment, labels, "unstable")


def _s(experiment, *labels):
    return lambda r: all_in_state(r, experiment, labels, "stable")


CLAIMS: List[Claim] = [
    Claim("fig2b", "fig2b", "untrained: feedforward architectures produce stable outputs while recurrent "
          "architectures diverge", "section 1.1, figure 2b",
          "recurrent outputs diverge, feedforward bounded (Gaussian init, sigma 0.1, 50 frames)", _fig2b),
    Claim("central", "recipe", "recurrent models trained in standard conditions become unstable (the paper's "
          "central observation), reproduced with an affordable recipe", "sections 1.1, 3.1",
          "3 of 6 models unstable after 600k steps", _recipe),
    Claim("t2-unstable", "table2", "VDnCNN-feat, VDnCNN-RLSP and VResNet-feat are unstable", "section 3.1, table 2",
          "unstable; VResNet-feat onsets 29-75 (d1-d9)", _u("table2", "vdncnn-feat", "vdncnn-rlsp", "vresnet-feat")),
    Claim("t2-stable", "table2", "VDnCNN-frame, VResNet-frame and VResNet-RLSP are stable", "section 3.1, table 2",
          "no instability (onsets inf)", _s("table2", "vdncnn-frame", "vresnet-frame", "vresnet-rlsp")),
    Claim("t2-spectra", "table2", "the spectra ... are uninformative, with spectral norms typically around 6: too "
          "high to conclude anything about the contractiveness", "section 3.1, table 2", "sigma_1 about 6",
          _spectra_uninformative),
    Claim("tests-agree", "table3", "the two tests give consistent answers on the stability of various models",
          "section 2.2", "consistent on every model", _tests_agree),
    Claim("t3-srn-sigma", "table3", "SRN fails to set the spectral norm of W to the desired value alpha",
          "section 3.2, table 3", "sigma_1 about 2.5 +- 0.2 for SRN-1.0-1.0",
          lambda r: sigma_missed(r, "table3", "SRN 1-1", 1.0)),
    Claim("t3-sn-sigma", "table3", "SN ... operate[s] on a 2D reshaping of the kernel ... unable to enforce "
          "stability through the Hard and Soft Lipschitz Constraints", "section 2.4", "(no number)",
          lambda r: sigma_missed(r, "table3", "SN 1", 1.0)),
    Claim("t3-srnc-sigma", "table3", "the spectral norms of all the convolutional layers are now precisely set to "
          "their respective values of alpha", "section 3.2, table 3", "sigma_1 = alpha",
          lambda r: sigma_at_alpha(r, "table3", [("SRN-C 2-1", 2.0), ("SRN-C 1.5-1", 1.5), ("SRN-C 1-1", 1.0),
                                                 ("SRN-C 0.5-1", 0.5)])),
    Claim("t3-alpha-unstable", "table3", "the models trained with alpha > 1 are unstable", "section 3.2, table 3",
          "onsets 74-264 (alpha 2), 84-285 (alpha 1.5)", _u("table3", "SRN-C 2-1", "SRN-C 1.5-1")),
    Claim("t3-alpha-stable", "table3", "the models trained with alpha < 1 [and alpha = 1] are stable: the Hard "
          "Lipschitz Constraint is effective", "section 3.2, table 3", "onsets inf (alpha 1, 0.5)",
          _s("table3", "SRN-C 1-1", "SRN-C 0.5-1")),
    Claim("t3-alpha-trf", "table3", "reducing alpha < 1 shortens the temporal length of the receptive field",
          "section 3.2, table 3", "(TRF figures)", _trf_shorter_with_alpha),
    Claim("t3-alpha-psnr", "table3", "reducing alpha also hurts performance (-0.4 dB from alpha = 2.0 to 1.0)",
          "section 3.2, table 3", "PSNR_7 35.71 -> 35.31",
          lambda r: psnr_difference(r, "table3", "SRN-C 2-1", "SRN-C 1-1", at_least=1e-9,
                                    meaning="alpha 2 above alpha 1")),
    Claim("t3-beta-sigma", "table3", "varying beta has no effect on the spectral norm", "section 3.2, table 3",
          "sigma_1 = 2", lambda r: sigma_at_alpha(r, "table3", [(f"SRN-C 2-{b:g}", 2.0) for b in (0.4, 0.2, 0.1, 0.05)])),
    Claim("t3-beta-srank", "table3", "but it has an effect on their stable rank", "section 3.2, table 3",
          "(spectra)", _stable_rank_with_beta),
    Claim("t3-beta-unstable", "table3", "models trained with beta > 0.1 are unstable", "section 3.2, table 3",
          "onsets 50-258 (beta 0.4), 26-110 (beta 0.2)", _u("table3", "SRN-C 2-0.4", "SRN-C 2-0.2")),
    Claim("t3-beta-stable", "table3", "[models trained with beta <= 0.1] are stable: the Soft Lipschitz Constraint "
          "is also effective", "section 3.2, table 3", "onsets inf (beta 0.1, 0.05)",
          _s("table3", "SRN-C 2-0.1", "SRN-C 2-0.05")),
    Claim("t3-soft-vs-hard", "table3", "a stable model that performs better than with the Hard Lipschitz Constraint "
          "(+0.18 dB between alpha = 1.0, beta = 1.0 and alpha = 2.0, beta = 0.1)", "section 3.2, table 4",
          "PSNR_7 35.31 -> 35.59",
          lambda r: _stable_and_better(r, "table3", "SRN-C 2-0.1", "SRN-C 1-1", 1e-9, "soft above hard")),
    Claim("t4-cost", "table3", "SRN-C successfully enforces stability ... without a significant performance loss",
          "abstract, table 4", "PSNR_7 35.74 (none) -> 35.59 (SRN-C 2-0.1), -0.15 dB",
          lambda r: _stable_and_better(r, "table3", "SRN-C 2-0.1", "none", -NO_LOSS_DB,
                                       f"loss at most {NO_LOSS_DB:g} dB")),
    Claim("t5-none", "table5", "[x2 super-resolution] the unconstrained model is unstable", "section 3.3, table 5",
          "80 % of the onsets between 22 and 51 frames", _u("table5", "none")),
    Claim("t5-srnc", "table5", "[SRN-C-1.0-1.0 and SRN-C-2.0-0.05] are now stable according to our two tests",
          "section 3.3, table 5", "onsets inf", _s("table5", "SRN-C 1-1", "SRN-C 2-0.05")),
    Claim("t5-psnr", "table5", "we do not observe a significant drop of performance for the models trained with "
          "constraints (soft: +0.06 dB)", "section 3.3, table 5", "+0.06 dB (SRN-C 2-0.05)",
          lambda r: psnr_difference(r, "table5", "SRN-C 2-0.05", "none", at_least=-NO_LOSS_DB,
                                    meaning=f"loss at most {NO_LOSS_DB:g} dB")),
    Claim("g-56", "appendixG", "even the model trained on sequences of 56 frames is vulnerable to instabilities",
          "appendix G, table 8", "unstable", _u("appendixG", "T=56")),
    Claim("g-curve", "appendixG", "sharp drops in the training curve of the model trained on sequences of 56 frames "
          "(gradient explosions); similar profiles for 7, 14, 28", "appendix G, figure 11",
          "drops of the validation PSNR at T = 56 only (here: spikes of the training loss)", _training_spikes),
    Claim("e-bursts-stable", "appendixEF", "running the model burst by burst prevents instabilities from building up",
          "section 3.4, appendix E", "(figure 9)", _bursts_prevent),
    Claim("e-bursts-psnr", "appendixEF", "the model stabilised with SRN-C outperforms [burst-by-burst processing, "
          "with and without overlap] on average", "appendix E, figure 9", "(figure 9, 700 frames)", _srnc_beats_bursts),
    Claim("f-damp-unstable", "appendixEF", "the model is unstable for lambda in [0.95, 0.85, 0.75, 0.65]",
          "appendix F, table 7", "unstable", _u("appendixEF", "dampening 0.95", "dampening 0.85")),
    Claim("f-damp-stable", "appendixEF", "[the dampened model] only starts to be reliably stable for lambda <= 0.55",
          "appendix F, table 7", "onsets inf at 0.55", _s("appendixEF", "dampening 0.55")),
    Claim("f-damp-cost", "appendixEF", "the price to pay in terms of PSNR_7 is high: -1.12 dB with lambda = 0.55; "
          "SRN-C-2.0-0.1: -0.15 dB", "appendix F", "34.62 vs 35.74 (lambda 0.55), 35.59 (SRN-C 2-0.1)",
          _dampening_costs_more),
]


def judge(results: Results, claims: Optional[List[Claim]] = None) -> List[Tuple[Claim, str, str, str]]:
    """One ``(claim, measured, verdict, reason)`` per claim; "not run" where records are missing."""
    rows = []
    for claim in CLAIMS if claims is None else claims:
        try:
            measured, verdict, reason = claim.judge(results)
        except _Missing as missing:
            measured, verdict, reason = "-", NOT_RUN, f"no results for {missing} (run `reproduce --only {claim.experiment}`)"
        rows.append((claim, measured, verdict, reason))
    return rows
