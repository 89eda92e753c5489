"""Batched, once-per-step refresh of the power iterations of many SRN-C layers.

Layers whose operators share a signature (``ConvGeometry``: shapes, stride, padding, dilation,
groups, padding mode, input size) and SRN-C settings are refreshed together: their kernels are
stacked into one grouped convolution (``groups * L``), so each power-iteration step costs one
grouped conv, one grouped transposed conv and one segmented normalization for the whole group,
and the rank-one kernels of all L layers come from one grouped weight-gradient conv. A group
whose vectors exceed ``MAX_GROUP_VECTOR_BYTES`` on its device runs in consecutive chunks (on
the CPU a grouped conv over many large layers is slower per layer than smaller groups).

It runs automatically after every ``torch.optim.Optimizer.step()`` for the training-mode
layers whose weights that optimizer holds (a global step post-hook), batched across them;
a layer whose weight changed otherwise (``load_state_dict``, an in-place edit, a custom
update rule) refreshes alone on its next training-mode forward (eager mode).
``refresh(model)`` is the explicit entry point.

On the CPU the stacked vectors are kept channels-last (``vector_format``): oneDNN runs the batch-1
grouped convolutions of a refresh about twice as fast in that layout, and ``normalize_segments``
reads a channels-last stack of L layers' vectors in place as ``(H * W, L, C)`` segments.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref
from collections import defaultdict
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .ops import VARIANT_PROJECTED, prepare_constants
from .conv_operator import ConvGeometry, is_channels_last
from .power_iteration import PowerIterationState, normal_tensors
from .precision import no_autocast

_LAYERS: "weakref.WeakSet" = weakref.WeakSet()
# first layer of a group -> {vector name: (buffer keys, stacked tensor)}: a group's stacked vectors
# from its last refresh, reused while every layer's buffer is that same, unmodified tensor.
_STACKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
BATCHED = True  # False: one group per layer (the per-layer path; for tests and benchmarks)
# Per device type, the most bytes of power-iteration vectors (u and v of every layer) one grouped
# convolution of a refresh takes; a signature group beyond it is refreshed in chunks. On the CPU a
# grouped conv over many large layers is slower per layer than the layers one by one: one power-
# iteration step of 60 layers 64->64 3x3 at 64x64 (2 MiB of vectors each; 1 and 2 threads, torch
# 2.14.1, AMD EPYC, 1 MiB L2 per core, 32 MiB L3) took 1.66-1.90 s (1 thread) and 0.91-0.98 s
# (2 threads) as one group against 1.18-1.30 s and 0.61-0.66 s in chunks of 8 (16 MiB), about what
# chunks of 2 or 4 or single layers took; ten 32->32 layers at 32x32 (256 KiB each) are fastest as
# one group (16-21 ms against 17-25 ms alone). Unmeasured devices take one group per signature.
MAX_GROUP_VECTOR_BYTES = {"cpu": 16 * 2**20}
DEFAULT_MAX_ITERATIONS = 1000  # the most steps of a refresh with a tolerance and no iteration count


def vector_format(device, spatial_dims: int = 2) -> torch.memory_format:
    """Memory format of the power-iteration vectors of a layer with ``spatial_dims`` on ``device``.

    Channels-last for 2-D layers on the CPU: a 12-group batch-1 conv (32 channels per group, 32x32,
    2 threads) took 2.74 ms on NCHW and 1.11 ms on channels-last inputs (oneDNN, torch 2.14.1).
    Contiguous elsewhere (cuDNN's preference for float32 batch-1 grouped convs, and the 1-D and 3-D
    layouts, are unmeasured here).
    """
    cpu = torch.device(device).type == "cpu"
    return torch.channels_last if cpu and spatial_dims == 2 else torch.contiguous_format


def register(layer) -> None:
    _LAYERS.add(layer)


@functools.lru_cache(maxsize=256)
def stacked(geometry: ConvGeometry, n_layers: int) -> ConvGeometry:
    """The geometry of ``n_layers`` same-signature convs run side by side as one grouped conv."""
    return dataclasses.replace(
        geometry,
        in_channels=geometry.in_channels * n_layers,
        out_channels=geometry.out_channels * n_layers,
        groups=geometry.groups * n_layers,
    )


def _layers_of(model_or_layers) -> List[nn.Module]:
    """The SRN-C layers of a model (or of an iterable of modules): those with a power-iteration state."""
    modules = model_or_layers.modules() if isinstance(model_or_layers, nn.Module) else model_or_layers
    return [m for m in modules if isinstance(getattr(m, "power_iteration", None), PowerIterationState)]


def refresh(model_or_layers, n_iterations: Optional[int] = None, *, tol: Optional[float] = None) -> int:
    """Refresh every materialized SRN-C layer of a model (or an iterable of layers), batched by
    signature; ``n_iterations`` defaults to each layer's ``n_power_iterations`` (with ``tol``: the
    most steps, default 1000, until every layer's residual is at most ``tol``). Returns the number
    of layers refreshed."""
    layers = [m for m in _layers_of(model_or_layers) if m.materialized]
    refresh_layers(layers, n_iterations, tol=tol)
    return len(layers)


def mark_fresh(model_or_layers) -> int:
    """Declare the current power-iteration state fresh for the current weights, without iterating.

    For in-place copies that bump the weights' version counters without changing what the
    vectors were refreshed for, e.g. ``DistributedDataParallel``'s initial broadcast of rank 0's
    weights *and* buffers. Returns the number of layers marked.
    """
    layers = [m for m in _layers_of(model_or_layers) if m.materialized]
    for layer in layers:
        layer.power_iteration.mark_fresh(layer.weight)
    return len(layers)


def _check_refresh_arguments(n_iterations, tol) -> None:
    if n_iterations is not None and (isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1):
        raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf):
        raise ValueError(f"tol must be None or a finite number > 0, got {tol!r}")


def refresh_layers(layers: Iterable[nn.Module], n_iterations: Optional[int] = None, mark_refreshed: bool = True,
                   *, tol: Optional[float] = None, warn: bool = True) -> None:
    """Refresh ``layers`` (materialized), one batched refresh per signature. Layers on the meta
    device hold no values and are skipped. ``warn``: warn when ``tol`` was not reached."""
    _check_refresh_arguments(n_iterations, tol)
    groups: Dict[tuple, list] = defaultdict(list)
    for layer in layers:
        if layer.weight.is_meta:
            continue
        n = n_iterations or (DEFAULT_MAX_ITERATIONS if tol is not None else layer.n_power_iterations)
        groups[(layer.signature() if BATCHED else id(layer), n)].append(layer)
    with normal_tensors():  # buffers refreshed inside inference mode stay usable outside it
        for (_, n), members in groups.items():
            for chunk in _chunks(members):
                _refresh_group(chunk, n, mark_refreshed, tol, warn)


def _chunks(layers: List[nn.Module]) -> List[List[nn.Module]]:
    """Same-signature ``layers`` split into runs of at most ``MAX_GROUP_VECTOR_BYTES`` of vectors
    (at least one layer each), in order; the whole list where the device has no bound."""
    first = layers[0]
    cap = MAX_GROUP_VECTOR_BYTES.get(first.weight.device.type)
    if cap is None or len(layers) == 1:
        return [layers]
    geometry = first.geometry
    per_layer = (geometry.dim_in + geometry.dim_out) * first.compute_dtype.itemsize
    size = max(1, cap // per_layer)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


@torch.no_grad()
def _refresh_group(layers: List[nn.Module], n_iterations: int, mark_refreshed: bool = True,
                   tol: Optional[float] = None, warn: bool = True) -> None:
    """One batched refresh; buffers of the layers change only if all of it succeeds."""
    first, n = layers[0], len(layers)
    geometry, eps, code = first.geometry, first.eps, first.variant_code
    taps = geometry.taps
    weights = [m.weight for m in layers]
    states = [m.power_iteration for m in layers]
    ops = first.ops
    group = stacked(geometry, n)
    gram, gram_pinv = first._buffers["_gram"], first._buffers["_gram_pinv"]
    with no_autocast(first.weight):
        # (L*C_out, C_in/g, *k); a Linear's (out, in) matrix is the one-tap kernel (out, in, 1)
        kernel = torch.cat([w.detach().to(first.compute_dtype).reshape(geometry.weight_shape) for w in weights])
        # a sum is finite iff every entry is (up to overflow, which the exact check sorts out): one cheap pass
        if not bool(torch.isfinite(kernel.sum())) and not bool(torch.isfinite(kernel).all()):
            bad = [i for i, w in enumerate(weights) if not bool(torch.isfinite(w).all())]
            raise ValueError(f"weight contains NaN or inf (layers {bad} of this refresh group); "
                             "the power-iteration vectors were not updated")
        fmt = vector_format(kernel.device, geometry.ndim)
        cached = _STACKS.get(first, {})
        u, v, residual = _power_iteration(ops, group, kernel, _stack(states, "u", fmt, cached),
                                          _stack(states, "v", fmt, cached), n_iterations, n, eps, tol)
        s1 = group.kernel_grad(v, u).reshape(n, -1, taps)
        new = {"u": u, "v": v}
        s1_out, direction = s1, None
        if code == VARIANT_PROJECTED:
            scaled, direction, consts, stats = reweighted_kernels(first, kernel.reshape(n, -1, taps), s1, gram, gram_pinv)
            if not all(state.floor_warned for state in states):
                _check_floor(layers, stats[:, 0], consts[:, 0], eps, first.op_scalars()[1])
            u_out, v_out, residual_out = _power_iteration(
                ops, group, scaled.reshape(kernel.shape), _stack(states, "u_out", fmt, cached),
                _stack(states, "v_out", fmt, cached), n_iterations, n, eps, tol)
            s1_out = group.kernel_grad(v_out, u_out).reshape(n, -1, taps)
            new.update(u_out=u_out, v_out=v_out)
            residual = torch.stack([residual, residual_out], 1)
        else:
            residual = residual[:, None]
        direction, consts = prepare_constants(s1, s1_out, gram_pinv, code, direction)
    chunks = {name: value.chunk(n, 1) for name, value in new.items()}
    pairs = [pair for i, state in enumerate(states) for pair in state.commit_pairs(
        {name: chunk[i] for name, chunk in chunks.items()}, s1[i : i + 1], direction[i : i + 1],
        s1_out[i : i + 1], consts[i : i + 1])]
    torch._foreach_copy_([buffer for buffer, _ in pairs], [value for _, value in pairs])  # one call, not 6 L
    for i, (layer, state) in enumerate(zip(layers, states)):
        state.committed(layer.weight if mark_refreshed else None, residual[i])
    _STACKS[first] = {name: (_buffer_keys(states, name), value) for name, value in new.items()}
    if warn and tol is not None and bool((residual > tol).any()):
        warnings.warn(f"refresh: the power-iteration residual is {float(residual.max()):.3g} > tol={tol} after "
                      f"{n_iterations} iterations (a slowly converging top of the spectrum, or a tol below the "
                      f"precision of {first.compute_dtype}); pass more iterations", RuntimeWarning, stacklevel=4)


def reweighted_kernels(first, kernels: torch.Tensor, s1: torch.Tensor, gram: torch.Tensor, gram_pinv: torch.Tensor):
    """``(scaled (L, M, T), direction, consts, stats)``: the projected variant's reweighted kernels of
    same-signature layers (``first`` one of them), from their kernels and rank-one kernels ``S1``.

    With S1 standing in for S1_out the op returns alpha K_rw / (<K,S1>/(<K,S1>+eps) + eps), a
    positive multiple of K_rw: all the second power iteration (and its start) needs, so one set of
    scalars serves layers with other alphas (without the floor, which would blend in the raw kernel
    where sigma_1 is below it).
    """
    direction, consts = prepare_constants(s1, s1, gram_pinv, VARIANT_PROJECTED)
    scaled, stats = first.ops.reweight_forward(kernels, s1, direction, s1, gram, consts, *first.op_scalars()[:5])
    return scaled, direction, consts, stats


def _check_floor(layers, s: torch.Tensor, c0: torch.Tensor, eps: float, beta_rank: float) -> None:
    """Warn for the layers whose target stable rank ``beta_rank`` is at or below the reweighting's
    floor ``||W(S1 part of K~)||_F^2 = s^2 / ((s + eps)^2 <S1, D>)`` (the op's ``top``), where gamma
    underflows (``srnc_ext.ops.coefficients``)."""
    floor = s * s / ((s + eps) ** 2 * c0.clamp_min(torch.finfo(s.dtype).tiny))
    hit = floor >= beta_rank
    if bool(hit.any()):
        for layer, flagged, value in zip(layers, hit.tolist(), floor.tolist()):
            if flagged:
                layer.warn_floor(value)


def _buffer_keys(states, name: str) -> tuple:
    """Each layer's ``name`` buffer with its version counter (any write or replacement changes this)."""
    return tuple((buffer, buffer._version) for buffer in (state.vector(name) for state in states))


def _stack(states, name: str, fmt: torch.memory_format, cached: dict) -> torch.Tensor:
    """``(1, L*C, H, W)``: the layers' ``(1, C, H, W)`` ``name`` vectors side by side, in ``fmt``.

    The group's last refresh result when the buffers still hold exactly it (saves a copy of all
    vectors per refresh); the stacked copy is never written to.
    """
    keys, stacked = cached.get(name, ((), None))
    current = [state.vector(name) for state in states]
    if (stacked is not None and stacked.is_contiguous(memory_format=fmt) and len(keys) == len(current)
            and all(b is buffer and version == buffer._version for (b, version), buffer in zip(keys, current))):
        return stacked
    return torch.cat(current, 1).contiguous(memory_format=fmt)


def _normalized(ops, x: torch.Tensor, fallback: torch.Tensor, n_layers: int, eps: float) -> torch.Tensor:
    """Each layer's block of ``x (1, L*C, H, W)`` divided by its norm (``fallback``'s block where
    that is <= eps), in ``x``'s memory format, with one ``normalize_segments`` call."""
    if is_channels_last(x):
        _, c, h, w = x.shape
        fallback = fallback.contiguous(memory_format=torch.channels_last)
        segments = lambda t: t.permute(0, 2, 3, 1).reshape(h * w, n_layers, c // n_layers)  # noqa: E731  (views)
        out = ops.normalize_segments(segments(x), segments(fallback), eps)
        return out.reshape(1, h, w, c).permute(0, 3, 1, 2)
    return ops.normalize_segments(x.reshape(n_layers, -1), fallback.reshape(n_layers, -1), eps).reshape(x.shape)


def _segment_norms(x: torch.Tensor, n_layers: int) -> torch.Tensor:
    """``(L,)``: the norm of each layer's block of ``x (1, L*C, H, W)``.

    A channels-last stack is an ``(H*W, L*C)`` matrix in memory: a column sum of squares, then a sum
    per layer (0.10 ms for 10 layers of 32 channels at 32x32 on one thread, against 0.39 ms for
    ``vector_norm`` over the ``(H*W, L, C)`` view's dims (0, 2)).
    """
    if is_channels_last(x):
        _, c, h, w = x.shape
        per_channel = x.permute(0, 2, 3, 1).reshape(h * w, c).square().sum(0)
    else:
        per_channel = x.reshape(x.shape[1], -1).square().sum(1)
    return per_channel.reshape(n_layers, -1).sum(1).sqrt()


def _residual(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, n_layers: int, eps: float) -> torch.Tensor:
    """``(L,)``: ``||W v - sigma u|| / sigma`` for ``x = W^T u``, ``v = x / sigma``, ``sigma = ||x||``,
    ``y = W v``: the residual of the singular triplet ``(sigma, u, v)`` (its other half,
    ``W^T u - sigma v``, is 0 by construction), 0 for a zero operator."""
    sigma = _segment_norms(x, n_layers)
    scale = sigma.repeat_interleave(y.shape[1] // n_layers).reshape(1, -1, *(1,) * (y.dim() - 2))
    miss = _segment_norms(torch.addcmul(y, scale, u, value=-1.0), n_layers)  # y - sigma u: 0.07 ms, y - scale * u 1.4
    return torch.where(sigma > eps, miss / sigma.clamp_min(eps), torch.zeros_like(sigma))


def _power_iteration(ops, group, kernel, u, v, n_iterations, n_layers, eps, tol=None):
    """``n_iterations`` steps (fewer when every layer's residual reaches ``tol``): ``(u, v, residual)``."""
    residual = None
    for step in range(n_iterations):
        x = group.adjoint(kernel, u)
        v = _normalized(ops, x, v, n_layers, eps)
        y = group.apply(kernel, v)
        if tol is not None or step == n_iterations - 1:
            residual = _residual(x, y, u, n_layers, eps)
        u = _normalized(ops, y, u, n_layers, eps)
        if tol is not None and bool((residual <= tol).all()):
            break
    return u, v, residual


def _optimizer_step_post_hook(optimizer, args, kwargs) -> None:
    if not _LAYERS:
        return
    by_weight = {id(m.weight): m for m in list(_LAYERS)}  # ids of live parameters held by the optimizer
    # in the optimizer's parameter order: the grouping (and its float rounding) is reproducible
    held = [by_weight.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    stale = [m for m in held if m is not None and m.training and m.materialized and m.is_stale()]
    due = []
    for layer in stale:  # refresh_every = k: k - 1 steps keep the last vectors (declared fresh), the k-th refreshes
        state = layer.power_iteration
        if state.lagged_steps + 1 < layer.refresh_every:
            state.lagged_steps += 1
            state.mark_fresh(layer.weight)
        else:
            due.append(layer)
    if due:
        refresh_layers(due)


_HOOK = register_optimizer_step_post_hook(_optimizer_step_post_hook)
