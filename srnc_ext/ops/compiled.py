"""The compiled (C++/CUDA, ``csrc/``) backend of the stacked SRN-C ops: ``torch.ops.srnc_ext.*``.

Importing ``srnc_ext._C`` registers the schemas and the CPU (and, when built with CUDA, the CUDA)
kernels with the dispatcher; this module adds what lives in Python: fake (meta) kernels for
``torch.compile``/``opcheck`` and the autograd formula of ``reweight_forward`` (through the
``reweight_backward`` op). Shapes: ``L`` layers, ``M`` kernel slices, ``T`` taps; the math is that
of ``reweight_ref`` (the oracle). If the extension is missing, ``AVAILABLE`` is False,
``IMPORT_ERROR`` says why and the wrappers raise; ``warn_unavailable()`` warns once.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

try:
    from srnc_ext import _C  # noqa: F401  (loads the library: registers torch.ops.srnc_ext.*)
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
    """Segment-wise ``x / ||x||`` or ``fallback`` where ``||x|| <= eps``; ``x, fallback: (L, N)`` or
    ``(P, L, M)`` (segment ``l`` is ``x[:, l, :]``)."""
    _require()
    return torch.ops.srnc_ext.normalize_segments(x, fallback, float(eps))


def reweight_forward(
    kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor, consts: Tensor,
    alpha: float, beta_rank: float, positions: float, eps: float, variant: int,
) -> Tuple[Tensor, Tensor]:
    """``(out (L, M, T), stats (L, 3))``; differentiable in ``kernel`` (``stats`` is not differentiable)."""
    _require()
    return torch.ops.srnc_ext.reweight_forward(kernel, s1, direction, s1_out, gram, consts, float(alpha),
                                               float(beta_rank), float(positions), float(eps), int(variant))


def reweight_backward(
    grad: Tensor, kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor, consts: Tensor,
    stats: Tensor, alpha: float, beta_rank: float, positions: float, eps: float, variant: int,
) -> Tensor:
    """``dL/dK (L, M, T)`` from ``dL/d out``."""
    _require()
    return torch.ops.srnc_ext.reweight_backward(grad, kernel, s1, direction, s1_out, gram, consts, stats,
                                                float(alpha), float(beta_rank), float(positions), float(eps),
                                                int(variant))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_like(op: str, ref: Tensor, ref_name: str, t: Tensor, name: str) -> None:
    torch._check(t.device == ref.device, lambda: f"{op}: {name} must be on {ref_name}'s device")
    torch._check(t.dtype == ref.dtype, lambda: f"{op}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    torch._check(t.shape == ref.shape, lambda: f"{op}: {name} must have {ref_name}'s shape {tuple(ref.shape)}")


def _check_reweight(op: str, kernel: Tensor, s1: Tensor, direction: Tensor, s1_out: Tensor, gram: Tensor,
                    consts: Tensor, variant: int, stats: Optional[Tensor] = None) -> None:
    torch._check(variant in (0, 1, 2), lambda: f"{op}: variant must be 0, 1 or 2, got {variant}")
    torch._check(kernel.dim() == 3, lambda: f"{op}: kernel must be (L, M, T), got {tuple(kernel.shape)}")
    for name, t in (("s1", s1), ("direction", direction), ("s1_out", s1_out)):
        _check_like(op, kernel, "kernel", t, name)
    L, T = kernel.shape[0], kernel.shape[2]
    for name, t, shape in (("gram", gram, (T, T)), ("consts", consts, (L, 2)), ("stats", stats, (L, 3))):
        if t is not None:
            torch._check(tuple(t.shape) == shape, lambda: f"{op}: {name} must be {shape}, got {tuple(t.shape)}")


def _setup_context(ctx, inputs, output) -> None:
    kernel, s1, direction, s1_out, gram, consts, *scalars = inputs
    ctx.mark_non_differentiable(output[1])  # stats: diagnostics and the backward's input
    ctx.scalars = scalars
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(kernel, s1, direction, s1_out, gram, consts, output[1])


def _backward(ctx, grad_out: Tensor, _grad_stats: Tensor):
    grad_kernel = None
    if ctx.needs_input_grad[0]:
        kernel, s1, direction, s1_out, gram, consts, stats = ctx.saved_tensors
        grad_kernel = torch.ops.srnc_ext.reweight_backward(grad_out, kernel, s1, direction, s1_out, gram, consts,
                                                           stats, *ctx.scalars)
    # s1, direction, s1_out, gram, consts are constants of the step; the scalars are not tensors
    return (grad_kernel,) + (None,) * 10


if AVAILABLE:

    @torch.library.register_fake("srnc_ext::normalize_segments")
    def _normalize_segments_fake(x, fallback, eps):
        torch._check(x.dim() in (2, 3), lambda: f"normalize_segments: x must be (L, N) or (P, L, M), got {tuple(x.shape)}")
        _check_like("normalize_segments", x, "x", fallback, "fallback")
        return x.new_empty(x.shape)

    @torch.library.register_fake("srnc_ext::reweight_forward")
    def _reweight_forward_fake(kernel, s1, direction, s1_out, gram, consts, alpha, beta_rank, positions, eps, variant):
        _check_reweight("reweight_forward", kernel, s1, direction, s1_out, gram, consts, variant)
        return kernel.new_empty(kernel.shape), kernel.new_empty((kernel.shape[0], 3), dtype=_acc_dtype(kernel.dtype))

    @torch.library.register_fake("srnc_ext::reweight_backward")
    def _reweight_backward_fake(grad, kernel, s1, direction, s1_out, gram, consts, stats,
                                alpha, beta_rank, positions, eps, variant):
        _check_reweight("reweight_backward", kernel, s1, direction, s1_out, gram, consts, variant, stats)
        _check_like("reweight_backward", kernel, "kernel", grad, "grad")
        return kernel.new_empty(kernel.shape)

    torch.library.register_autograd("srnc_ext::reweight_forward", _backward, setup_context=_setup_context)
