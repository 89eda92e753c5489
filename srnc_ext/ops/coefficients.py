"""Per-layer scalar math of the fused SRN-C reweighting: the shared specification of every backend.

For L stacked layers with flattened kernels ``K (L, M, T)`` (``M = C_out * C_in/groups``
kernel slices, ``T = kh * kw`` taps), every variant's effective weight has the form

    out_l = A_l * K_l + B_l * V_l

where ``V`` is a constant kernel (``S1`` for the paper variant, ``D = S1 G^+`` for the
projected one) and the two scalars ``A_l, B_l`` depend on ``K_l`` only through three
reductions:

    s = <K, S1>,   q = <K, G K> (paper: ||K||^2),   p = <K, S1_out>  (projected only).

Per-layer constants ``c0, c1`` (paper: ``c0 = ||S1||^2``; projected: ``c0 = <S1, D>``,
``c1 = <D, S1_out>``) and layer-independent ``alpha, beta_rank = beta * r, positions = H'W',
eps`` complete the inputs. The backward is closed form: with ``gA = <g, K>``, ``gB = <g, V>``
and ``(gs, gq, gp) = coefficients_vjp(...)``,

    grad_K = A * g + gs * S1 + gq * 2 G K + gp * S1_out.

Variants (``VARIANT_*``): 0 = spectral normalization only (beta = 1), 1 = paper (Algorithm 2
literally), 2 = projected with renormalization. Clamps use ``tiny = finfo(dtype).tiny``
exactly like ``srnc_ext.reference``; ``min(gamma, 1)`` passes gradient only where gamma < 1.

The floor (``floor = tau >= 0``, per call; 0 is the formulas above, exactly): SRN-C divides by
``s``, so at and near an all-zero kernel (a zero-initialized layer) the weight's gradient is about
``alpha / eps``. With ``tau > 0``, ``lambda = min(1, max(s, 0) / tau)^2`` and ``(A, B)`` the
coefficients above,

    A' = lambda A + (1 - lambda) alpha / tau,   B' = lambda B,

i.e. ``out = lambda R(K) + (1 - lambda) (alpha / tau) K`` with ``R(K) = A K + B V``: unchanged for
``s >= tau``, continuous at ``s = tau`` (and C^1 there for SN), ``sigma_1(out) <= lambda alpha +
(1 - lambda) alpha s / tau <= alpha`` wherever ``sigma_1(R) = alpha`` (triangle inequality), and
``out ~ (alpha / tau) K`` near ``K = 0``. ``(A, B)`` and their VJP are evaluated only where
``lambda > 0`` (0 elsewhere: no ``0 * inf``), the VJP with the incoming gradients already scaled
by ``lambda`` (nothing large is formed to be multiplied by a small ``lambda`` afterwards), plus
the terms of ``lambda' = 2 s / tau^2`` (``0 < s < tau``): ``dA'/ds += lambda' (A - alpha / tau)``,
``dB'/ds += lambda' B``. ``alpha / tau`` is rounded once from Python-float (double) math.

The C++/CUDA (``srnc_ext/csrc/srnc_coefficients.h``) and Triton (``triton_kernels.py``) versions
are line-by-line transcriptions of these functions (``_unfloored_*`` and the floored wrappers).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .contract import Variant

VARIANT_SN, VARIANT_PAPER, VARIANT_PROJECTED = Variant.SN, Variant.PAPER, Variant.PROJECTED

Tensor = torch.Tensor


def _unfloored_coefficients(
    s: Tensor, q: Tensor, p: Tensor, c0: Tensor, c1: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int,
) -> Tuple[Tensor, Tensor]:
    """``coefficients`` without the floor (``floor = 0``)."""
    tiny = torch.finfo(s.dtype).tiny
    d = s + eps
    if variant == VARIANT_SN:
        return alpha / d, torch.zeros_like(s)
    if variant == VARIANT_PAPER:
        n2 = q / (d * d) - 2.0 * s / d + c0  # ||K/d - S1||^2
        norm = torch.sqrt(n2.clamp_min(tiny))
        numerator = max(beta_rank - 1.0, tiny) ** 0.5 / positions**0.5
        gamma_c = (numerator / norm).clamp(max=1.0)
        return alpha * gamma_c / d, alpha * (1.0 - gamma_c)
    if variant == VARIANT_PROJECTED:
        de = c0.clamp_min(tiny)
        c = s / (d * de)
        top = s * s / (d * d * de)  # ||W(S1)||_F^2
        rest = (q - s * s / de) / (d * d)  # ||W(S2)||_F^2
        gamma_c = (torch.sqrt((beta_rank - top).clamp_min(tiny)) / torch.sqrt(rest.clamp_min(tiny))).clamp(max=1.0)
        t = c * (1.0 - gamma_c) * c1 + gamma_c * p / d  # <K_rw, S1_out>
        f = 1.0 / (t + eps)
        return alpha * gamma_c * f / d, alpha * c * (1.0 - gamma_c) * f
    raise ValueError(f"variant must be 0, 1 or 2, got {variant!r}")


def _unfloored_coefficients_vjp(
    s: Tensor, q: Tensor, p: Tensor, c0: Tensor, c1: Tensor, g_a: Tensor, g_b: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``coefficients_vjp`` without the floor (``floor = 0``)."""
    tiny = torch.finfo(s.dtype).tiny
    zero = torch.zeros_like(s)
    d = s + eps
    if variant == VARIANT_SN:
        return -g_a * alpha / (d * d), zero, zero
    if variant == VARIANT_PAPER:
        n2 = q / (d * d) - 2.0 * s / d + c0
        norm = torch.sqrt(n2.clamp_min(tiny))
        numerator = max(beta_rank - 1.0, tiny) ** 0.5 / positions**0.5
        gamma = numerator / norm
        gamma_c = gamma.clamp(max=1.0)
        g_gamma_c = g_a * alpha / d - g_b * alpha
        g_d = -g_a * alpha * gamma_c / (d * d)
        g_gamma = torch.where(gamma < 1.0, g_gamma_c, zero)
        g_norm = -g_gamma * gamma / norm
        g_n2 = torch.where(n2 > tiny, g_norm / (2.0 * norm), zero)
        g_q = g_n2 / (d * d)
        g_d = g_d + g_n2 * (-2.0 * q / (d * d * d) + 2.0 * s / (d * d))
        g_s = g_n2 * (-2.0 / d) + g_d
        return g_s, g_q, zero
    if variant == VARIANT_PROJECTED:
        de = c0.clamp_min(tiny)
        c = s / (d * de)
        top = s * s / (d * d * de)
        rest = (q - s * s / de) / (d * d)
        num2 = beta_rank - top
        num = torch.sqrt(num2.clamp_min(tiny))
        den = torch.sqrt(rest.clamp_min(tiny))
        gamma = num / den
        gamma_c = gamma.clamp(max=1.0)
        t = c * (1.0 - gamma_c) * c1 + gamma_c * p / d
        f = 1.0 / (t + eps)
        # A = alpha gamma_c f / d ; B = alpha c (1 - gamma_c) f
        g_gamma_c = g_a * alpha * f / d - g_b * alpha * c * f
        g_f = g_a * alpha * gamma_c / d + g_b * alpha * c * (1.0 - gamma_c)
        g_d = -g_a * alpha * gamma_c * f / (d * d)
        g_c = g_b * alpha * (1.0 - gamma_c) * f
        # f = 1 / (t + eps)
        g_t = -g_f * f * f
        # t = c (1 - gamma_c) c1 + gamma_c p / d
        g_c = g_c + g_t * (1.0 - gamma_c) * c1
        g_gamma_c = g_gamma_c + g_t * (p / d - c * c1)
        g_p = g_t * gamma_c / d
        g_d = g_d - g_t * gamma_c * p / (d * d)
        # gamma_c = min(num / den, 1)
        g_gamma = torch.where(gamma < 1.0, g_gamma_c, zero)
        g_num2 = torch.where(num2 > tiny, g_gamma / den / (2.0 * num), zero)
        g_rest = torch.where(rest > tiny, -g_gamma * num / (den * den) / (2.0 * den), zero)
        g_top = -g_num2
        # rest = (q - s^2/de) / d^2 ; top = s^2 / (d^2 de) ; c = s / (d de)
        g_q = g_rest / (d * d)
        g_s = g_rest * (-2.0 * s / de) / (d * d) + g_top * 2.0 * s / (d * d * de) + g_c / (d * de)
        g_d = g_d - g_rest * 2.0 * (q - s * s / de) / (d * d * d) - g_top * 2.0 * s * s / (d * d * d * de) - g_c * s / (d * d * de)
        return g_s + g_d, g_q, g_p
    raise ValueError(f"variant must be 0, 1 or 2, got {variant!r}")


def _floor_weights(s: Tensor, floor: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x, lambda, lambda')`` of the floor: ``x = min(max(s, 0) / tau, 1)``, ``lambda = x^2``,
    ``lambda' = 2 x / tau`` where ``x < 1`` (0 where ``s >= tau``; also 0 where ``s <= 0``)."""
    x = (s.clamp_min(0.0) / floor).clamp(max=1.0)
    lam = x * x
    dlam = torch.where(x < 1.0, 2.0 * x / floor, torch.zeros_like(x))
    return x, lam, dlam


def coefficients(
    s: Tensor, q: Tensor, p: Tensor, c0: Tensor, c1: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int, floor: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """``(A, B)``, each ``(L,)``, from the reductions ``s, q, p`` and constants ``c0, c1`` (all ``(L,)``);
    ``floor = tau > 0``: the floored ``(A', B')`` (module docstring)."""
    a, b = _unfloored_coefficients(s, q, p, c0, c1, alpha, beta_rank, positions, eps, variant)
    if floor == 0.0:
        return a, b
    _, lam, _ = _floor_weights(s, floor)
    zero = torch.zeros_like(s)
    live = lam > 0.0
    a, b = torch.where(live, a, zero), torch.where(live, b, zero)
    base = alpha / floor  # Python float: one rounding to the tensor's dtype
    return lam * a + (1.0 - lam) * base, lam * b


def coefficients_vjp(
    s: Tensor, q: Tensor, p: Tensor, c0: Tensor, c1: Tensor, g_a: Tensor, g_b: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int, floor: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Reverse mode of ``coefficients``: ``(dL/ds, dL/dq, dL/dp)`` given ``dL/dA = g_a``, ``dL/dB = g_b``."""
    if floor == 0.0:
        return _unfloored_coefficients_vjp(s, q, p, c0, c1, g_a, g_b, alpha, beta_rank, positions, eps, variant)
    x, lam, dlam = _floor_weights(s, floor)
    zero = torch.zeros_like(s)
    live = lam > 0.0
    a, b = _unfloored_coefficients(s, q, p, c0, c1, alpha, beta_rank, positions, eps, variant)
    a, b = torch.where(live, a, zero), torch.where(live, b, zero)
    g_s, g_q, g_p = _unfloored_coefficients_vjp(s, q, p, c0, c1, lam * g_a, lam * g_b, alpha, beta_rank, positions,
                                                eps, variant)
    g_s, g_q, g_p = (torch.where(live, g, zero) for g in (g_s, g_q, g_p))
    base = alpha / floor
    g_lam = torch.where(x < 1.0, g_a * (a - base) + g_b * b, zero)  # dL/dlambda; lambda' = 0 at s >= tau
    return g_s + dlam * g_lam, g_q, g_p
