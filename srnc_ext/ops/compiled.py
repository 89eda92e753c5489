"""The compiled (C++/CUDA, ``csrc/``) backend of the stacked SRN-C ops: ``torch.ops.srnc_ext.*``.

The namespace, schemas, fake kernels and autograd come from ``contract.register``; importing
``srnc_ext._C`` then adds the CPU (and, when built with CUDA, the CUDA) kernels
(``TORCH_LIBRARY_IMPL``). If the extension is missing, ``AVAILABLE`` is False, ``IMPORT_ERROR``
says why and the entry points raise; ``warn_unavailable()`` warns once.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch

from . import contract

OPS = contract.register("srnc_ext", name="compiled")  # before the extension registers its kernels for these schemas

try:
    from srnc_ext import _C  # noqa: F401  (loads the library: its TORCH_LIBRARY_IMPL kernels)
except (ImportError, OSError) as exc:  # not built, or built against another torch
    AVAILABLE, IMPORT_ERROR = False, exc
else:
    AVAILABLE, IMPORT_ERROR = True, None

Tensor = torch.Tensor
REBUILD_HINT = (
    "rebuild it from the repository root with `pip install --no-build-isolation -e .` "
    "(SRNC_BUILD_CUDA=1 requires the CUDA kernels, SRNC_BUILD_CUDA=0 builds the CPU ones only)"
)
_warned = False


def warn_unavailable() -> None:
    """Warn, once per process, that the compiled ops are missing and how to rebuild them."""
    global _warned
    if AVAILABLE or _warned:
        return
    _warned = True
    warnings.warn(f"srnc_ext: the compiled ops (srnc_ext._C) are unavailable ({IMPORT_ERROR}); {REBUILD_HINT}",
                  RuntimeWarning, stacklevel=2)


def has_cuda_kernels() -> bool:
    """Whether the built extension registered CUDA kernels (it was built with a CUDA toolkit)."""
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("srnc_ext::reweight_forward", "CUDA")


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"srnc_ext: the compiled ops (srnc_ext._C) are unavailable; {REBUILD_HINT}") from IMPORT_ERROR


def normalize_segments(x: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """See ``contract``: segment-wise ``x / ||x||``, ``x, fallback: (L, N)`` or ``(P, L, M)``."""
    _require()
    return OPS.normalize_segments(x, fallback, eps)


def reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps,
                     variant) -> Tuple[Tensor, Tensor]:
    """``(out (L, M, T), stats (L, 3))``; differentiable in ``kernel``. See ``contract``."""
    _require()
    return OPS.reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant)


def reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank, positions, eps,
                      variant) -> Tensor:
    """``dL/dK (L, M, T)`` from ``dL/d out``. See ``contract``."""
    _require()
    return OPS.reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank,
                                 positions, eps, variant)
