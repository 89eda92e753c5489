"""The precision SRN-C's normalization runs in, whatever the weights' dtype and autocast say."""
from __future__ import annotations

import contextlib

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the power iteration and reweighting: float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(tensor: torch.Tensor):
    """Autocast off for ``tensor``'s device: the normalization runs in float32/float64.

    A no-op context when autocast is not on there (entering ``torch.autocast`` costs
    microseconds, and this runs on every layer's forward)."""
    kind = tensor.device.type
    if kind in ("cpu", "cuda") and _autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()


def _autocast_enabled(kind: str) -> bool:
    try:
        return torch.is_autocast_enabled(kind)
    except TypeError:  # a torch whose is_autocast_enabled takes no device: turn it off regardless
        return True
