"""Backend choice for the stacked SRN-C ops.

Each implementation is a ``Backend``: a name, a priority, a check of whether it runs on a device
type and whether ``"auto"`` may pick it there, and its ops (a ``contract.OpSet``: every backend
exposes ``normalize_segments``, ``reweight_forward`` (with autograd) and ``reweight_backward``,
behind the same argument checks). ``"auto"`` takes the highest-priority backend that runs on the
tensors' device and is meant for it: the compiled C++/CUDA ops, then Triton (GPU only: under the
interpreter it is a test vehicle, far slower than the reference), then the pure-PyTorch
reference (with a warning that the compiled ops are missing).

Names a user passes (``BACKENDS``): ``"auto"``, ``"cuda"`` / ``"cpu"`` (the compiled ops, an error
if they are missing or the tensors are elsewhere), ``"triton"`` and ``"reference"``. Precedence: a
layer's own ``backend``, then ``set_backend(...)``, then the environment variable
``SRNC_BACKEND``, then ``"auto"``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from .ops import contract, naive

BACKENDS = ("auto", "cuda", "cpu", "triton", "reference")
_selected: Optional[str] = None


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int
    _runs_on: Callable[[str], bool]  # device type -> whether the ops run there
    _auto_on: Callable[[str], bool]  # device type -> whether "auto" may pick it
    _ops: Callable[[], contract.OpSet]
    unavailable_hint: str

    def runs_on(self, device_type: str) -> bool:
        try:
            return self._runs_on(device_type)
        except ImportError:
            return False

    def auto_on(self, device_type: str) -> bool:
        return self.runs_on(device_type) and self._auto_on(device_type)

    @property
    def ops(self) -> contract.OpSet:
        return self._ops()


def _compiled():
    from .ops import compiled

    return compiled


def _triton():
    from .ops import triton_ops

    return triton_ops


def _compiled_runs_on(device_type: str) -> bool:
    compiled = _compiled()
    return compiled.AVAILABLE and (device_type == "cpu" or (device_type == "cuda" and compiled.has_cuda_kernels()))


def _triton_runs_on(device_type: str) -> bool:
    return _triton().AVAILABLE and (device_type == "cuda" or os.environ.get("TRITON_INTERPRET", "") not in ("", "0"))


REFERENCE = contract.OpSet("reference", {name: getattr(naive, name) for name in contract.OPS})

REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    Backend("compiled", 30, _compiled_runs_on, lambda device: True, lambda: _compiled().OPS,
            "needs the compiled ops: srnc_ext._C from `pip install --no-build-isolation .`, or the first-use "
            "build of a plain `pip install .` (a C++ compiler and ninja; SRNC_JIT=0 forbids it); "
            "SRNC_BUILD_CUDA=1 forces the CUDA kernels"),
    Backend("triton", 20, _triton_runs_on, lambda device: device == "cuda", lambda: _triton().OPS,
            "needs a GPU, or TRITON_INTERPRET=1 set before triton is imported for CPU tensors"),
    Backend("reference", 0, lambda device: True, lambda device: True, lambda: REFERENCE, ""),
)}


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


def compiled_available(device_type: str) -> bool:
    return REGISTRY["compiled"].runs_on(device_type)


def triton_available(device_type: str) -> bool:
    return REGISTRY["triton"].runs_on(device_type)


def resolve(name: Optional[str], device: torch.device) -> str:
    """The implementation (``"compiled"``, ``"triton"``, ``"reference"``) for ``name`` on ``device``."""
    name = check_backend(name) or get_backend()
    kind = torch.device(device).type
    if name == "reference" or kind == "meta":  # meta: shapes only (convert builds layers there)
        return "reference"
    if name in ("cuda", "cpu", "triton"):
        backend = REGISTRY["triton" if name == "triton" else "compiled"]
        if name != "triton" and kind != name:
            raise RuntimeError(f"backend={name!r} was selected but the tensors are on {kind}")
        if not backend.runs_on(kind):
            raise RuntimeError(f"backend={name!r} is not usable on {kind}: it {backend.unavailable_hint}")
        return backend.name
    best = max((b for b in REGISTRY.values() if b.auto_on(kind)), key=lambda b: b.priority)
    if best.name == "reference" and kind in ("cpu", "cuda"):
        _warn_missing_compiled()
    return best.name


_RESOLVED: dict = {}  # (name, global choice, device type) -> op set; resolution runs per forward


def op_set(name: Optional[str], device: torch.device) -> contract.OpSet:
    """The ops (``normalize_segments``, ``reweight_forward``, ``reweight_backward``) for ``name`` on ``device``."""
    key = (name, get_backend() if name is None else None, torch.device(device).type)
    op_set = _RESOLVED.get(key)
    if op_set is None:
        op_set = _RESOLVED[key] = REGISTRY[resolve(name, device)].ops
    return op_set


_warned = False


def _warn_missing_compiled() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    try:
        _compiled().warn_unavailable()
    except ImportError:
        warnings.warn("srnc_ext: compiled ops unavailable; using the pure-PyTorch reference", stacklevel=3)
