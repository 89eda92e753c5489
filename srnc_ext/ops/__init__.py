"""The stacked SRN-C ops (``contract.py`` declares them once for every backend).

The functions exported here dispatch: ``normalize_segments``, ``reweight_forward`` and
``reweight_backward`` run on the backend ``srnc_ext.backends`` picks for the tensors' device (the
compiled C++/CUDA ops, Triton, or the pure-PyTorch reference). Beside them: ``naive.py``, the
pure-PyTorch implementation (the oracle of the kernels), ``coefficients.py``, the per-layer scalar
math every backend transcribes (with the optional floor ``tau`` on the sigma estimate, the ops'
last argument ``floor``, default 0 = none), ``compiled.py`` / ``triton_ops.py``, the two fast backends.
"""
from .coefficients import VARIANT_PAPER, VARIANT_PROJECTED, VARIANT_SN, coefficients, coefficients_vjp
from .contract import Variant
from .naive import prepare_constants, variant_code


def _backend_ops(tensor):
    from ..backends import op_set

    return op_set(None, tensor.device)


def normalize_segments(x, fallback, eps):
    """Segment-wise ``x / ||x||`` (``fallback``'s segment where ``||x|| <= eps``) on the selected
    backend; ``x, fallback: (L, N)`` or ``(P, L, M)``."""
    return _backend_ops(x).normalize_segments(x, fallback, eps)


def reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant,
                     floor=0.0):
    """``(out (L, M, T), stats (L, 3))`` on the selected backend; differentiable in ``kernel``; ``floor``:
    the floor ``tau`` on the sigma estimate (``coefficients.py``; 0 = none)."""
    return _backend_ops(kernel).reweight_forward(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank,
                                                 positions, eps, variant, floor)


def reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha, beta_rank, positions, eps,
                      variant, floor=0.0):
    """``dL/dK (L, M, T)`` from ``dL/d out`` on the selected backend (``floor`` as in ``reweight_forward``)."""
    return _backend_ops(kernel).reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats, alpha,
                                                  beta_rank, positions, eps, variant, floor)


__all__ = [
    "VARIANT_PAPER", "VARIANT_PROJECTED", "VARIANT_SN", "Variant", "coefficients", "coefficients_vjp",
    "normalize_segments", "prepare_constants", "reweight_backward", "reweight_forward", "variant_code",
]
