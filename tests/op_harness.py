"""What the op tests of every backend share: realistic op inputs, non-contiguous layouts, the
tolerance rules and the backends under test.

- ``op_case(L, shape, variant, beta, padding_mode)``: float64 arguments of the stacked ops for
  ``L`` random layers with converged power-iteration kernels (``oracles.refreshed_layers``); with
  ``beta=None`` the stable-rank target is placed so that gamma straddles 1 across the stack.
- ``floored(case)``: the case with the ops' ``floor`` (tau) set between its layers' sigma estimates
  (some layers below the floor, blended towards ``(alpha / tau) K``, some above it, unchanged);
  ``below_floor`` says which.
- ``LAYOUTS`` / ``strided``: the same values in non-contiguous memory.
- ``oracle`` (``srnc_ext.ops.naive`` in float64) and ``run_op`` (an op set's forward, and its
  backward through autograd).
- ``assert_matches`` (float64/float32) and ``assert_low_precision`` (float16/bfloat16: at most twice
  the error of float32 math on the same rounded inputs, the 2x rule), errors relative to ``scales``.
- ``BACKENDS``: the fast backends (compiled CPU, compiled CUDA, Triton) as pytest params, each
  skipped where it cannot run (CUDA: ``gpu`` marker).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from oracles import refreshed_layers

from srnc_ext.conv_operator import ConvGeometry
from srnc_ext.ops import Variant, coefficients, naive

F64 = torch.float64
LOW = (torch.float16, torch.bfloat16)
DTYPES = (F64, torch.float32) + LOW
ALPHA, EPS = 1.7, 1e-12
TENSORS = ("kernel", "s1", "direction", "s1_out", "gram", "consts")
SCALARS = ("alpha", "beta_rank", "positions", "eps", "variant")  # and "floor" (default 0) where a case sets it
VARIANTS = {"sn": Variant.SN, "paper": Variant.PAPER, "projected": Variant.PROJECTED}

# name -> ((C_out, C_in, kh, kw), padding): odd channel counts, M*T from 35 to 5049; input maps are
# (max(7, kh), max(6, kw)), so reflect padding stays legal
SHAPES = {
    "3x3": ((5, 3, 3, 3), 1),
    "5x3": ((3, 7, 5, 3), (2, 1)),
    "1x1": ((7, 5, 1, 1), 0),
    "3x2": ((5, 3, 3, 2), 1),  # an even kernel width: the output is one column wider than the input
    "7x7": ((3, 3, 7, 7), 3),
    "big3x3": ((33, 17, 3, 3), 1),  # M*T > threads per CUDA block and > the CPU summation chunk; M > Triton's tile
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def one_thread():
    """Tiny tensors gain nothing from threads and lose much when the other core is busy (seen here:
    23 ms instead of 0.02 ms per conv with 2 OpenMP threads; the Triton input builder ran 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- layouts
def transposed(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values, non-contiguous: a transposed copy for 3-d, every other column of a wider buffer otherwise."""
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    return wide[:, ::2]


def offset(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a view with every stride reversed, at an offset into a larger buffer."""
    buf = x.new_zeros([n + 1 for n in reversed(x.shape)]).permute(*reversed(range(x.dim())))
    return buf[tuple(slice(1, n + 1) for n in x.shape)].copy_(x)


LAYOUTS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"transposed": transposed, "offset": offset}


def strided(x: torch.Tensor, layout: str = "offset") -> torch.Tensor:
    return LAYOUTS[layout](x)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class OpCase:
    """float64 CPU arguments of the reweight ops, and a random upstream gradient ``grad`` (L, M, T)."""

    geometry: ConvGeometry
    tensors: Dict[str, torch.Tensor]
    scalars: Dict[str, float]
    grad: torch.Tensor

    def cast(self, dtype=F64, device="cpu", layout: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """The tensors in ``dtype`` on ``device`` (non-contiguous in ``layout`` if given)."""
        out = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in self.tensors.items()}
        return out if layout is None else {k: strided(v, layout) for k, v in out.items()}

    def with_scalars(self, **changes) -> "OpCase":
        return OpCase(self.geometry, self.tensors, {**self.scalars, **changes}, self.grad)


def _critical_beta_rank(stats, consts, positions, variant):
    """Per layer, the beta_rank at which gamma = 1 (gamma < 1 below it)."""
    s, q, _ = stats.unbind(1)
    d = s + EPS
    if variant == Variant.PAPER:
        return 1.0 + positions * (q / (d * d) - 2.0 * s / d + consts[:, 0])
    return q / (d * d)  # projected: top + rest


def _straddling_beta_rank(tensors, positions, full_rank, variant):
    """A beta_rank splitting the layers at gamma = 1 (the widest relative gap between their critical
    values, so far from 1 for every layer); one layer: below its critical value."""
    stats = naive.reweight_forward(**tensors, alpha=ALPHA, beta_rank=float(full_rank), positions=positions, eps=EPS,
                                   variant=variant)[1]
    crit = _critical_beta_rank(stats, tensors["consts"], positions, variant).sort().values.tolist()
    if len(crit) == 1:
        return 0.5 * (crit[0] + (1.0 if variant == Variant.PAPER else 0.0))
    i = max(range(len(crit) - 1), key=lambda j: crit[j + 1] / crit[j])
    return (crit[i] * crit[i + 1]) ** 0.5


@functools.lru_cache(maxsize=None)
def op_case(L: int, shape: str, variant: str, beta: Optional[float] = None, padding_mode: str = "zeros",
            seed: int = 0) -> OpCase:
    """The ops' float64 arguments for ``L`` random layers of ``SHAPES[shape]`` and ``variant`` ("sn",
    "paper", "projected"), with power-iteration kernels converged for the kernel and, for the
    second pair, for its reweighting at ``beta`` (what a refreshed layer holds). ``beta=None``
    (paper/projected): the reweighting is computed at beta = 0.3 and beta_rank is then chosen so
    that gamma straddles 1 across the layers (some are reweighted, B != 0, some are not)."""
    code = VARIANTS[variant]
    if code == Variant.SN and beta not in (None, 1.0):
        raise ValueError(f"variant 'sn' is beta = 1, got beta={beta}")
    if code != Variant.SN and beta is not None and naive.variant_code(variant, beta) != code:
        raise ValueError(f"beta={beta} makes variant {variant!r} spectral normalization")
    weight_shape, padding = SHAPES[shape]
    size = (max(7, weight_shape[2]), max(6, weight_shape[3]))
    geometry = ConvGeometry.create(weight_shape, size, padding=padding, padding_mode=padding_mode)
    gen = torch.Generator().manual_seed(seed)
    with one_thread():
        layers = refreshed_layers(geometry, L, "paper" if code == Variant.SN else variant,
                                  1.0 if code == Variant.SN else (0.3 if beta is None else beta), gen)
        T = weight_shape[2] * weight_shape[3]
        kernel, s1, s1_out = (x.reshape(L, -1, T) for x in layers)
        direction, consts = naive.prepare_constants(s1, s1_out, geometry.kernel_gram_pinv(), code)
        tensors = dict(kernel=kernel, s1=s1, direction=direction, s1_out=s1_out, gram=geometry.kernel_gram(),
                       consts=consts)
        h, w = geometry.output_size
        positions = float(h * w)
        if code == Variant.SN:
            beta_rank = float(geometry.full_rank)
        elif beta is None:
            beta_rank = _straddling_beta_rank(tensors, positions, geometry.full_rank, code)
        else:
            beta_rank = beta * geometry.full_rank
        scalars = dict(alpha=ALPHA, beta_rank=beta_rank, positions=positions, eps=EPS, variant=int(code))
        grad = torch.randn(kernel.shape, dtype=F64, generator=gen)
    case = OpCase(geometry, tensors, scalars, grad)
    if code != Variant.SN and beta is None:
        acts = reweighted_layers(case)
        assert acts.any() and (L == 1 or not acts.all()), "gamma must straddle 1 across the layers"
    return case


def reweighted_layers(case: OpCase) -> torch.Tensor:
    """Per layer, whether the reweighting acts (B != 0, gamma < 1) at the case's scalars."""
    stats = naive.reweight_forward(**case.tensors, **case.scalars)[1]
    s = case.scalars
    _, b = coefficients(*stats.unbind(1), *case.tensors["consts"].unbind(1), s["alpha"], s["beta_rank"],
                        s["positions"], s["eps"], s["variant"])
    return b != 0


def _sigma_estimates(case: OpCase) -> torch.Tensor:
    return naive.reweight_forward(**case.tensors, **{**case.scalars, "floor": 0.0})[1][:, 0]


def floored(case: OpCase) -> OpCase:
    """``case`` with ``floor`` (tau) in the widest relative gap between its layers' sigma estimates ``s``
    (far from every layer's ``s``: some layers below the floor, some above); one layer: ``tau = 1.5 s``."""
    s = _sigma_estimates(case).sort().values.tolist()
    assert s[0] > 0, "op_case layers have converged vectors: s = sigma_1 > 0"
    if len(s) == 1:
        return case.with_scalars(floor=1.5 * s[0])
    i = max(range(len(s) - 1), key=lambda j: s[j + 1] / s[j])
    return case.with_scalars(floor=(s[i] * s[i + 1]) ** 0.5)


def below_floor(case: OpCase) -> torch.Tensor:
    """Per layer, whether its sigma estimate is below the case's floor (the floor's blend acts)."""
    return _sigma_estimates(case) < case.scalars.get("floor", 0.0)


# ---------------------------------------------------------------------------------------------- oracle and op
def oracle(tensors, scalars, grad, dtype=F64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``naive``'s (out, stats, grad_kernel) on CPU in ``dtype``."""
    t = {k: v.cpu().to(dtype) for k, v in tensors.items()}
    out, stats = naive.reweight_forward(**t, **scalars)
    return out, stats, naive.reweight_backward(grad.cpu().to(dtype), **t, stats=stats, **scalars)


def run_op(ops, tensors, scalars, grad) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An op set's (out, stats, grad_kernel), the gradient through the op's autograd."""
    kernel = tensors["kernel"].detach().requires_grad_()  # keeps the layout
    out, stats = ops.reweight_forward(**{**tensors, "kernel": kernel}, **scalars)
    assert out.dtype == kernel.dtype and not stats.requires_grad
    (grad_kernel,) = torch.autograd.grad(out, kernel, grad)
    return out.detach(), stats, grad_kernel


# ---------------------------------------------------------------------------------------------- tolerances
def scales(expected, kernel, grad):
    """Per output (out, stats, grad_kernel) the scale that errors are measured against: the largest
    magnitude; per column for stats (s, q, p differ by orders of magnitude); for grad_kernel at least
    |grad| |out| / |kernel|, since grad_kernel can cancel to ~0."""
    out, stats, grad_kernel = (x.cpu().to(F64) for x in expected)
    kernel, grad = kernel.cpu().to(F64), grad.cpu().to(F64)
    grad_scale = torch.maximum(grad_kernel.abs().max(), grad.abs().max() * out.abs().max() / kernel.abs().max())
    return [x.clamp_min(torch.finfo(F64).tiny) for x in (out.abs().max(), stats.abs().amax(0), grad_scale)]


# float64, float32: |got - expected| <= atol * scale + rtol * |expected|. At least as tight as the
# rules each backend's tests had before sharing them (compiled: rtol = atol = 1e-10 / 1e-5 against the
# largest |expected|; Triton: float32 rtol 5e-5, atol 5e-6 against these scales; on the compiled
# cases the grad scale is at most 1.52 x the largest |grad_kernel|). Measured worst case (compiled,
# Triton interpreter): 0.17 of the float32 bound, 2e-4 of the float64 one.
TOLERANCE = {F64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
LOW_ATOL = 1e-5  # the low-precision rule's atol, relative to the output's scale


def assert_matches(got, expected, dtype, scale, what=""):
    """float64/float32: ``|got - expected| <= atol * scale + rtol * |expected|`` (``TOLERANCE``)."""
    got, expected, scale = got.cpu().to(F64), expected.cpu().to(F64), torch.as_tensor(scale).to(F64)
    torch.testing.assert_close(got / scale, expected / scale, **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


def assert_within_twice(got, expected, baseline, scale, what=""):
    """The low-precision rule: the op's error against ``expected`` is at most twice that of
    ``baseline`` (the oracle run in float32 on the inputs rounded to the op's dtype, its output
    rounded to that dtype), plus ``LOW_ATOL``; both relative to ``scale``."""
    scale = torch.as_tensor(scale).to(F64)
    err = ((got.cpu().to(F64) - expected.cpu().to(F64)) / scale).abs().max().item()
    base = ((baseline.cpu().to(F64) - expected.cpu().to(F64)) / scale).abs().max().item()
    assert err <= 2 * base + LOW_ATOL, f"{what}: error {err:.3g} > 2 x {base:.3g} (pure PyTorch in float32) + {LOW_ATOL}"


def assert_low_precision(got, exact, rounded, baseline, scale, what=""):
    """float16/bfloat16: the low-precision rule against the float64 oracle both on the exact inputs
    (the error a user sees, input rounding included) and on the rounded ones (the arithmetic alone)."""
    assert_within_twice(got, exact, baseline, scale, f"{what}, against the exact inputs")
    assert_within_twice(got, rounded, baseline, scale, f"{what}, against the rounded inputs")


# ---------------------------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class OpBackend:
    """A fast backend under test: its checked entry points, its ``torch.ops`` namespace and device."""

    name: str
    namespace: str
    device: str
    _ops: Callable

    @property
    def ops(self):
        return self._ops()

    def torch_op(self, op: str):
        return getattr(getattr(torch.ops, self.namespace), op)


def _compiled_ops():
    from srnc_ext.ops import compiled

    return compiled.OPS


def _triton_ops():
    from srnc_ext.ops import triton_ops

    return triton_ops.OPS


def _compiled_skip():
    from srnc_ext.ops import compiled

    return None if compiled.AVAILABLE else f"srnc_ext._C is not built ({compiled.IMPORT_ERROR}); {compiled.REBUILD_HINT}"


def _cuda_skip():
    from srnc_ext.ops import compiled

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return _compiled_skip() or (None if compiled.has_cuda_kernels() else "srnc_ext._C has no CUDA kernels")


def _triton_skip():
    from srnc_ext.ops import triton_ops

    return None if triton_ops.AVAILABLE else f"Triton unavailable: {triton_ops.REASON}"


def _param(backend: OpBackend, skip: Optional[str], *marks):
    marks = list(marks) + ([pytest.mark.skip(reason=skip)] if skip else [])
    return pytest.param(backend, id=backend.name, marks=marks)


COMPILED_CPU = OpBackend("compiled-cpu", "srnc_ext", "cpu", _compiled_ops)
COMPILED_CUDA = OpBackend("compiled-cuda", "srnc_ext", "cuda", _compiled_ops)
# Triton on a GPU, else through its interpreter on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py)
TRITON = OpBackend("triton", "srnc_ext_triton", "cuda" if torch.cuda.is_available() else "cpu", _triton_ops)


def backend_params(*backends: OpBackend):
    """pytest params of ``backends`` (default all three), skipped where they cannot run."""
    table = {COMPILED_CPU: lambda: _param(COMPILED_CPU, _compiled_skip()),
             COMPILED_CUDA: lambda: _param(COMPILED_CUDA, _cuda_skip(), pytest.mark.gpu),
             TRITON: lambda: _param(TRITON, _triton_skip(), *([pytest.mark.gpu] if TRITON.device == "cuda" else []))}
    return [table[b]() for b in (backends or tuple(table))]


BACKENDS = backend_params()
