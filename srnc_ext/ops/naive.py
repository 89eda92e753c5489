"""Pure-PyTorch implementation of the stacked SRN-C ops, in the fused (coefficient) form.

This is the oracle for the C++/CUDA and Triton kernels and the "reference" backend of the
ops; it is itself checked against ``srnc_ext.reference`` (the per-layer autograd reference).
``floor`` (``tau >= 0``, last argument, default 0 = no floor) is the per-layer floor on the sigma
estimate of ``coefficients.py``: the same ``out = A' K + B' V`` form with the floored scalars.
Shapes: ``L`` stacked layers, ``M = C_out * C_in/groups`` kernel slices, ``T = kh * kw`` taps.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .coefficients import VARIANT_PAPER, VARIANT_PROJECTED, VARIANT_SN, coefficients, coefficients_vjp

Tensor = torch.Tensor


def variant_code(variant: str, beta: float) -> int:
    """The op's integer variant: 0 = spectral normalization (beta = 1), 1 = paper, 2 = projected."""
    if beta >= 1.0:
        return VARIANT_SN
    return {"paper": VARIANT_PAPER, "projected": VARIANT_PROJECTED}[variant]


def normalize_segments(x: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """Segment-wise ``x / ||x||``, or the ``fallback`` segment where ``||x|| <= eps``.

    ``x, fallback``: ``(L, N)`` (segment ``l`` is row ``l``) or ``(P, L, M)`` (segment ``l`` is
    ``x[:, l, :]``, how a channels-last stack of ``L`` layers' vectors lies in memory).
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"normalize_segments: x must be (L, N) or (P, L, M), got shape {tuple(x.shape)}")
    dims = (1,) if x.dim() == 2 else (0, 2)
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True)
    return torch.where(norm > eps, x / norm.clamp_min(eps), fallback)


def prepare_constants(s1: Tensor, s1_out: Tensor, gram_pinv: Tensor, variant: int,
                      direction: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(direction V (L, M, T), consts (L, 2))`` for the ops, from the refreshed rank-one kernels.

    paper/SN: ``V = S1``, ``consts = (||S1||^2, 0)``; projected: ``V = D = S1 G^+``,
    ``consts = (<S1, D>, <D, S1_out>)``; ``direction``: ``D`` from an earlier call with the same
    ``s1`` (it does not depend on ``s1_out``). No gradient flows through these.
    """
    if variant == VARIANT_PROJECTED:
        if direction is None:
            direction = (s1.reshape(-1, s1.shape[-1]) @ gram_pinv).reshape(s1.shape)  # one GEMM, not L small ones
        consts = torch.stack([(s1 * direction).sum((1, 2)), (direction * s1_out).sum((1, 2))], 1)
    else:
        direction = s1
        consts = torch.stack([(s1 * s1).sum((1, 2)), torch.zeros_like(s1[:, 0, 0])], 1)
    return direction, consts


def _reductions(kernel: Tensor, s1: Tensor, s1_out: Tensor, gram: Tensor, variant: int) -> Tuple[Tensor, Tensor, Tensor]:
    s = (kernel * s1).sum((1, 2))
    gk = kernel @ gram if variant == VARIANT_PROJECTED else kernel
    q = (gk * kernel).sum((1, 2))
    p = (kernel * s1_out).sum((1, 2)) if variant == VARIANT_PROJECTED else torch.zeros_like(s)
    return s, q, p


def reweight_forward(
    kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor, consts: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int, floor: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """``(out, stats)``: ``out = A K + B V`` ``(L, M, T)`` and ``stats = (s, q, p)`` ``(L, 3)``."""
    s, q, p = _reductions(kernel, s1, s1_out, gram, variant)
    a, b = coefficients(s, q, p, consts[:, 0], consts[:, 1], alpha, beta_rank, positions, eps, variant, floor)
    out = a[:, None, None] * kernel + b[:, None, None] * direction
    return out, torch.stack([s, q, p], 1)


def reweight_vjp(
    grad: Tensor, kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor, consts: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int, floor: float = 0.0,
) -> Tensor:
    """``reweight_backward`` with the reductions recomputed from ``kernel``: differentiable in
    ``grad`` and ``kernel`` by autograd (double backward, Hessian-vector products)."""
    stats = torch.stack(_reductions(kernel, s1, s1_out, gram, variant), 1)
    return reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank, positions,
                             eps, variant, floor)


def reweight_backward(
    grad: Tensor, kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor, consts: Tensor,
    stats: Tensor, alpha: float, beta_rank: float, positions: float, eps: float, variant: int, floor: float = 0.0,
) -> Tensor:
    """``dL/dK (L, M, T)`` from ``dL/d out``: ``A g + gs S1 + gq 2 G K + gp S1_out``."""
    s, q, p = stats.unbind(1)
    c0, c1 = consts.unbind(1)
    a, _ = coefficients(s, q, p, c0, c1, alpha, beta_rank, positions, eps, variant, floor)
    g_a, g_b = (grad * kernel).sum((1, 2)), (grad * direction).sum((1, 2))
    g_s, g_q, g_p = coefficients_vjp(s, q, p, c0, c1, g_a, g_b, alpha, beta_rank, positions, eps, variant, floor)
    gk = kernel @ gram if variant == VARIANT_PROJECTED else kernel
    out = a[:, None, None] * grad + g_s[:, None, None] * s1 + (2.0 * g_q)[:, None, None] * gk
    if variant == VARIANT_PROJECTED:
        out = out + g_p[:, None, None] * s1_out
    return out
