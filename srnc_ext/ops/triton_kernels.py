"""Triton kernels of the stacked SRN-C ops: one launch for all ``L`` layers, one program per layer.

Each program walks its layer's ``(M, T)`` kernel in ``(BLOCK_M, T_PAD)`` tiles: a first pass for
the reductions, the per-layer scalar math of ``coefficients.py`` (``_coefficients`` and
``_coefficients_vjp`` are line-by-line transcriptions; ``VARIANT`` is a ``tl.constexpr``), and a
second pass for the elementwise write. Loads are cast to the accumulation dtype ``ACC`` at once
(float32 for half/bfloat16/float32 inputs, float64 for float64; bfloat16 arithmetic is wrong in
the interpreter otherwise), and ``TINY = torch.finfo(ACC).tiny`` as in the Python. The floor
(``floor = tau``) is a runtime argument behind the constexpr ``FLOORED = tau > 0``: ``tau = 0``
compiles exactly the kernels without it; ``_floored_coefficients`` / ``_floored_coefficients_vjp``
transcribe ``coefficients.coefficients`` / ``coefficients_vjp`` around the unfloored ones.

Importing this module never fails: without Triton (or with neither a GPU nor
``TRITON_INTERPRET=1``) ``AVAILABLE`` is False, ``REASON`` says why and the launchers raise.
``TRITON_INTERPRET`` is read when Triton is first imported, so set it before that.
"""
from __future__ import annotations  # kernel annotations stay strings: no ``tl`` needed to define them

import contextlib
import os
from typing import Tuple

import torch

from .contract import accumulation_dtype as acc_dtype  # float64 for float64 inputs, float32 otherwise

try:
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install (missing libs)
    triton = tl = None
    INTERPRET = False
    AVAILABLE, REASON = False, f"triton is not importable ({type(exc).__name__}: {exc})"
else:
    INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")
    AVAILABLE = INTERPRET or torch.cuda.is_available()
    REASON = "" if AVAILABLE else ("Triton needs a GPU, or TRITON_INTERPRET=1 (set before triton is imported) "
                                   "to run on the CPU")

Tensor = torch.Tensor
TILE = 2048  # elements of one (BLOCK_M, T_PAD) tile; BLOCK_M * T_PAD**2 <= 2 * TILE for the float64 K G


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@_jit
def _sqrt(x):
    # tl.sqrt is the fast approximate root for float32 on GPUs; sqrt_rn is IEEE (float32 only)
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@_jit
def _scalars(alpha, beta_rank, positions, eps, ACC: tl.constexpr, TINY: tl.constexpr):
    """The layer-independent scalars in ``ACC``, and the paper's ``numerator`` (float64 math, as Python does).

    The arguments are float64 kernel arguments on a GPU but plain Python floats in the interpreter:
    ``tl.full`` turns either into an exact float64 scalar (``tl.cast`` would round a Python float
    through float32 first).
    """
    alpha = tl.full([], alpha, tl.float64)
    beta_rank = tl.full([], beta_rank, tl.float64)
    positions = tl.full([], positions, tl.float64)
    eps = tl.full([], eps, tl.float64)
    numerator = tl.sqrt(tl.maximum(beta_rank - 1.0, TINY)) / tl.sqrt(positions)
    return alpha.to(ACC), beta_rank.to(ACC), numerator.to(ACC), eps.to(ACC)


@_jit
def _floor_scalars(alpha, floor, ACC: tl.constexpr):
    """``(tau, alpha / tau)`` in ``ACC``; ``alpha / tau`` from float64 math, rounded once (as the Python)."""
    floor = tl.full([], floor, tl.float64)
    base = tl.full([], alpha, tl.float64) / floor
    return floor.to(ACC), base.to(ACC)


@_jit
def _floor_weights(s, floor):
    """``coefficients._floor_weights``: ``(x, lambda, lambda')``."""
    x = tl.minimum(tl.maximum(s, 0.0) / floor, 1.0)
    lam = x * x
    dlam = tl.where(x < 1.0, 2.0 * x / floor, tl.zeros_like(x))
    return x, lam, dlam


@_jit
def _coefficients(s, q, p, c0, c1, alpha, beta_rank, numerator, eps, VARIANT: tl.constexpr, TINY: tl.constexpr):
    """``coefficients._unfloored_coefficients`` for one layer: ``(A, B)``."""
    d = s + eps
    if VARIANT == 0:
        a = alpha / d
        b = tl.zeros_like(s)
    elif VARIANT == 1:
        n2 = q / (d * d) - 2.0 * s / d + c0
        norm = _sqrt(tl.maximum(n2, TINY))
        gamma_c = tl.minimum(numerator / norm, 1.0)
        a = alpha * gamma_c / d
        b = alpha * (1.0 - gamma_c)
    else:
        de = tl.maximum(c0, TINY)
        c = s / (d * de)
        top = s * s / (d * d * de)
        rest = (q - s * s / de) / (d * d)
        gamma_c = tl.minimum(_sqrt(tl.maximum(beta_rank - top, TINY)) / _sqrt(tl.maximum(rest, TINY)), 1.0)
        t = c * (1.0 - gamma_c) * c1 + gamma_c * p / d
        f = 1.0 / (t + eps)
        a = alpha * gamma_c * f / d
        b = alpha * c * (1.0 - gamma_c) * f
    return a, b


@_jit
def _coefficients_vjp(s, q, p, c0, c1, g_a, g_b, alpha, beta_rank, numerator, eps,
                      VARIANT: tl.constexpr, TINY: tl.constexpr):
    """``coefficients._unfloored_coefficients_vjp`` for one layer: ``(g_s, g_q, g_p)``."""
    zero = tl.zeros_like(s)
    d = s + eps
    if VARIANT == 0:
        g_s = -g_a * alpha / (d * d)
        g_q = zero
        g_p = zero
    elif VARIANT == 1:
        n2 = q / (d * d) - 2.0 * s / d + c0
        norm = _sqrt(tl.maximum(n2, TINY))
        gamma = numerator / norm
        gamma_c = tl.minimum(gamma, 1.0)
        g_gamma_c = g_a * alpha / d - g_b * alpha
        g_d = -g_a * alpha * gamma_c / (d * d)
        g_gamma = tl.where(gamma < 1.0, g_gamma_c, zero)
        g_norm = -g_gamma * gamma / norm
        g_n2 = tl.where(n2 > TINY, g_norm / (2.0 * norm), zero)
        g_q = g_n2 / (d * d)
        g_d = g_d + g_n2 * (-2.0 * q / (d * d * d) + 2.0 * s / (d * d))
        g_s = g_n2 * (-2.0 / d) + g_d
        g_p = zero
    else:
        de = tl.maximum(c0, TINY)
        c = s / (d * de)
        top = s * s / (d * d * de)
        rest = (q - s * s / de) / (d * d)
        num2 = beta_rank - top
        num = _sqrt(tl.maximum(num2, TINY))
        den = _sqrt(tl.maximum(rest, TINY))
        gamma = num / den
        gamma_c = tl.minimum(gamma, 1.0)
        t = c * (1.0 - gamma_c) * c1 + gamma_c * p / d
        f = 1.0 / (t + eps)
        g_gamma_c = g_a * alpha * f / d - g_b * alpha * c * f
        g_f = g_a * alpha * gamma_c / d + g_b * alpha * c * (1.0 - gamma_c)
        g_d = -g_a * alpha * gamma_c * f / (d * d)
        g_c = g_b * alpha * (1.0 - gamma_c) * f
        g_t = -g_f * f * f
        g_c = g_c + g_t * (1.0 - gamma_c) * c1
        g_gamma_c = g_gamma_c + g_t * (p / d - c * c1)
        g_p = g_t * gamma_c / d
        g_d = g_d - g_t * gamma_c * p / (d * d)
        g_gamma = tl.where(gamma < 1.0, g_gamma_c, zero)
        g_num2 = tl.where(num2 > TINY, g_gamma / den / (2.0 * num), zero)
        g_rest = tl.where(rest > TINY, -g_gamma * num / (den * den) / (2.0 * den), zero)
        g_top = -g_num2
        g_q = g_rest / (d * d)
        g_s = g_rest * (-2.0 * s / de) / (d * d) + g_top * 2.0 * s / (d * d * de) + g_c / (d * de)
        g_d = (g_d - g_rest * 2.0 * (q - s * s / de) / (d * d * d) - g_top * 2.0 * s * s / (d * d * d * de)
               - g_c * s / (d * d * de))
        g_s = g_s + g_d
    return g_s, g_q, g_p


@_jit
def _floored_coefficients(s, q, p, c0, c1, alpha, beta_rank, numerator, eps, floor, base,
                          VARIANT: tl.constexpr, TINY: tl.constexpr):
    """``coefficients.coefficients`` with ``floor = tau > 0`` for one layer: ``(A', B')``."""
    a, b = _coefficients(s, q, p, c0, c1, alpha, beta_rank, numerator, eps, VARIANT, TINY)
    _, lam, _ = _floor_weights(s, floor)
    zero = tl.zeros_like(s)
    live = lam > 0.0
    a = tl.where(live, a, zero)
    b = tl.where(live, b, zero)
    return lam * a + (1.0 - lam) * base, lam * b


@_jit
def _floored_coefficients_vjp(s, q, p, c0, c1, g_a, g_b, alpha, beta_rank, numerator, eps, floor, base,
                              VARIANT: tl.constexpr, TINY: tl.constexpr):
    """``coefficients.coefficients_vjp`` with ``floor = tau > 0`` for one layer: ``(g_s, g_q, g_p)``."""
    x, lam, dlam = _floor_weights(s, floor)
    zero = tl.zeros_like(s)
    live = lam > 0.0
    a, b = _coefficients(s, q, p, c0, c1, alpha, beta_rank, numerator, eps, VARIANT, TINY)
    a = tl.where(live, a, zero)
    b = tl.where(live, b, zero)
    g_s, g_q, g_p = _coefficients_vjp(s, q, p, c0, c1, lam * g_a, lam * g_b, alpha, beta_rank, numerator, eps,
                                      VARIANT, TINY)
    g_s = tl.where(live, g_s, zero)
    g_q = tl.where(live, g_q, zero)
    g_p = tl.where(live, g_p, zero)
    g_lam = tl.where(x < 1.0, g_a * (a - base) + g_b * b, zero)
    return g_s + dlam * g_lam, g_q, g_p


@_jit
def _tile(layer, m0, M, T, BLOCK_M: tl.constexpr, T_PAD: tl.constexpr):
    """Offsets and mask of the ``(BLOCK_M, T_PAD)`` tile at slice ``m0`` of ``layer`` in a contiguous (L, M, T)."""
    rows = m0 + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, T_PAD)[None, :]
    return layer.to(tl.int64) * M * T + rows * T + cols, (rows < M) & (cols < T)


@_jit
def _load(ptr, offs, mask, ACC: tl.constexpr):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@_jit
def _load_gram(g_ptr, T, T_PAD: tl.constexpr, ACC: tl.constexpr):
    ra = tl.arange(0, T_PAD)[:, None]
    rb = tl.arange(0, T_PAD)[None, :]
    return tl.load(g_ptr + ra * T + rb, mask=(ra < T) & (rb < T), other=0.0).to(ACC)


@_jit
def _times_gram(k, g, ACC: tl.constexpr):
    """``K @ G`` for a tile: tl.dot (IEEE fp32, not TF32) in float32; broadcast-multiply + sum in float64."""
    if ACC == tl.float32:
        return tl.dot(k, g, input_precision="ieee")
    else:
        return tl.sum(k[:, :, None] * g[None, :, :], axis=1)


# ---------------------------------------------------------------------------------------------
# kernels (grid (L,))
# ---------------------------------------------------------------------------------------------
@_jit
def _normalize_segments_kernel(x_ptr, f_ptr, out_ptr, eps: tl.float64, N, INNER, STRIDE,
                               ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    # segment element i of layer l lies at (i // INNER) * STRIDE + l * INNER + i % INNER
    base = tl.program_id(0).to(tl.int64) * INNER
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), ACC)
    for n0 in range(0, N, BLOCK_N):
        i = n0 + cols
        x = _load(x_ptr + base, (i // INNER) * STRIDE + i % INNER, i < N, ACC)
        acc += x * x
    norm = _sqrt(tl.sum(acc, axis=0))
    eps = tl.full([], eps, tl.float64).to(ACC)
    keep = norm > eps
    denom = tl.maximum(norm, eps)
    for n0 in range(0, N, BLOCK_N):
        i = n0 + cols
        mask = i < N
        offs = (i // INNER) * STRIDE + i % INNER
        x = _load(x_ptr + base, offs, mask, ACC)
        f = _load(f_ptr + base, offs, mask, ACC)
        tl.store(out_ptr + base + offs, tl.where(keep, x / denom, f).to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _reweight_forward_kernel(k_ptr, s1_ptr, v_ptr, so_ptr, g_ptr, c_ptr, out_ptr, stats_ptr,
                             alpha: tl.float64, beta_rank: tl.float64, positions: tl.float64, eps: tl.float64,
                             floor: tl.float64, M, T, VARIANT: tl.constexpr, FLOORED: tl.constexpr,
                             ACC: tl.constexpr, TINY: tl.constexpr, BLOCK_M: tl.constexpr, T_PAD: tl.constexpr):
    layer = tl.program_id(0)
    if VARIANT == 2:
        g = _load_gram(g_ptr, T, T_PAD, ACC)
    acc_s = tl.zeros((BLOCK_M, T_PAD), ACC)
    acc_q = tl.zeros((BLOCK_M, T_PAD), ACC)
    acc_p = tl.zeros((BLOCK_M, T_PAD), ACC)
    for m0 in range(0, M, BLOCK_M):
        offs, mask = _tile(layer, m0, M, T, BLOCK_M, T_PAD)
        k = _load(k_ptr, offs, mask, ACC)
        acc_s += k * _load(s1_ptr, offs, mask, ACC)
        if VARIANT == 2:
            acc_q += _times_gram(k, g, ACC) * k
            acc_p += k * _load(so_ptr, offs, mask, ACC)
        else:
            acc_q += k * k
    s = tl.sum(tl.sum(acc_s, axis=1), axis=0)
    q = tl.sum(tl.sum(acc_q, axis=1), axis=0)
    p = tl.sum(tl.sum(acc_p, axis=1), axis=0)
    c0 = tl.load(c_ptr + 2 * layer).to(ACC)
    c1 = tl.load(c_ptr + 2 * layer + 1).to(ACC)
    if FLOORED:
        tau, base = _floor_scalars(alpha, floor, ACC)
    alpha, beta_rank, numerator, eps = _scalars(alpha, beta_rank, positions, eps, ACC, TINY)
    if FLOORED:
        a, b = _floored_coefficients(s, q, p, c0, c1, alpha, beta_rank, numerator, eps, tau, base, VARIANT, TINY)
    else:
        a, b = _coefficients(s, q, p, c0, c1, alpha, beta_rank, numerator, eps, VARIANT, TINY)
    for m0 in range(0, M, BLOCK_M):
        offs, mask = _tile(layer, m0, M, T, BLOCK_M, T_PAD)
        out = a * _load(k_ptr, offs, mask, ACC) + b * _load(v_ptr, offs, mask, ACC)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + 3 * layer, s)
    tl.store(stats_ptr + 3 * layer + 1, q)
    tl.store(stats_ptr + 3 * layer + 2, p)


@_jit
def _reweight_backward_kernel(gr_ptr, k_ptr, s1_ptr, v_ptr, so_ptr, g_ptr, c_ptr, st_ptr, out_ptr,
                              alpha: tl.float64, beta_rank: tl.float64, positions: tl.float64, eps: tl.float64,
                              floor: tl.float64, M, T, VARIANT: tl.constexpr, FLOORED: tl.constexpr,
                              ACC: tl.constexpr, TINY: tl.constexpr, BLOCK_M: tl.constexpr, T_PAD: tl.constexpr):
    layer = tl.program_id(0)
    acc_a = tl.zeros((BLOCK_M, T_PAD), ACC)
    acc_b = tl.zeros((BLOCK_M, T_PAD), ACC)
    for m0 in range(0, M, BLOCK_M):
        offs, mask = _tile(layer, m0, M, T, BLOCK_M, T_PAD)
        gr = _load(gr_ptr, offs, mask, ACC)
        acc_a += gr * _load(k_ptr, offs, mask, ACC)
        acc_b += gr * _load(v_ptr, offs, mask, ACC)
    g_a = tl.sum(tl.sum(acc_a, axis=1), axis=0)
    g_b = tl.sum(tl.sum(acc_b, axis=1), axis=0)
    s = tl.load(st_ptr + 3 * layer).to(ACC)
    q = tl.load(st_ptr + 3 * layer + 1).to(ACC)
    p = tl.load(st_ptr + 3 * layer + 2).to(ACC)
    c0 = tl.load(c_ptr + 2 * layer).to(ACC)
    c1 = tl.load(c_ptr + 2 * layer + 1).to(ACC)
    if FLOORED:
        tau, base = _floor_scalars(alpha, floor, ACC)
    alpha, beta_rank, numerator, eps = _scalars(alpha, beta_rank, positions, eps, ACC, TINY)
    if FLOORED:
        a, _ = _floored_coefficients(s, q, p, c0, c1, alpha, beta_rank, numerator, eps, tau, base, VARIANT, TINY)
        g_s, g_q, g_p = _floored_coefficients_vjp(s, q, p, c0, c1, g_a, g_b, alpha, beta_rank, numerator, eps, tau,
                                                  base, VARIANT, TINY)
    else:
        a, _ = _coefficients(s, q, p, c0, c1, alpha, beta_rank, numerator, eps, VARIANT, TINY)
        g_s, g_q, g_p = _coefficients_vjp(s, q, p, c0, c1, g_a, g_b, alpha, beta_rank, numerator, eps, VARIANT, TINY)
    if VARIANT == 2:
        g = _load_gram(g_ptr, T, T_PAD, ACC)
    for m0 in range(0, M, BLOCK_M):
        offs, mask = _tile(layer, m0, M, T, BLOCK_M, T_PAD)
        k = _load(k_ptr, offs, mask, ACC)
        out = a * _load(gr_ptr, offs, mask, ACC) + g_s * _load(s1_ptr, offs, mask, ACC)
        if VARIANT == 2:
            out += (2.0 * g_q) * _times_gram(k, g, ACC) + g_p * _load(so_ptr, offs, mask, ACC)
        else:
            out += (2.0 * g_q) * k
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers (inputs validated by contract.py; here only made contiguous)
# ---------------------------------------------------------------------------------------------
def _tl_acc(dtype: torch.dtype):
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def _launch_context(device: torch.device):
    """Checks that Triton can run on ``device``; the launch must happen with it current (Triton launches
    on the current CUDA device, whatever the arguments' device)."""
    if not AVAILABLE:
        raise RuntimeError(f"srnc_ext Triton backend unavailable: {REASON}")
    if device.type == "cuda":
        return torch.cuda.device(device)
    if not INTERPRET:
        raise RuntimeError(f"srnc_ext Triton backend: tensors on {device} need TRITON_INTERPRET=1 "
                           "(set before triton is imported); without it only CUDA tensors run")
    return contextlib.nullcontext()


def _meta(dtype: torch.dtype, M: int, T: int, variant: int, floor: float) -> dict:
    """Constexprs of the reweight kernels: tile shape, accumulation dtype and its ``tiny``, whether floored."""
    acc = acc_dtype(dtype)
    if variant == 2 and acc == torch.float32:  # tl.dot needs every dim >= 16
        t_pad = max(16, triton.next_power_of_2(T))
        block_m = max(16, min(triton.next_power_of_2(M), TILE // t_pad))
    else:
        t_pad = triton.next_power_of_2(T)
        budget = 2 * TILE // t_pad if variant == 2 else TILE  # float64 K G holds (BLOCK_M, T_PAD, T_PAD)
        block_m = max(1, min(triton.next_power_of_2(M), budget // t_pad))
    return dict(VARIANT=variant, FLOORED=bool(floor > 0.0), ACC=_tl_acc(dtype), TINY=torch.finfo(acc).tiny,
                BLOCK_M=block_m, T_PAD=t_pad)


def _empty(shape, like: Tensor) -> Tensor:
    """Output buffer in ``like``'s dtype; float32 for bfloat16 in the interpreter, which casts
    float32 -> bfloat16 by truncation (up to 1 ulp off; GPUs round to nearest even): torch rounds after."""
    interpreted_bf16 = INTERPRET and like.dtype == torch.bfloat16
    return torch.empty(shape, dtype=torch.float32 if interpreted_bf16 else like.dtype, device=like.device)


def _scalars_args(alpha, beta_rank, positions, eps, floor) -> Tuple[float, float, float, float, float]:
    return float(alpha), float(beta_rank), float(positions), float(eps), float(floor)


def normalize_segments(x: Tensor, fallback: Tensor, eps: float) -> Tensor:
    x, fallback = x.contiguous(), fallback.contiguous()
    out = _empty(x.shape, x)
    P, L, M = x.shape if x.dim() == 3 else (1, *x.shape)
    with _launch_context(x.device):
        if out.numel():
            _normalize_segments_kernel[(L,)](x, fallback, out, float(eps), P * M, M, L * M, ACC=_tl_acc(x.dtype),
                                             BLOCK_N=min(triton.next_power_of_2(P * M), 4096))
    return out.to(x.dtype)


def reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps,
                     variant, floor=0.0) -> Tuple[Tensor, Tensor]:
    L, M, T = kernel.shape
    tensors = [t.contiguous() for t in (kernel, s1, direction, s1_out, gram, consts)]
    out = _empty((L, M, T), kernel)
    stats = torch.empty((L, 3), dtype=acc_dtype(kernel.dtype), device=kernel.device)
    with _launch_context(kernel.device):
        if L:
            _reweight_forward_kernel[(L,)](*tensors, out, stats,
                                           *_scalars_args(alpha, beta_rank, positions, eps, floor),
                                           M, T, **_meta(kernel.dtype, M, T, variant, floor))
    return out.to(kernel.dtype), stats


def reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank, positions, eps,
                      variant, floor=0.0) -> Tensor:
    L, M, T = kernel.shape
    tensors = [t.contiguous() for t in (grad, kernel, s1, direction, s1_out, gram, consts, stats)]
    out = _empty((L, M, T), kernel)
    with _launch_context(kernel.device):
        if L:
            _reweight_backward_kernel[(L,)](*tensors, out, *_scalars_args(alpha, beta_rank, positions, eps, floor),
                                            M, T, **_meta(kernel.dtype, M, T, variant, floor))
    return out.to(kernel.dtype)
