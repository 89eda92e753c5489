"""Checks of SRN-C's hyperparameters, in one place: the layer, the training constraints and the
run configuration all call these, so a bad value gets the same message wherever it is given."""
from __future__ import annotations

import math
from typing import Optional

import torch

VARIANTS = ("projected", "paper")


def check_alpha(value) -> float:
    """``alpha``: the target spectral norm, a finite number > 0."""
    return _positive_finite("alpha", value)


def check_beta(value) -> float:
    """``beta``: the target stable rank as a fraction of the full rank, in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"beta must be in (0, 1], got {value!r}")
    return float(value)


def check_eps(value) -> float:
    return _positive_finite("eps", value)


def check_sigma_floor(value) -> float:
    """``sigma_floor``: a float in [0, 1] (the floor on sigma_1 as a fraction of alpha)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"sigma_floor must be a number in [0, 1] (a fraction of alpha), got {value!r}")
    return float(value)


def check_iterations(name: str, value) -> int:
    """A count of power-iteration steps: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_variant(value) -> str:
    if value not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {value!r}")
    return value


def check_float_dtype(dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and (not dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"dtype must be a floating point dtype (float16, bfloat16, float32, float64), got {dtype}"
        )


def _positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
