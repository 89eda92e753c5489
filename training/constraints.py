"""Lipschitz constraints on every ``nn.Conv2d`` of a model: ``apply_constraint(model, method, **params)``.

- "none": the model unchanged (no params).
- "srnc": ``srnc_ext.convert`` (SRN-C on the true conv operator); params ``alpha`` (1.0), ``beta``
  (1.0), ``variant`` ("projected"), ``n_power_iterations`` (1), ``input_size`` (None).
- "sn": ``torch.nn.utils.parametrizations.spectral_norm`` on the reshaped kernel (C_out, C_in*kh*kw),
  followed by a ``Scale(alpha)`` parametrization; params ``alpha`` (1.0), ``n_power_iterations``
  (1), ``eps`` (1e-12).
- "srn": Sanyal et al.'s SRN-alpha-beta on the reshaped kernel (``SRN`` below); params ``alpha``
  (1.0), ``beta`` (1.0), ``n_power_iterations`` (1), ``eps`` (1e-12).

Every method constrains the ``nn.Conv2d`` layers only (the paper's models have no other kind;
"srnc" passes ``types=nn.Conv2d`` to ``convert``, which would otherwise take every conv kind), so
the methods compare on the same layers. A conv that is already constrained (an SRN-C layer or a
parametrized weight) makes any constraint other than "none" raise ``ValueError`` before the model
is touched.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

import srnc_ext
from srnc_ext import SRNCLayer, hyperparameters

METHODS = ("none", "srnc", "sn", "srn")
_DEFAULTS = {
    "none": {},
    "srnc": dict(alpha=1.0, beta=1.0, variant="projected", n_power_iterations=1, input_size=None),
    "sn": dict(alpha=1.0, n_power_iterations=1, eps=1e-12),
    "srn": dict(alpha=1.0, beta=1.0, n_power_iterations=1, eps=1e-12),
}


class Scale(nn.Module):
    """Parametrization ``W -> alpha * W`` (registered after spectral norm)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, weight: Tensor) -> Tensor:
        return self.alpha * weight


class SRN(nn.Module):
    """SRN-alpha-beta (paper Algorithm 1, Sanyal et al. 2020) as a parametrization of a conv weight.

    ``M = W.reshape(C_out, C_in*kh*kw)``. In training mode each forward advances the power
    iteration ``n_power_iterations`` times (no grad) on the persistent buffers ``u`` (C_out,) and
    ``v`` (C_in*kh*kw,); eval mode never updates them. Then ``Mn = M / (u^T M v + eps)``; if
    ``beta < 1``: ``S1 = (u^T Mn v) u v^T``, ``S2 = Mn - S1``,
    ``gamma = sqrt(max(beta * rank - 1, 0)) / ||S2||_F`` with ``rank = min(M.shape)``, and
    ``Mn = S1 + min(gamma, 1) S2`` (the "if gamma < 1" of the algorithm). Returns ``alpha * Mn``
    reshaped back. With exact singular vectors sigma_1 = alpha, and the stable rank becomes
    ``max(beta * rank, 1)`` when it was above (unchanged otherwise).
    """

    def __init__(self, weight: Tensor, alpha: float = 1.0, beta: float = 1.0, n_power_iterations: int = 1,
                 eps: float = 1e-12, warmup: int = 15):
        super().__init__()
        self.alpha, self.beta, self.n_power_iterations, self.eps = alpha, beta, n_power_iterations, eps
        matrix = weight.detach().reshape(weight.shape[0], -1)
        u = F.normalize(torch.randn(matrix.shape[0], dtype=matrix.dtype, device=matrix.device), dim=0, eps=eps)
        v = F.normalize(torch.randn(matrix.shape[1], dtype=matrix.dtype, device=matrix.device), dim=0, eps=eps)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self._power_iteration(matrix, warmup)

    @torch.no_grad()
    def _power_iteration(self, matrix: Tensor, steps: int) -> None:
        for _ in range(steps):
            self.v.copy_(F.normalize(matrix.t() @ self.u, dim=0, eps=self.eps))
            self.u.copy_(F.normalize(matrix @ self.v, dim=0, eps=self.eps))

    def forward(self, weight: Tensor) -> Tensor:
        matrix = weight.reshape(weight.shape[0], -1)
        if self.training:
            self._power_iteration(matrix.detach(), self.n_power_iterations)
        u, v = self.u.clone(), self.v.clone()  # the buffers change in place at the next update
        matrix = matrix / (u @ matrix @ v + self.eps)
        if self.beta < 1.0:
            s1 = (u @ matrix @ v) * torch.outer(u, v)
            s2 = matrix - s1
            target = math.sqrt(max(self.beta * min(matrix.shape) - 1.0, 0.0))
            gamma = target / torch.linalg.matrix_norm(s2).clamp_min(self.eps)
            matrix = s1 + gamma.clamp(max=1.0) * s2
        return (self.alpha * matrix).reshape(weight.shape)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, n_power_iterations={self.n_power_iterations}"


def parse_method(spec: str):
    """A pipeline method spec -> ``(method, config overrides)``: ``"none"``, ``"sn"``, ``"srnc"``
    (alpha and beta from the config), ``"sn-1"`` (alpha 1), ``"srnc-2-0.1"`` / ``"srn-1-1"``
    (alpha 2, beta 0.1 / alpha 1, beta 1). ValueError naming the spec otherwise."""
    name, *numbers = str(spec).split("-")
    most = {"none": 0, "sn": 1, "srnc": 2, "srn": 2}
    if name not in most or len(numbers) > most[name]:
        raise ValueError(f"bad method {spec!r}: expected one of {METHODS}, optionally followed by -alpha "
                         "(sn, srn, srnc) and -beta (srn, srnc), e.g. srnc-2-0.1")
    try:
        values = [float(n) for n in numbers]
    except ValueError:
        raise ValueError(f"bad method {spec!r}: alpha and beta must be numbers") from None
    return name, dict(zip(("alpha", "beta"), values))


def _check_params(method: str, params: dict) -> dict:
    allowed = _DEFAULTS[method]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for method {method!r}; allowed: {sorted(allowed)}")
    p = {**allowed, **params}
    checks = dict(alpha=hyperparameters.check_alpha, beta=hyperparameters.check_beta, eps=hyperparameters.check_eps,
                  variant=hyperparameters.check_variant,
                  n_power_iterations=lambda n: hyperparameters.check_iterations("n_power_iterations", n))
    for name, check in checks.items():
        if name in p:
            check(p[name])
    return p


def is_constrained(conv: nn.Module) -> bool:
    """Whether ``conv`` already carries a constraint (SRN-C layer or parametrized weight)."""
    return isinstance(conv, SRNCLayer) or parametrize.is_parametrized(conv)


def apply_constraint(model: nn.Module, method: str, **params) -> nn.Module:
    """Constrain every ``nn.Conv2d`` of ``model`` with ``method`` (one of ``METHODS``); returns the model."""
    if method not in METHODS:
        raise ValueError(f"unknown constraint method {method!r}; valid methods: {', '.join(METHODS)}")
    p = _check_params(method, params)
    if method == "none":
        return model
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    done = [name or "<model>" for name, m in convs if is_constrained(m)]
    if done:
        raise ValueError(f"cannot apply {method!r}: conv layer(s) already constrained: {', '.join(done)}")
    if method == "srnc":
        return srnc_ext.convert(model, types=nn.Conv2d, **p)
    for _, conv in convs:
        if method == "sn":
            spectral_norm(conv, n_power_iterations=p["n_power_iterations"], eps=p["eps"], dim=0)
            parametrize.register_parametrization(conv, "weight", Scale(float(p["alpha"])))
        else:
            parametrize.register_parametrization(
                conv, "weight", SRN(conv.weight, float(p["alpha"]), float(p["beta"]), p["n_power_iterations"], p["eps"]))
    return model
