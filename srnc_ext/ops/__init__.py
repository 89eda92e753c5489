"""Stacked SRN-C ops: the coefficient-form specification and its pure-PyTorch implementation."""
from .coefficients import VARIANT_PAPER, VARIANT_PROJECTED, VARIANT_SN, coefficients, coefficients_vjp
from .reweight_ref import normalize_segments, prepare_constants, reweight_backward, reweight_forward, variant_code

__all__ = [
    "VARIANT_PAPER", "VARIANT_PROJECTED", "VARIANT_SN", "coefficients", "coefficients_vjp",
    "normalize_segments", "prepare_constants", "reweight_backward", "reweight_forward", "variant_code",
]
