"""Pure-PyTorch reference of SRN-C (Algorithm 2 of Tanay et al.), as small functions.

Every fast backend must match these functions. Notation (shapes):

* ``kernel``, ``K``: ``(C_out, C_in/groups, kh, kw)``; ``geometry``: a ``ConvGeometry``.
* ``u``: ``(1, C_out, H', W')`` (output space), ``v``: ``(1, C_in, H, W)`` (input space), unit norm.
* ``s1``: ``(C_out, C_in/groups, kh, kw)``, the kernel gradient ``grad_K <u, W(K) v>``.
  By linearity ``<K, s1> = <u, W(K) v>``, the power-iteration estimate of ``sigma_1(W(K))``,
  so the normalization never needs a second convolution once ``s1`` is known.
* ``gram``, ``gram_pinv``: ``(kh*kw, kh*kw)``, ``geometry.kernel_gram()`` and its pseudo-inverse.

One SRN-C update is ``power_iteration`` (two convolutions per iteration, no gradient), then
``rank_one_kernel`` (one weight-gradient convolution, no gradient); the differentiable part
(``spectral_normalize``, the reweightings) is elementwise work and reductions on the kernel.

Two variants (see docs/variants.md for the derivation and the measured table):

* ``"paper"``: Algorithm 2 literally: ``S1`` is the kernel gradient itself and
  ``gamma = sqrt(beta * r - 1) / (sqrt(P) * ||S2||_F)`` with ``r = min(dim_in, dim_out)`` and
  ``P = H' * W'`` output positions; for a square stride-1 layer on n x n maps (``r = m n^2``,
  ``P = n^2``) this is the paper's ``sqrt(beta m - 1/n^2) / ||S2||_F``.
* ``"projected"`` (default): ``S1`` is the component of the normalized operator along the
  conv operator closest to ``u v^T``, the split ``K~ = S1 + S2`` is orthogonal in the
  operator's Frobenius inner product, ``gamma = sqrt(beta * r - ||W(S1)||_F^2) / ||W(S2)||_F``
  with exact operator norms, and the reweighted kernel is renormalized by its own spectral
  norm (a second persistent power iteration), so ``sigma_1 = alpha`` holds for every beta.

The floor ``tau`` (``srnc_weight(..., floor=tau)``, default 0 = none): SRN-C divides by the sigma
estimate ``s = <K, S1>``, so at and near an all-zero kernel its gradient is about ``alpha / eps``.
With ``tau > 0`` and ``lambda = min(1, max(s, 0) / tau)^2`` the weight is
``lambda * W(K) + (1 - lambda) * (alpha / tau) * K`` (``W(K)`` the weight without the floor),
unchanged for ``s >= tau`` and ``~ (alpha / tau) K`` near ``K = 0`` (``floored_weight``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .conv_operator import ConvGeometry, gram_inner
from .hyperparameters import VARIANTS  # the variants its functions accept


def normalize_vector(x: torch.Tensor, fallback: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / ||x||``, or ``fallback`` where ``||x|| <= eps`` (a zero kernel keeps its vectors)."""
    norm = torch.linalg.vector_norm(x)
    return torch.where(norm > eps, x / norm.clamp_min(eps), fallback)


def power_iteration_step(
    kernel: torch.Tensor, u: torch.Tensor, v: torch.Tensor, geometry: ConvGeometry, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 2 (steps 2-3): ``v = W^T u / ||.||``, ``u = W v / ||.||``.

    ``u (1, C_out, H', W')``, ``v (1, C_in, H, W)`` -> new ``(u, v)``, same shapes.
    """
    v = normalize_vector(geometry.adjoint(kernel, u), v, eps)
    u = normalize_vector(geometry.apply(kernel, v), u, eps)
    return u, v


def power_iteration(
    kernel: torch.Tensor, u: torch.Tensor, v: torch.Tensor, geometry: ConvGeometry, n_iterations: int, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n_iterations`` steps of ``power_iteration_step``."""
    for _ in range(n_iterations):
        u, v = power_iteration_step(kernel, u, v, geometry, eps)
    return u, v


def rank_one_kernel(u: torch.Tensor, v: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Algorithm 2, step 5: ``S1 = grad_K <u, W(K) v>`` (independent of ``K``)."""
    return geometry.kernel_grad(v, u)


def spectral_normalize(kernel: torch.Tensor, s1: torch.Tensor, eps: float) -> torch.Tensor:
    """Algorithm 2, step 4: ``K / (<u, W(K) v> + eps) = K / (<K, S1> + eps)``."""
    return kernel / ((kernel * s1).sum() + eps)


def _tiny(x: torch.Tensor) -> float:
    return torch.finfo(x.dtype).tiny


def paper_gamma(s2: torch.Tensor, beta: float, full_rank: int, output_positions: int) -> torch.Tensor:
    """Algorithm 2, step 7, generalized: ``sqrt(beta r - 1) / (sqrt(P) ||S2||_F)`` (0-dim)."""
    tiny = _tiny(s2)
    numerator = torch.sqrt(torch.tensor(beta * full_rank - 1.0, dtype=s2.dtype, device=s2.device).clamp_min(tiny))
    return numerator / (output_positions**0.5 * torch.linalg.vector_norm(s2).clamp_min(tiny))


def paper_reweight(
    kernel_n: torch.Tensor, s1: torch.Tensor, beta: float, full_rank: int, output_positions: int
) -> torch.Tensor:
    """Algorithm 2, steps 6-8, literally: ``S2 = K~ - S1``; ``K~ = S1 + min(gamma, 1) S2``.

    ``gamma >= 1`` leaves ``K~`` unchanged (``S1 + S2``), which is the paper's ``if gamma < 1``.
    """
    s2 = kernel_n - s1
    gamma = paper_gamma(s2, beta, full_rank, output_positions)
    return s1 + gamma.clamp(max=1.0) * s2


def projected_split(
    kernel_n: torch.Tensor, s1: torch.Tensor, gram: torch.Tensor, gram_pinv: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``K~ = top + rest`` orthogonally in ``<A, B>_G = <W(A), W(B)>_F``.

    ``W(G^+ S1)`` is the orthogonal projection of the rank-one matrix ``u v^T`` onto the conv
    operators (``A^T A = G`` per kernel slice); ``top`` is ``K~``'s component along it.
    Returns ``(top, rest, ||W(top)||_F^2, ||W(rest)||_F^2)``.
    """
    tiny = _tiny(kernel_n)
    direction = (s1.flatten(2) @ gram_pinv).view_as(s1)  # G^+ S1
    direction_energy = (s1 * direction).sum()  # ||W(G^+ S1)||_F^2 = <S1, G^+ S1>
    along = (kernel_n * s1).sum()  # <W(K~), W(G^+ S1)>_F = <K~, S1>
    top = direction * (along / direction_energy.clamp_min(tiny))
    rest = kernel_n - top
    top_energy = along * along / direction_energy.clamp_min(tiny)
    rest_energy = gram_inner(rest, rest, gram)
    return top, rest, top_energy, rest_energy


def projected_gamma(top_energy: torch.Tensor, rest_energy: torch.Tensor, beta: float, full_rank: int) -> torch.Tensor:
    """``sqrt(beta r - ||W(S1)||_F^2) / ||W(S2)||_F`` (0-dim): the ``gamma`` that makes
    ``||W(S1 + gamma S2)||_F^2 = beta r``; the paper's formula when ``||W(S1)||_F = 1`` and
    ``||W(S2)||_F = n ||S2||_F`` (circular padding, stride 1, square)."""
    tiny = _tiny(rest_energy)
    return torch.sqrt((beta * full_rank - top_energy).clamp_min(tiny)) / torch.sqrt(rest_energy.clamp_min(tiny))


def projected_reweight(
    kernel_n: torch.Tensor, s1: torch.Tensor, beta: float, full_rank: int, gram: torch.Tensor, gram_pinv: torch.Tensor
) -> torch.Tensor:
    """The default variant's reweighting (before renormalization): ``top + min(gamma, 1) rest``."""
    top, rest, top_energy, rest_energy = projected_split(kernel_n, s1, gram, gram_pinv)
    gamma = projected_gamma(top_energy, rest_energy, beta, full_rank)
    return top + gamma.clamp(max=1.0) * rest


def srnc_weight(
    kernel: torch.Tensor,
    s1: torch.Tensor,
    geometry: ConvGeometry,
    *,
    alpha: float,
    beta: float,
    eps: float,
    variant: str,
    s1_out: Optional[torch.Tensor] = None,
    gram: Optional[torch.Tensor] = None,
    gram_pinv: Optional[torch.Tensor] = None,
    floor: float = 0.0,
) -> torch.Tensor:
    """The effective weight ``alpha * K~`` given the power-iteration kernels (differentiable in ``kernel``).

    ``s1_out`` (projected variant, ``beta < 1``): ``rank_one_kernel`` of the second power
    iteration, which runs on ``reweighted_kernel(...)``; it renormalizes the result.
    ``floor``: the floor ``tau >= 0`` on the sigma estimate (``floored_weight``; 0 = none).
    """
    if needs_second_iteration(variant, beta) and s1_out is None:
        raise ValueError("s1_out is required by the projected variant when beta < 1")
    if not (floor >= 0.0 and floor < float("inf")):
        raise ValueError(f"floor must be finite and >= 0, got {floor}")

    def unfloored(k: torch.Tensor) -> torch.Tensor:
        reweighted = reweighted_kernel(k, s1, geometry, beta=beta, eps=eps, variant=variant, gram=gram,
                                       gram_pinv=gram_pinv)
        if needs_second_iteration(variant, beta):
            reweighted = spectral_normalize(reweighted, s1_out, eps)
        return alpha * reweighted

    if floor == 0.0:
        return unfloored(kernel)
    return floored_weight(kernel, s1, unfloored, alpha=alpha, floor=floor)


def floored_weight(kernel: torch.Tensor, s1: torch.Tensor, weight, *, alpha: float, floor: float) -> torch.Tensor:
    """``lambda * weight(K) + (1 - lambda) * (alpha / tau) * K`` with ``lambda = min(1, max(s, 0) / tau)^2``,
    ``s = <K, S1>``, ``tau = floor > 0``: ``weight(K)`` where ``s >= tau``; where ``lambda = 0`` (``s <= 0``,
    or ``lambda`` underflows) ``weight`` is not evaluated (it divides by ``s + eps``)."""
    s = (kernel * s1).sum()
    lam = (s.clamp_min(0.0) / floor).clamp(max=1.0) ** 2
    if bool(lam >= 1.0):
        return weight(kernel)
    base = (alpha / floor) * kernel
    if not bool(lam > 0.0):
        return (1.0 - lam) * base
    return lam * weight(kernel) + (1.0 - lam) * base


def reweighted_kernel(
    kernel: torch.Tensor,
    s1: torch.Tensor,
    geometry: ConvGeometry,
    *,
    beta: float,
    eps: float,
    variant: str,
    gram: Optional[torch.Tensor] = None,
    gram_pinv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Normalized and (for ``beta < 1``) reweighted kernel, before ``alpha`` and any renormalization."""
    kernel_n = spectral_normalize(kernel, s1, eps)
    if beta >= 1.0:
        return kernel_n
    if variant == "paper":
        return paper_reweight(kernel_n, s1, beta, geometry.full_rank, geometry.positions)
    if variant == "projected":
        if gram is None:
            gram = geometry.kernel_gram(kernel.dtype, kernel.device)
        if gram_pinv is None:
            gram_pinv = geometry.kernel_gram_pinv(kernel.dtype, kernel.device)
        return projected_reweight(kernel_n, s1, beta, geometry.full_rank, gram, gram_pinv)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def needs_second_iteration(variant: str, beta: float) -> bool:
    """Whether the variant renormalizes by a second power iteration (projected, ``beta < 1``)."""
    return variant == "projected" and beta < 1.0
