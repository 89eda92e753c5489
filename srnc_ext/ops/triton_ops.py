"""Triton backend of the stacked SRN-C ops: ``torch.ops.srnc_ext_triton.*``.

The namespace, schemas, checks, fake kernels and autograd come from ``contract.register``, which
registers the launchers of ``triton_kernels.py`` for CPU (the interpreter) and CUDA tensors. A
Python ``Library`` with explicit fake kernels, not ``triton_op`` + ``wrap_triton``: only this form
survives fake-tensor tracing (``opcheck``, ``torch.compile``) under the Triton interpreter.
Importing this module never fails; without Triton ``AVAILABLE`` is False and the ops raise.
"""
from typing import Tuple

import torch

from . import contract
from . import triton_kernels as _kernels
from .triton_kernels import AVAILABLE, REASON

Tensor = torch.Tensor

__all__ = ["AVAILABLE", "REASON", "normalize_segments", "reweight_forward", "reweight_backward"]

OPS = contract.register("srnc_ext_triton", impls={op: getattr(_kernels, op) for op in contract.OPS}, name="triton")


def normalize_segments(x: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """See ``contract``: segment-wise ``x / ||x||``, ``x, fallback: (L, N)`` or ``(P, L, M)``."""
    return OPS.normalize_segments(x, fallback, eps)


def reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps,
                     variant, floor=0.0) -> Tuple[Tensor, Tensor]:
    """``(out (L, M, T), stats (L, 3))``; differentiable in ``kernel``. See ``contract``."""
    return OPS.reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant,
                                floor)


def reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank, positions, eps,
                      variant, floor=0.0) -> Tensor:
    """``dL/dK (L, M, T)`` from ``dL/d out``. See ``contract``."""
    return OPS.reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank,
                                 positions, eps, variant, floor)
