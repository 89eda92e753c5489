"""Backend choice for the stacked SRN-C ops.

Names: ``"auto"`` (the compiled op for the tensor's device, else Triton, else the reference),
``"cuda"`` / ``"cpu"`` (the compiled C++/CUDA op, an error if it is missing), ``"triton"``
and ``"reference"`` (pure PyTorch, ``srnc_ext.ops.reweight_ref``). Precedence: a layer's own
``backend``, then ``set_backend(...)``, then the environment variable ``SRNC_BACKEND``, then
``"auto"``. Every backend exposes ``normalize_segments``, ``reweight_forward`` (with autograd) and
``reweight_backward``.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .ops import contract, reweight_ref

BACKENDS = ("auto", "cuda", "cpu", "triton", "reference")
_selected: Optional[str] = None


def check_backend(name: Optional[str], argument: str = "backend") -> Optional[str]:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Select the backend for every layer without its own (None restores ``SRNC_BACKEND``/auto)."""
    global _selected
    _selected = check_backend(name)


def get_backend() -> str:
    """The globally selected backend name (before ``"auto"`` is resolved)."""
    if _selected is not None:
        return _selected
    return check_backend(os.environ.get("SRNC_BACKEND") or "auto", "SRNC_BACKEND") or "auto"


def _compiled():
    from .ops import compiled

    return compiled


def _triton():
    from .ops import triton_ops

    return triton_ops


def compiled_available(device_type: str) -> bool:
    try:
        compiled = _compiled()
    except ImportError:
        return False
    if not compiled.AVAILABLE:
        return False
    return device_type == "cpu" or (device_type == "cuda" and compiled.has_cuda_kernels())


def triton_available(device_type: str) -> bool:
    try:
        triton_ops = _triton()
    except ImportError:
        return False
    if not triton_ops.AVAILABLE:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


REFERENCE = contract.OpSet("reference", {name: getattr(reweight_ref, name) for name in contract.OPS})


def resolve(name: Optional[str], device: torch.device) -> str:
    """The concrete implementation (``"compiled"``, ``"triton"``, ``"reference"``) for ``name`` on ``device``."""
    name = check_backend(name) or get_backend()
    kind = torch.device(device).type
    if name == "reference" or kind == "meta":  # meta: shapes only (convert builds layers there)
        return "reference"
    if name in ("cuda", "cpu"):
        if kind != name:
            raise RuntimeError(f"backend={name!r} was selected but the tensors are on {kind}")
        if not compiled_available(kind):
            raise RuntimeError(
                f"backend={name!r} needs the compiled srnc_ext._C ops for {kind}; rebuild with "
                "`pip install --no-build-isolation -e .` (SRNC_BUILD_CUDA=1 forces the CUDA kernels)"
            )
        return "compiled"
    if name == "triton":
        if not triton_available(kind):
            raise RuntimeError(
                f"backend='triton' is not usable on {kind}: Triton needs a GPU, or TRITON_INTERPRET=1 "
                "set before triton is imported for CPU tensors"
            )
        return "triton"
    if compiled_available(kind):
        return "compiled"
    if kind == "cuda" and triton_available(kind):
        return "triton"
    if kind in ("cpu", "cuda"):
        _warn_missing_compiled()
    return "reference"


_RESOLVED: dict = {}  # (name, global choice, device type) -> op namespace; resolution runs per forward


def ops(name: Optional[str], device: torch.device):
    """The op namespace (``normalize_segments``, ``reweight_forward``) for ``name`` on ``device``."""
    key = (name, get_backend() if name is None else None, torch.device(device).type)
    namespace = _RESOLVED.get(key)
    if namespace is None:
        impl = resolve(name, device)
        namespace = _compiled() if impl == "compiled" else _triton() if impl == "triton" else REFERENCE
        _RESOLVED[key] = namespace
    return namespace


_warned = False


def _warn_missing_compiled() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    try:
        compiled = _compiled()
        compiled.warn_unavailable()
    except ImportError:
        warnings.warn("srnc_ext: compiled ops unavailable; using the pure-PyTorch reference", stacklevel=3)
