"""Triton backend of the stacked SRN-C ops, as ``torch.library`` custom ops ``srnc_ext_triton::*``.

Same signatures and math as ``reweight_ref.py`` (the oracle). ``reweight_forward`` is
differentiable in ``kernel`` (its backward is the ``reweight_backward`` op); ``stats`` is a
non-differentiable output and the other inputs are constants. Registered with ``custom_op`` +
``register_fake`` rather than ``triton_op`` + ``wrap_triton``: only this form survives fake-tensor
tracing (``opcheck``, ``torch.compile``) under the Triton interpreter.
Importing this module never fails; without Triton ``AVAILABLE`` is False and the ops raise.
"""
from typing import Optional, Tuple

import torch

from . import triton_kernels as _kernels
from .triton_kernels import AVAILABLE, REASON, acc_dtype

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["AVAILABLE", "REASON", "normalize_segments", "reweight_forward", "reweight_backward"]


def _check(cond: bool, message: str, error=ValueError) -> None:
    torch._check_with(error, cond, lambda: message)


def _check_devices(op: str, **tensors: Tensor) -> None:
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        _check(t.device == ref.device, f"{op}: {name} is on {t.device} but {first} is on {ref.device}", RuntimeError)


def _check_normalize(x: Tensor, fallback: Tensor) -> None:
    op = "srnc_ext_triton.normalize_segments"
    _check(x.dim() in (2, 3), f"{op}: x must be (L, N) or (P, L, M) (segment l is x[:, l, :]), got shape {tuple(x.shape)}")
    _check(fallback.shape == x.shape,
           f"{op}: fallback must have x's shape {tuple(x.shape)}, got {tuple(fallback.shape)}")
    _check(x.dtype in FLOAT_DTYPES, f"{op}: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    _check(fallback.dtype == x.dtype, f"{op}: fallback must have x's dtype {x.dtype}, got {fallback.dtype}")
    _check_devices(op, x=x, fallback=fallback)


def _check_reweight(op: str, kernel: Tensor, stacked: dict, gram: Tensor, consts: Tensor, variant: int,
                    stats: Optional[Tensor] = None) -> None:
    """``stacked``: name -> tensor that must match kernel's (L, M, T) shape and dtype."""
    op = f"srnc_ext_triton.{op}"
    _check(variant in (0, 1, 2), f"{op}: variant must be 0, 1 or 2, got {variant!r}")
    _check(kernel.dim() == 3, f"{op}: kernel must be (L, M, T), got shape {tuple(kernel.shape)}")
    _check(kernel.dtype in FLOAT_DTYPES, f"{op}: kernel must be float16/bfloat16/float32/float64, got {kernel.dtype}")
    for name, t in stacked.items():
        _check(t.shape == kernel.shape,
               f"{op}: {name} must have kernel's shape {tuple(kernel.shape)}, got {tuple(t.shape)}")
        _check(t.dtype == kernel.dtype, f"{op}: {name} must have kernel's dtype {kernel.dtype}, got {t.dtype}")
    L, _, T = kernel.shape
    small = {"gram": (gram, (T, T)), "consts": (consts, (L, 2))}
    if stats is not None:
        small["stats"] = (stats, (L, 3))
    allowed = tuple(dict.fromkeys((kernel.dtype, acc_dtype(kernel.dtype))))  # kernel's or the accumulation dtype
    for name, (t, shape) in small.items():
        _check(t.shape == shape, f"{op}: {name} must be {shape}, got {tuple(t.shape)}")
        _check(t.dtype in allowed, f"{op}: {name} must be {' or '.join(map(str, allowed))}, got {t.dtype}")
    _check_devices(op, kernel=kernel, **stacked, **{name: t for name, (t, _) in small.items()})


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("srnc_ext_triton::normalize_segments", mutates_args=())
def _normalize_segments(x: Tensor, fallback: Tensor, eps: float) -> Tensor:
    _check_normalize(x, fallback)
    return _kernels.normalize_segments(x, fallback, eps)


@_normalize_segments.register_fake
def _(x, fallback, eps):
    _check_normalize(x, fallback)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("srnc_ext_triton::reweight_forward", mutates_args=())
def _reweight_forward(kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor, consts: Tensor,
                      alpha: float, beta_rank: float, positions: float, eps: float,
                      variant: int) -> Tuple[Tensor, Tensor]:
    _check_reweight("reweight_forward", kernel, dict(s1=s1, direction=direction, s1_out=s1_out), gram, consts,
                    variant)
    return _kernels.reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps,
                                     variant)


@_reweight_forward.register_fake
def _(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant):
    _check_reweight("reweight_forward", kernel, dict(s1=s1, direction=direction, s1_out=s1_out), gram, consts,
                    variant)
    L = kernel.shape[0]
    return kernel.new_empty(kernel.shape), kernel.new_empty((L, 3), dtype=acc_dtype(kernel.dtype))


@torch.library.custom_op("srnc_ext_triton::reweight_backward", mutates_args=())
def _reweight_backward(grad: Tensor, kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor,
                       consts: Tensor, stats: Tensor, alpha: float, beta_rank: float, positions: float, eps: float,
                       variant: int) -> Tensor:
    _check_reweight("reweight_backward", kernel, dict(grad=grad, s1=s1, direction=direction, s1_out=s1_out), gram,
                    consts, variant, stats)
    return _kernels.reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank,
                                      positions, eps, variant)


@_reweight_backward.register_fake
def _(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank, positions, eps, variant):
    _check_reweight("reweight_backward", kernel, dict(grad=grad, s1=s1, direction=direction, s1_out=s1_out), gram,
                    consts, variant, stats)
    return kernel.new_empty(kernel.shape)


def _setup_context(ctx, inputs, output):
    kernel, s1, direction, s1_out, gram, consts, *scalars = inputs
    ctx.save_for_backward(kernel, s1, direction, s1_out, gram, consts, output[1])
    ctx.scalars = scalars
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out: Tensor, _grad_stats: Optional[Tensor]):
    grad_kernel = None
    if ctx.needs_input_grad[0]:
        grad_kernel = _reweight_backward(grad_out, *ctx.saved_tensors, *ctx.scalars)
    return (grad_kernel,) + (None,) * 10


_reweight_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public wrappers
# ---------------------------------------------------------------------------------------------
def normalize_segments(x: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """Segment-wise ``x / ||x||``, or the ``fallback`` segment where ``||x|| <= eps``. ``x, fallback: (L, N)``
    or ``(P, L, M)`` (segment ``l`` is ``x[:, l, :]``)."""
    return _normalize_segments(x, fallback, float(eps))


def reweight_forward(kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor, consts: Tensor,
                     alpha: float, beta_rank: float, positions: float, eps: float,
                     variant: int) -> Tuple[Tensor, Tensor]:
    """``(out (L, M, T), stats (L, 3))``; differentiable in ``kernel``. See ``reweight_ref.reweight_forward``."""
    return _reweight_forward(kernel, s1, direction, s1_out, gram, consts, float(alpha), float(beta_rank),
                             float(positions), float(eps), int(variant))


def reweight_backward(grad: Tensor, kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor,
                      consts: Tensor, stats: Tensor, alpha: float, beta_rank: float, positions: float, eps: float,
                      variant: int) -> Tensor:
    """``dL/dK (L, M, T)`` from ``dL/d out``. See ``reweight_ref.reweight_backward``."""
    return _reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, float(alpha),
                              float(beta_rank), float(positions), float(eps), int(variant))
