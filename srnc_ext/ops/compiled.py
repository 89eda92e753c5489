"""The compiled (C++/CUDA, ``srnc_ext/csrc/``) backend of the stacked SRN-C ops: ``torch.ops.srnc_ext.*``.

The namespace, schemas, fake kernels and autograd come from ``contract.register``; loading the
library then adds the CPU (and, when built with CUDA, the CUDA) kernels (``TORCH_LIBRARY_IMPL``).
The library is ``srnc_ext._C`` when it was built ahead of time (``pip install --no-build-isolation``);
when no ``_C`` is installed (``pip install .`` under build isolation), ``_jit_build.load`` compiles
it at first use against the installed torch, or loads it from torch's extension cache
(``SRNC_JIT=0`` forbids that). An installed ``_C`` built from other sources than the installed ones
(a ``git pull`` without a rebuild) is not loaded -- its kernels may not match the schemas, which
aborts the process at load -- but detected from the source fingerprint compiled into it
(``_jit_build.source_fingerprint``), with a warning, and the installed sources are compiled at
first use instead. ``ORIGIN`` says which (``"ahead-of-time"`` or ``"first-use"``). If
neither works, ``AVAILABLE`` is False, ``IMPORT_ERROR`` says why and the entry points raise;
``warn_unavailable()`` warns once (the backends then use the pure-PyTorch reference ops).
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Optional, Tuple

import torch

from .. import _jit_build
from . import contract

OPS = contract.register("srnc_ext", name="compiled")  # before the extension registers its kernels for these schemas

AHEAD_OF_TIME_HINT = (
    "rebuild it from the repository root with `pip install --no-build-isolation -e .` "
    "(SRNC_BUILD_CUDA=1 requires the CUDA kernels, SRNC_BUILD_CUDA=0 builds the CPU ones only)"
)
FIRST_USE_HINT = (
    "srnc_ext compiles them at first use where a C++ compiler and ninja are installed (SRNC_JIT=1, the "
    "default), or install with `pip install --no-build-isolation .` to compile them ahead of time"
)


class StaleLibrary(ImportError):
    """``srnc_ext._C`` was built from other sources than the ones installed beside it."""


def _first_use() -> Tuple[str, Optional[BaseException]]:
    try:
        _jit_build.load()
    except Exception as exc:  # noqa: BLE001  (whatever the build does, srnc_ext must import: the reference runs)
        return "first-use", exc
    return "first-use", None


def _stale(origin: str) -> Optional[str]:
    """Why the ahead-of-time library at ``origin`` must not be loaded, or None. It is checked before
    loading: a library whose kernels do not match the schemas aborts the process when loaded."""
    try:
        current = _jit_build.source_fingerprint()
    except OSError:  # the sources are not installed: nothing to compare with
        return None
    built = _jit_build.library_fingerprint(origin)
    if built == current:
        return None
    return (f"srnc_ext._C ({origin}) was built from other sources than the installed ones (its source "
            f"fingerprint {built or 'is missing'}, the sources' {current[:16]}...): an out-of-date build")


def _load() -> Tuple[str, Optional[BaseException]]:
    """(origin, error): the installed ``srnc_ext._C`` when it was built from the installed sources, else
    the first-use build of those sources; ``error`` None if loaded."""
    spec = importlib.util.find_spec("srnc_ext._C")
    if spec is None:
        return _first_use()
    stale = _stale(spec.origin) if spec.origin else None
    if stale is not None:
        origin, error = _first_use()  # compiles the installed sources (cached by their hash)
        if error is None:
            warnings.warn(f"srnc_ext: {stale}; using the compiled ops built from the installed sources at first "
                          f"use instead; {AHEAD_OF_TIME_HINT}", RuntimeWarning, stacklevel=2)
            return origin, None
        return "ahead-of-time", StaleLibrary(f"{stale}; the first-use build failed too: {error}")
    try:
        from srnc_ext import _C  # noqa: F401  (loads the library: its TORCH_LIBRARY_IMPL kernels)
    except (ImportError, OSError) as exc:  # built against another torch, or damaged
        return "ahead-of-time", exc
    return "ahead-of-time", None


ORIGIN, IMPORT_ERROR = _load()
AVAILABLE = IMPORT_ERROR is None
REBUILD_HINT = AHEAD_OF_TIME_HINT if ORIGIN == "ahead-of-time" else FIRST_USE_HINT

Tensor = torch.Tensor
_warned = False


def warn_unavailable() -> None:
    """Warn, once per process, that the compiled ops are missing, why, and how to get them."""
    global _warned
    if AVAILABLE or _warned:
        return
    _warned = True
    warnings.warn(f"srnc_ext: the compiled ops are unavailable ({IMPORT_ERROR}); using the pure-PyTorch reference "
                  f"ops instead; {REBUILD_HINT}", RuntimeWarning, stacklevel=2)


def has_cuda_kernels() -> bool:
    """Whether the built extension registered CUDA kernels (it was built with a CUDA toolkit)."""
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("srnc_ext::reweight_forward", "CUDA")


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"srnc_ext: the compiled ops are unavailable ({IMPORT_ERROR}); {REBUILD_HINT}") from IMPORT_ERROR


def normalize_segments(x: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """See ``contract``: segment-wise ``x / ||x||``, ``x, fallback: (L, N)`` or ``(P, L, M)``."""
    _require()
    return OPS.normalize_segments(x, fallback, eps)


def reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps,
                     variant, floor=0.0) -> Tuple[Tensor, Tensor]:
    """``(out (L, M, T), stats (L, 3))``; differentiable in ``kernel``. See ``contract``."""
    _require()
    return OPS.reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant,
                                floor)


def reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank, positions, eps,
                      variant, floor=0.0) -> Tensor:
    """``dL/dK (L, M, T)`` from ``dL/d out``. See ``contract``."""
    _require()
    return OPS.reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank,
                                 positions, eps, variant, floor)
