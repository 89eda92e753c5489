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
The C++/CUDA (``srnc_ext/csrc/srnc_coefficients.h``) and Triton (``triton_kernels.py``) versions
are line-by-line transcriptions of these two functions.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .contract import Variant

VARIANT_SN, VARIANT_PAPER, VARIANT_PROJECTED = Variant.SN, Variant.PAPER, Variant.PROJECTED

Tensor = torch.Tensor


def coefficients(
    s: Tensor, q: Tensor, p: Tensor, c0: Tensor, c1: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int,
) -> Tuple[Tensor, Tensor]:
    """``(A, B)``, each ``(L,)``, from the reductions ``s, q, p`` and constants ``c0, c1`` (all ``(L,)``)."""
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


def coefficients_vjp(
    s: Tensor, q: Tensor, p: Tensor, c0: Tensor, c1: Tensor, g_a: Tensor, g_b: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Reverse mode of ``coefficients``: ``(dL/ds, dL/dq, dL/dp)`` given ``dL/dA = g_a``, ``dL/dB = g_b``."""
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
