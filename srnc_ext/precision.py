"""The precision SRN-C's normalization runs in, whatever the weights' dtype and autocast say."""
from __future__ import annotations

import contextlib

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the power iteration and reweighting: float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(tensor: torch.Tensor):
    """Autocast off for ``tensor``'s device: the normalization runs in float32/float64."""
    if tensor.device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    return contextlib.nullcontext()
