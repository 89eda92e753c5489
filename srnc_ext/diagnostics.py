"""Stability diagnostics for recurrent video models (paper sections 2.2 and 3.1).

Every model follows the recurrent protocol ``model.step(x_t, state) -> (y_t, state)`` with
``x_t`` of shape ``(B, C, H, W)`` and ``state=None`` meaning the zero state; ``y_t`` may be
larger than ``x_t`` (super-resolution). ``as_recurrent(fn)`` wraps a plain callable.

``trf`` -- the Temporal Receptive Field stress test. On ``2*tau + 1`` frames (zero state before
the first; frame index ``tau`` is t = 0) Adam maximizes ``|p|``, ``p`` the centre pixel of
channel 0 of ``y_tau``, over ``X`` in [0, 1] (clamped after every step, lr x0.1 at 60% and
85% of the iterations, model in eval mode, parameters untouched). Only frames ``0..tau`` are
run inside the loop (``p`` depends on nothing later). Afterwards:

* ``influence[t] = ||dp/dx_t||_1`` at the final X (exactly 0 for t > tau);
* ``extent = tau - t_min``, ``t_min`` the earliest frame with
  ``influence[t] >= threshold * influence.max()`` (0 when the influence is all zero);
* ``growth = max_{t > tau} rms(y_t) / rms(y_tau)`` over the full forward run (inf if non-finite).

* ``tail_rate``: the influence's per-frame rate over the oldest ``k = max(2, ceil((tau + 1) / 4))``
  frames, ``exp(-slope)`` of a least-squares line through ``log influence[t]``, t = 0..k-1 (frames
  with zero influence left out): ``a`` for ``h_t = a h_{t-1} + x_t`` (influence ``a^(tau - t)``);
  above 1 the influence grows into the past, 1 is a flat tail.

Verdict (``trf_verdict``): ``"unstable"`` if a non-finite value appeared, or
``growth > growth_factor``, or the TRF is unbounded: it reaches the first frame
(``extent == tau``) and its tail does not decay, ``tail_rate >= max_decay_rate`` (0.99: a tail
shrinking by less than 1 % per frame would need more than 680 frames to fall by 1e3).
``"inconclusive"`` when it reaches the first frame and its tail decays (a field longer than the
sequence: use more frames). Otherwise ``"no instability found"`` (evidence, not proof, of
stability).

``instability_onsets`` -- the long-video test (section 3.1): PSNR < 0 on the raw output (or a
non-finite output) counts an instability and resets the state.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

__all__ = ["TRFResult", "trf", "trf_verdict", "tail_rate", "as_recurrent", "instability_onsets"]

_PROTOCOL = "model.step(x_t, state) -> (y_t, state), with state=None the zero state"


class _Recurrent(nn.Module):
    def __init__(self, fn: Callable, min_size: Optional[int] = None, module: Optional[nn.Module] = None):
        super().__init__()
        self.fn = fn
        self.module = module  # registered: the diagnostics see (and restore) its parameters and modes
        if min_size is not None:
            self.min_size = min_size

    def step(self, x_t, state):
        return self.fn(x_t, state)


def as_recurrent(fn: Callable, *, min_size: Optional[int] = None, module: Optional[nn.Module] = None) -> nn.Module:
    """Wrap ``fn(x_t, state) -> (y_t, state)`` into a module with ``.step`` (and eval/train).

    ``module``: the model ``fn`` runs (e.g. a closure over a network's forward branch). Pass it, so
    that the diagnostics put it in eval mode, freeze its parameters while they run, and restore
    its modes and ``requires_grad`` flags afterwards; a closure alone hides them.
    """
    if not callable(fn):
        raise TypeError(f"as_recurrent needs a callable fn(x_t, state) -> (y_t, state), got {type(fn).__name__}")
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module or None, got {type(module).__name__}")
    return _Recurrent(fn, min_size, module)


@contextlib.contextmanager
def _as_found(model):
    """Run a diagnostic on ``model`` in eval mode with frozen parameters, then restore every
    submodule's mode and every parameter's ``requires_grad`` (so no ``.grad`` appears)."""
    params = list(model.parameters()) if callable(getattr(model, "parameters", None)) else []
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    plain_mode = None if modes else getattr(model, "training", None)
    try:
        for p in params:
            p.requires_grad_(False)
        if callable(getattr(model, "eval", None)):
            model.eval()
        yield params
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        if plain_mode is not None and callable(getattr(model, "train", None)):
            model.train(plain_mode)


@dataclass
class TRFResult:
    X: torch.Tensor             # final input (frames, C, H, W), in [0, 1]
    Y: torch.Tensor             # raw outputs of the full run (frames, C_out, H', W')
    p_history: List[float]      # |p| at each iteration (before its Adam step)
    influence: torch.Tensor     # (frames,) float64, ||dp/dx_t||_1; 0 after tau
    extent: int                 # frames before t = 0 with non-negligible influence
    growth: float               # max_{t > tau} rms(y_t) / rms(y_tau)
    verdict: str                # "unstable", "inconclusive" or "no instability found"
    reason: str
    nonfinite_at: Optional[dict]
    tau: int
    settings: Dict = field(default_factory=dict)
    X_initial: Optional[torch.Tensor] = None  # the random starting sequence (for X - X0 plots)
    tail_rate: Optional[float] = None  # per-frame rate of the influence over the oldest frames

    @property
    def threshold(self) -> float:
        return self.settings["threshold"]


def _check_number(name, value, ok, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _run(model, X: torch.Tensor, n: int):
    """Outputs of frames 0..n-1 and the index of the first non-finite one (or None)."""
    state, ys, bad = None, [], None
    for t in range(n):
        y, state = model.step(X[t:t + 1], state)
        ys.append(y)
        if bad is None and not bool(torch.isfinite(y).all()):
            bad = t
            break
    return ys, bad


def _centre(y: torch.Tensor) -> torch.Tensor:
    return y[0, 0, y.shape[-2] // 2, y.shape[-1] // 2]


def tail_rate(influence, tau: int) -> Optional[float]:
    """Per-frame rate of ``influence`` (frames 0..tau, 0 the oldest) over its oldest
    ``max(2, ceil((tau + 1) / 4))`` frames: ``exp(-slope)`` of the least-squares line through
    ``log influence[t]`` (non-positive values left out; inf when one is not finite; None when
    fewer than two frames are left)."""
    values = torch.as_tensor(influence, dtype=torch.float64)[:tau + 1]
    k = max(2, math.ceil((tau + 1) / 4))
    tail = values[:k]
    if not bool(torch.isfinite(tail).all()):
        return math.inf
    keep = tail > 0
    if int(keep.sum()) < 2:
        return None
    t = torch.arange(k, dtype=torch.float64)[keep]
    y = tail[keep].log()
    slope = float(((t - t.mean()) * (y - y.mean())).sum() / (t - t.mean()).square().sum())
    return math.exp(-slope)


def trf_verdict(influence, tau: int, growth: float, nonfinite_at: Optional[dict] = None, *,
                threshold: float = 1e-3, growth_factor: float = 10.0, max_decay_rate: float = 0.99) -> Dict:
    """The TRF verdict from the measured numbers (see the module docstring): ``influence``
    (frames,) with frame ``tau`` the optimized output, the output ``growth`` after t = 0 and the
    first non-finite value, if any. Returns ``verdict``, ``reason``, ``extent`` and ``tail_rate``."""
    safe = torch.nan_to_num(torch.as_tensor(influence, dtype=torch.float64), nan=math.inf)
    peak = float(safe.max())
    hits = (safe >= threshold * peak).nonzero() if peak > 0 else None
    extent = tau - int(hits[0]) if hits is not None and len(hits) else 0
    rate = tail_rate(safe, tau) if extent == tau else None
    if nonfinite_at is not None:
        verdict, reason = "unstable", (f"non-finite value at iteration {nonfinite_at['iteration']}, "
                                       f"frame {nonfinite_at['frame']}")
    elif growth > growth_factor:
        verdict, reason = "unstable", f"outputs after t=0 grow by {growth:.3g} > growth_factor={growth_factor}"
    elif extent == tau and (rate is None or rate >= max_decay_rate):
        verdict, reason = "unstable", (
            f"unbounded TRF: it reaches the first frame and its tail does not decay (per-frame rate "
            f"{'undefined' if rate is None else format(rate, '.4g')} over the oldest frames >= "
            f"max_decay_rate={max_decay_rate}; first frame at {float(safe[0]) / peak:.3g} of the maximum)")
    elif extent == tau:
        verdict, reason = "inconclusive", (
            f"the TRF reaches the first frame (influence ratio {float(safe[0]) / peak:.3g} >= threshold={threshold}) "
            f"but its tail decays (per-frame rate {rate:.4g} < {max_decay_rate}): longer than the sequence, "
            "use more frames")
    else:
        verdict, reason = "no instability found", (f"TRF bounded: extent {extent} < tau={tau} frames, "
                                                   f"growth {growth:.3g} <= {growth_factor}")
    return {"verdict": verdict, "reason": reason, "extent": extent, "tail_rate": rate}


def trf(model, *, frames: int = 81, size: int = 64, channels: int = 3, iters: int = 500, lr: float = 0.05,
        seed: int = 0, device=None, progress: bool = True, threshold: float = 1e-3,
        growth_factor: float = 10.0, max_decay_rate: float = 0.99) -> TRFResult:
    """Temporal Receptive Field diagnostic (see the module docstring)."""
    if not callable(getattr(model, "step", None)):
        raise TypeError(f"trf needs a recurrent model following {_PROTOCOL}; "
                        f"{type(model).__name__} has no callable step (wrap plain callables with as_recurrent)")
    _check_number("frames", frames, lambda v: isinstance(v, int) and v >= 3 and v % 2 == 1, "an odd int >= 3")
    min_size = max(1, int(getattr(model, "min_size", None) or 1))
    _check_number("size", size, lambda v: isinstance(v, int) and v >= min_size, f"an int >= {min_size}")
    _check_number("channels", channels, lambda v: isinstance(v, int) and v >= 1, "an int >= 1")
    _check_number("iters", iters, lambda v: isinstance(v, int) and v >= 1, "an int >= 1")
    _check_number("lr", lr, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
    _check_number("threshold", threshold, lambda v: 0 < v <= 1, "in (0, 1]")
    _check_number("growth_factor", growth_factor, lambda v: v > 0, "> 0")
    _check_number("max_decay_rate", max_decay_rate, lambda v: 0 < v <= 1, "in (0, 1]")
    tau = frames // 2
    settings = dict(frames=frames, size=size, channels=channels, iters=iters, lr=lr, seed=seed,
                    threshold=threshold, growth_factor=growth_factor, max_decay_rate=max_decay_rate)

    with _as_found(model) as params:
        if device is None:
            device = params[0].device if params else torch.device("cpu")
        dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        gen = torch.Generator().manual_seed(seed)
        X = torch.rand(frames, channels, size, size, generator=gen, dtype=dtype).to(device).requires_grad_(True)
        X_initial = X.detach().cpu().clone()
        opt = torch.optim.Adam([X], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, sorted({max(1, int(0.6 * iters)), max(1, int(0.85 * iters))}), gamma=0.1)
        p_history: List[float] = []
        nonfinite_at = None
        for it in range(iters):
            opt.zero_grad(set_to_none=True)
            ys, bad = _run(model, X, tau + 1)
            if bad is None:
                p = _centre(ys[tau])
                (-p.abs()).backward()
                grad_ok = torch.isfinite(X.grad[:tau + 1].flatten(1)).all(1)
                if not bool(grad_ok.all()):
                    bad = int((~grad_ok).nonzero()[0])
            if bad is not None:  # X is still the last finite one: no step was taken
                nonfinite_at = dict(iteration=it, frame=bad)
                break
            p_history.append(float(p.detach().abs()))
            opt.step()
            with torch.no_grad():
                X.clamp_(0.0, 1.0)
            sched.step()
            if progress and (it % max(1, iters // 10) == 0 or it == iters - 1):
                print(f"trf: iteration {it + 1}/{iters} |p| = {p_history[-1]:.4g}", flush=True)
        X = X.detach()

        # influence at the final X: one backward through frames 0..tau
        Xg = X.clone().requires_grad_(True)
        ys, bad = _run(model, Xg, tau + 1)
        influence = torch.zeros(frames, dtype=torch.float64)
        if bad is None:
            _centre(ys[tau]).backward()
            influence[:tau + 1] = Xg.grad[:tau + 1].double().abs().flatten(1).sum(1).cpu()
        else:
            influence[:tau + 1] = math.inf
        with torch.no_grad():  # full forward run on the final X
            ys, bad_full = _run(model, X, frames)
        if nonfinite_at is None and bad_full is not None:
            nonfinite_at = dict(iteration=len(p_history), frame=bad_full)
        Y = torch.cat([y.detach() for y in ys]).cpu()

    if Y.shape[0] == frames and bool(torch.isfinite(Y).all()):
        rms = Y.double().flatten(1).square().mean(1).sqrt()
        after = float(rms[tau + 1:].max())
        growth = after / float(rms[tau]) if float(rms[tau]) > 0 else (math.inf if after > 0 else 1.0)
    else:
        growth = math.inf
    judged = trf_verdict(influence, tau, growth, nonfinite_at, threshold=threshold, growth_factor=growth_factor,
                         max_decay_rate=max_decay_rate)
    extent, verdict, reason = judged["extent"], judged["verdict"], judged["reason"]
    return TRFResult(X=X.cpu(), Y=Y, p_history=p_history, influence=influence, extent=extent, growth=growth,
                     verdict=verdict, reason=reason, nonfinite_at=nonfinite_at, tau=tau, settings=settings,
                     X_initial=X_initial, tail_rate=judged["tail_rate"])


def _psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, data range 1: ``(..., C, H, W) -> (...)`` (as training.metrics.psnr)."""
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
    mse = (output.double() - target.double()).square().mean((-3, -2, -1))
    return 10.0 * torch.log10(1.0 / mse)


def _decile(values: List[int], q: float) -> float:
    if not values:
        return math.inf
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


@torch.no_grad()
def instability_onsets(model, frames: Iterable[torch.Tensor], degrade: Callable[[torch.Tensor], tuple],
                       *, device="cpu", record: bool = True) -> Dict:
    """Stream ``frames`` (each ``(C, H, W)`` clean) through ``model.step``; whenever the PSNR of
    the raw (unclamped) output is below 0 or the output is not finite, count an instability and
    reset the state. Returns the count, the onsets (frames since the last reset), their 1st and
    9th deciles (``inf`` when none) and, if ``record``, the PSNR of every frame (clamped output).
    The model runs in eval mode and is left in the modes it had.
    """
    if device is None:
        device = "cpu"
    state, since_reset, onsets, trace, n = None, 0, [], [], 0
    with _as_found(model):
        for clean in frames:
            degraded, target = degrade(clean[None])
            out, state = model.step(degraded.to(device), state)
            out = out.cpu()
            since_reset += 1
            n += 1
            raw = _psnr(out, target)[0].item() if torch.isfinite(out).all() else -math.inf
            if record:
                trace.append(_psnr(torch.nan_to_num(out, 0.0, 1.0, 0.0).clamp(0, 1), target)[0].item())
            if not raw >= 0:
                onsets.append(since_reset)
                state, since_reset = None, 0
    return {"frames": n, "instabilities": len(onsets), "onsets": onsets,
            "onset_decile_1": _decile(onsets, 0.1), "onset_decile_9": _decile(onsets, 0.9),
            "psnr_trace": trace}
