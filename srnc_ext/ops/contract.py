"""The contract of the stacked SRN-C ops, declared once for every backend.

Three ops act on ``L`` stacked layers (``M = C_out * C_in/groups`` kernel slices, ``T = kh * kw``
taps; the math is ``naive.py``'s):

* ``normalize_segments(x, fallback, eps)``: segment-wise ``x / ||x||`` (``fallback``'s segment
  where ``||x|| <= eps``); ``x, fallback: (L, N)`` or ``(P, L, M)`` (segment ``l`` is ``x[:, l, :]``);
* ``reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps,
  variant, floor=0) -> (out, stats)``: ``out = A K + B V (L, M, T)``, ``stats = (s, q, p) (L, 3)`` in
  the accumulation dtype; differentiable in ``kernel`` (``stats`` is not);
* ``reweight_backward(grad, kernel, ..., consts, stats, scalars..., floor=0) -> dL/dK``.

``floor`` (``tau``, finite, ``>= 0``; the last argument, with a default so that calls without it keep
their meaning) floors the sigma estimate ``s``: ``tau = 0`` is no floor (the ops exactly as without
the argument); ``tau > 0`` blends the weight towards ``(alpha / tau) K`` where ``s < tau``
(``coefficients.py``), which keeps the gradient bounded at and near an all-zero kernel.

This module holds, for all of them: the schemas (``SCHEMAS``), the argument checks (every message
names the op, the argument and what is allowed; ``ValueError`` for shapes, dtypes and values,
``RuntimeError`` for devices), the fake (meta) kernels, the autograd formula and one function,
``register``, that defines a backend's namespace with all of it. The C++/CUDA kernels keep their
own ``TORCH_CHECK`` guards: they protect memory when ``torch.ops`` is called directly.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Dict, Optional, Tuple

import torch

from ..precision import compute_dtype as accumulation_dtype

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Variant(enum.IntEnum):
    """The ops' integer variant codes (``coefficients.py``)."""

    SN = 0  # spectral normalization only (beta = 1)
    PAPER = 1  # Algorithm 2 literally
    PROJECTED = 2  # projected, with renormalization


SCHEMAS = {
    "normalize_segments": "normalize_segments(Tensor x, Tensor fallback, float eps) -> Tensor",
    "reweight_forward": (
        "reweight_forward(Tensor kernel, Tensor s1, Tensor direction, Tensor s1_out, Tensor gram, Tensor consts, "
        "float alpha, float beta_rank, float positions, float eps, int variant, float floor=0.) "
        "-> (Tensor out, Tensor stats)"),
    "reweight_backward": (
        "reweight_backward(Tensor grad, Tensor kernel, Tensor s1, Tensor direction, Tensor s1_out, Tensor gram, "
        "Tensor consts, Tensor stats, float alpha, float beta_rank, float positions, float eps, int variant, "
        "float floor=0.) -> Tensor"),
}
OPS = tuple(SCHEMAS)


# ---------------------------------------------------------------------------------------------- checks
# Plain raises, not torch._check: Dynamo traces the entry points, and it cannot trace a torch._check
# whose message closure holds tensors (the conditions are on static shapes and dtypes).
def _value(cond: bool, message: Callable[[], str]) -> None:
    if not cond:
        raise ValueError(message())


def _same_device(op: str, ref: Tensor, ref_name: str, t: Tensor, name: str) -> None:
    if t.device != ref.device:
        raise RuntimeError(f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _float(op: str, t: Tensor, name: str) -> None:
    _value(t.dtype in FLOAT_DTYPES, lambda: f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _like(op: str, ref: Tensor, ref_name: str, t: Tensor, name: str) -> None:
    _value(t.shape == ref.shape, lambda: f"{op}: {name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    _value(t.dtype == ref.dtype, lambda: f"{op}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    _same_device(op, ref, ref_name, t, name)


def _small(op: str, kernel: Tensor, t: Tensor, name: str, shape: Tuple[int, int], shape_name: str) -> None:
    _value(tuple(t.shape) == shape, lambda: f"{op}: {name} must be {shape_name} = {shape}, got {tuple(t.shape)}")
    _float(op, t, name)
    _same_device(op, kernel, "kernel", t, name)


def check_normalize_segments(x: Tensor, fallback: Tensor, eps: float, op: str = "normalize_segments") -> None:
    _value(x.dim() in (2, 3), lambda: f"{op}: x must be (L, N) or (P, L, M) (segment l is x[:, l, :]), "
                                      f"got shape {tuple(x.shape)}")
    _float(op, x, "x")
    _like(op, x, "x", fallback, "fallback")
    _value(eps >= 0, lambda: f"{op}: eps must be >= 0, got {eps}")


def check_reweight(kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor, consts: Tensor,
                   alpha: float, beta_rank: float, positions: float, eps: float, variant: int, floor: float = 0.0,
                   *, op: str = "reweight_forward", grad: Optional[Tensor] = None,
                   stats: Optional[Tensor] = None) -> None:
    _value(variant in tuple(Variant), lambda: f"{op}: variant must be 0 (SN), 1 (paper) or 2 (projected), got {variant}")
    _value(kernel.dim() == 3, lambda: f"{op}: kernel must be (L, M, T), got shape {tuple(kernel.shape)}")
    _float(op, kernel, "kernel")
    for name, t in (("grad", grad), ("s1", s1), ("direction", direction), ("s1_out", s1_out)):
        if t is not None:
            _like(op, kernel, "kernel", t, name)
    layers, taps = kernel.shape[0], kernel.shape[2]
    _small(op, kernel, gram, "gram", (taps, taps), "(T, T)")
    _small(op, kernel, consts, "consts", (layers, 2), "(L, 2)")
    if stats is not None:
        _small(op, kernel, stats, "stats", (layers, 3), "(L, 3)")
    for name, value in (("alpha", alpha), ("positions", positions)):
        _value(value > 0, lambda: f"{op}: {name} must be > 0, got {value}")
    _value(eps > 0, lambda: f"{op}: eps must be > 0, got {eps}")
    # comparisons, not math.isfinite: under torch.compile a float attribute that differs between two
    # compiled models (alpha of two converted models) becomes symbolic, and math.isfinite of it breaks the graph
    _value(0 <= floor < math.inf, lambda: f"{op}: floor must be finite and >= 0, got {floor}")


# ---------------------------------------------------------------------------------------------- registration
class OpSet:
    """A backend's checked entry points: the contract's checks, then its implementation of each op.

    ``impls``: op name -> function with the schema's arguments (``torch.ops.<namespace>.<op>`` for
    a registered namespace, see ``register``; the pure-PyTorch functions for the reference).
    """

    def __init__(self, name: str, impls: Dict[str, Callable]) -> None:
        self.name = name
        self._impls = impls

    @classmethod
    def of_namespace(cls, namespace: str, name: Optional[str] = None) -> "OpSet":
        ops = getattr(torch.ops, namespace)
        return cls(name or namespace, {op: getattr(ops, op) for op in OPS})

    def normalize_segments(self, x: Tensor, fallback: Tensor, eps: float) -> Tensor:
        check_normalize_segments(x, fallback, float(eps))
        return self._impls["normalize_segments"](x, fallback, float(eps))

    def reweight_forward(self, kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps,
                         variant, floor=0.0) -> Tuple[Tensor, Tensor]:
        scalars = (float(alpha), float(beta_rank), float(positions), float(eps), int(variant), float(floor))
        check_reweight(kernel, s1, direction, s1_out, gram, consts, *scalars)
        return self._impls["reweight_forward"](kernel, s1, direction, s1_out, gram, consts, *scalars)

    def reweight_backward(self, grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank,
                          positions, eps, variant, floor=0.0) -> Tensor:
        scalars = (float(alpha), float(beta_rank), float(positions), float(eps), int(variant), float(floor))
        check_reweight(kernel, s1, direction, s1_out, gram, consts, *scalars, op="reweight_backward", grad=grad,
                       stats=stats)
        return self._impls["reweight_backward"](grad, kernel, s1, direction, s1_out, gram, consts, stats, *scalars)


def _fake_normalize_segments(x, fallback, eps):
    check_normalize_segments(x, fallback, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant,
                           floor=0.0):
    check_reweight(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant, floor)
    stats = kernel.new_empty((kernel.shape[0], 3), dtype=accumulation_dtype(kernel.dtype))
    return kernel.new_empty(kernel.shape), stats


def _fake_reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank, positions,
                            eps, variant, floor=0.0):
    check_reweight(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant, floor,
                   op="reweight_backward", grad=grad, stats=stats)
    return kernel.new_empty(kernel.shape)


_FAKES = {"normalize_segments": _fake_normalize_segments, "reweight_forward": _fake_reweight_forward,
          "reweight_backward": _fake_reweight_backward}


def _setup_context(ctx, inputs, output) -> None:
    kernel, s1, direction, s1_out, gram, consts, *scalars = inputs  # scalars: floor only where it was passed
    ctx.mark_non_differentiable(output[1])  # stats: diagnostics and the backward's input
    ctx.scalars = scalars
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(kernel, s1, direction, s1_out, gram, consts, output[1])


def _autograd(namespace: str):
    def backward(ctx, grad_out: Tensor, _grad_stats):
        grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_kernel = getattr(torch.ops, namespace).reweight_backward(grad_out, *ctx.saved_tensors, *ctx.scalars)
        # s1, direction, s1_out, gram, consts are constants of the step; the 6 scalars (floor included, also
        # where it took its default) are not tensors: one result per positional argument of the schema
        return (grad_kernel,) + (None,) * 11

    return backward


_LIBRARIES: Dict[str, torch.library.Library] = {}  # kept alive: a collected Library unregisters its ops


def register(namespace: str, impls: Optional[Dict[str, Callable]] = None,
             dispatch_keys: Tuple[str, ...] = ("CPU", "CUDA"), name: Optional[str] = None) -> OpSet:
    """Define the ops in ``namespace`` with ``SCHEMAS``, their fake kernels and the autograd of
    ``reweight_forward``; ``impls`` (op name -> function) registers Python implementations for
    ``dispatch_keys`` (the Triton launchers), else the implementations come from elsewhere (the
    compiled extension's ``TORCH_LIBRARY_IMPL``). Returns the checked entry points (named ``name``,
    default the namespace)."""
    if namespace not in _LIBRARIES:
        library = torch.library.Library(namespace, "DEF")
        for op in OPS:
            library.define(SCHEMAS[op])
            if impls is not None:
                for key in dispatch_keys:
                    library.impl(op, impls[op], key)
            torch.library.register_fake(f"{namespace}::{op}", _FAKES[op], lib=library)
        torch.library.register_autograd(f"{namespace}::reweight_forward", _autograd(namespace),
                                        setup_context=_setup_context, lib=library)
        _LIBRARIES[namespace] = library
    return OpSet.of_namespace(namespace, name)
