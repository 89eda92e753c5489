"""Start vectors for a layer's power iteration from the Fourier symbol of its kernel.

A stride-1 conv ``W`` with kernel ``K (C_out, C_in/g, *k)`` maps a plane wave to a plane wave:
for ``x(z) = exp(i w.z) v``, ``(W x)(y) = exp(i w.y) M(w) v`` with the *symbol*

    M(w) = sum_t K[:, :, t] exp(i w.(d*t - p))        (C_out x C_in, block-diagonal over groups)

(``d`` the dilation, ``p`` the leading padding, ``t`` the tap). For circular padding the operator
is block-diagonalized by the DFT: its singular values are those of ``M(w)`` on the grid
``w = 2 pi m / n`` and the top singular pair of ``M(w*)``, as a real plane wave, is an exact top
singular pair of ``W``. For zero (and reflect/replicate) padding on maps much larger than the
kernel ``sigma_1(W)`` approaches ``max_w sigma_1(M(w))`` from below, and the plane wave under a
boundary window is close to the top singular vector. ``symbol_start`` finds ``w*`` (a coarse
grid, then a local pattern search, both with a batched power iteration on the small symbol
matrices, then an exact SVD at ``w*``) and builds the real start vectors
``v(z) = win(z) Re(exp(i(w*.z + phi)) v^)``, ``u(y) = win(y) Re(exp(i(w*.y + phi)) M(w*) v^)``.

The search costs a small fraction of one full-map power-iteration step on large maps; where it
would not pay (stride > 1, a Linear's one-pixel map, maps of few pixels) ``layer_start`` returns
None and the caller keeps the random start and its full warm-up. See ``module.reset_power_iteration``
for the measured number of full-map iterations that follow a symbol start.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import batched_refresh
from .conv_operator import ConvGeometry
from .ops import VARIANT_PROJECTED, prepare_constants
from .power_iteration import normal_tensors
from .precision import no_autocast

# The symbol search runs on the CPU: power steps in float32 (a ranking of frequencies), the top pair
# at the chosen frequency by a float64 SVD.
_SEARCH_DTYPE = torch.float32
_DTYPE = torch.float64  # frequencies, the final symbol matrix, the plane waves
MAX_GRID = 256  # the most frequencies of the coarse grid (per group)
COARSE_STEPS = 8  # power steps per coarse-grid frequency (a ranking, not a value)
CANDIDATES = 4  # coarse maxima refined (the symbol's sigma_1 can have several local maxima)
REFINE_ROUNDS = 6  # pattern-search rounds, the step halving each round
REFINE_STEPS = 3  # power steps per point and round (warm-started from the centre's vector)
# Maps with a side below MIN_SIDE (along a dim the kernel spans) keep the random start: there the boundary
# moves the top singular vector far from a windowed plane wave (3->4 3x3x3 at 6x6x6, zero padding: 8e-3
# from alpha after the symbol warm-up against 8e-4 after 15 random-start iterations), and full-map steps
# cost less than the search anyway.
MIN_SIDE = 16
# Padding modes the symbol describes: zero padding (under the sine window) and circular. Not reflect or
# replicate: mirrored boundary pixels count twice and the top singular vector sits at the border, above
# max_w sigma_1(M(w)) (64->64 3x3 at 64x64, default init: 1.378 against the symbol's 1.153).
SYMBOL_MODES = ("zeros", "circular")


@dataclass
class SymbolStart:
    """The top of the symbol: frequency ``w`` (one per spatial dim), the group ``group``, its top
    singular value ``sigma`` and pair ``u_hat (C_out/g,)``, ``v_hat (C_in/g,)`` (complex128, unit,
    ``M(w) v_hat = sigma u_hat``, the padding phase included)."""

    w: Tuple[float, ...]
    group: int
    sigma: float
    u_hat: torch.Tensor
    v_hat: torch.Tensor


def supported(geometry: ConvGeometry) -> bool:
    """Whether a symbol start pays for this operator: stride 1, a padding mode in ``SYMBOL_MODES``
    (circular only when the operator is circulant), input sides of at least ``MIN_SIDE`` along the dims
    the kernel spans, and more
    than one tap (a one-tap kernel's symbol is the matrix itself: the start would be its exact SVD)."""
    if any(s != 1 for s in geometry.stride) or geometry.padding_mode not in SYMBOL_MODES:
        return False
    if geometry.padding_mode == "circular" and any(geometry.pad) and not geometry.is_circulant:
        return False
    spanned = [n for n, k in zip(geometry.input_size, geometry.kernel_size) if k > 1]
    return bool(spanned) and min(spanned) >= MIN_SIDE


def _offsets(geometry: ConvGeometry) -> torch.Tensor:
    """``(T, ndim)``: the input offset ``d*t - p`` of each tap (row-major over the kernel), float64."""
    before = [geometry._pad_of(i)[0] for i in range(geometry.ndim)]
    taps = itertools.product(*(range(k) for k in geometry.kernel_size))
    return torch.tensor([[d * t - p for t, d, p in zip(tap, geometry.dilation, before)] for tap in taps],
                        dtype=_DTYPE).reshape(geometry.taps, geometry.ndim)


class _Symbol:
    """``M(w)`` of one kernel, applied to batches of vectors at batches of frequencies (float32), or
    formed explicitly (float64)."""

    def __init__(self, geometry: ConvGeometry, kernel: torch.Tensor) -> None:
        g, taps = geometry.groups, geometry.taps
        self.g, self.c_out, self.c_in, self.taps = g, geometry.out_channels // g, geometry.in_channels // g, taps
        k = kernel.detach().to(device="cpu", dtype=_DTYPE).reshape(g, self.c_out, self.c_in, taps)
        self.kernel = k.permute(0, 3, 1, 2)  # (g, T, Co, Ci) float64
        self.stacked = self.kernel.reshape(g, taps * self.c_out, self.c_in).to(_SEARCH_DTYPE)  # (g, T*Co, Ci)
        self.offsets = _offsets(geometry)

    def finite_nonzero(self) -> bool:
        return bool(torch.isfinite(self.kernel).all()) and bool(self.kernel.any())

    def phases(self, w: torch.Tensor, dtype=_SEARCH_DTYPE) -> torch.Tensor:
        """``(T, F)`` complex: ``exp(i w.(d t - p))`` for frequencies ``w (F, ndim)`` (float64)."""
        angle = (self.offsets @ w.T).to(dtype)
        return torch.polar(torch.ones_like(angle), angle)

    def matrices(self, w: torch.Tensor) -> torch.Tensor:
        """``(F, g, Co, Ci)`` complex128: ``M(w)`` explicitly."""
        return torch.einsum("tf,gtoi->fgoi", self.phases(w, _DTYPE), self.kernel.to(torch.complex128))

    def apply(self, phases: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``M(w_f) x_f``: ``x (g, Ci, F)`` complex64 -> ``(g, Co, F)`` (one real GEMM)."""
        g, f = self.g, x.shape[-1]
        y = self.stacked @ torch.view_as_real(x).reshape(g, self.c_in, 2 * f)  # (g, T*Co, 2F)
        y = torch.view_as_complex(y.reshape(g, self.taps, self.c_out, f, 2))
        return (y * phases[None, :, None, :]).sum(1)

    def adjoint(self, phases: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``M(w_f)^H y_f``: ``y (g, Co, F)`` -> ``(g, Ci, F)`` (one real GEMM)."""
        g, f = self.g, y.shape[-1]
        z = torch.view_as_real(phases.conj()[None, :, None, :] * y[:, None]).reshape(g, self.taps * self.c_out, 2 * f)
        return torch.view_as_complex((self.stacked.transpose(1, 2) @ z).reshape(g, self.c_in, f, 2).contiguous())


def _power(symbol: _Symbol, phases: torch.Tensor, x: torch.Tensor, steps: int):
    """``steps`` power steps on ``M^H M`` at each frequency: ``(sigma (g, F), x (g, Ci, F))``, x unit;
    sigma = ||M x|| before the last step (a lower bound on sigma_1(M))."""
    sigma = None
    for _ in range(steps):
        y = symbol.apply(phases, x)
        sigma = torch.linalg.vector_norm(y, dim=1)
        x = symbol.adjoint(phases, y)
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)
    return sigma, x


def _coarse_grid(geometry: ConvGeometry) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(theta (F, ndim), spacing (ndim,))``: the coarse grid of ``theta = w * d`` over ``[-pi, pi)``
    (the symbol's sigma is ``2 pi / d`` periodic in w and even), at most ``MAX_GRID`` points, and its
    spacing (0 along dims of one tap, where the symbol is constant)."""
    n = geometry.ndim
    per_dim = [1 if k == 1 else 4 * (k - 1) for k in geometry.kernel_size]
    while math.prod(per_dim) > MAX_GRID:
        i = max(range(n), key=lambda j: per_dim[j])
        per_dim[i] = max(2, per_dim[i] // 2)
    axes = [torch.arange(m, dtype=_DTYPE) * (2 * math.pi / m) - (math.pi if m > 1 else 0.0) for m in per_dim]
    grid = torch.cartesian_prod(*axes).reshape(-1, n)
    # sigma(M(-w)) = sigma(M(w)) (a real kernel): keep the half with the first varying theta <= 0
    varying = [i for i, m in enumerate(per_dim) if m > 1]
    if varying:
        grid = grid[grid[:, varying[0]] <= 1e-12]
    spacing = torch.tensor([2 * math.pi / m if m > 1 else 0.0 for m in per_dim], dtype=_DTYPE)
    return grid, spacing


def _search(symbol: _Symbol, geometry: ConvGeometry) -> torch.Tensor:
    """``(ndim,)``: ``theta`` at a local maximum of ``max_group sigma_1(M)``: the coarse grid's best
    ``CANDIDATES`` points refined by a pattern search (a stencil of +-h along each dim, then the
    vertex of each dim's parabola; back to the best point seen when that went downhill; h halves
    each round), the best point found."""
    dilation = torch.tensor(geometry.dilation, dtype=_DTYPE)
    grid, spacing = _coarse_grid(geometry)
    gen = torch.Generator().manual_seed(0)  # deterministic, and the global RNG stream is left alone
    x0 = torch.view_as_complex(torch.randn(symbol.g, symbol.c_in, 1, 2, generator=gen, dtype=_SEARCH_DTYPE))
    sigma, x = _power(symbol, symbol.phases(grid / dilation), x0.expand(-1, -1, len(grid)), COARSE_STEPS)
    coarse = sigma.max(0).values
    dims = [i for i in range(geometry.ndim) if spacing[i] > 0]
    if not dims:
        return grid[int(coarse.argmax())]
    chosen = coarse.argsort(descending=True)[:CANDIDATES]
    centres = grid[chosen]  # (C, ndim)
    c, s = len(centres), 1 + 2 * len(dims)
    steps = torch.zeros(s, geometry.ndim, dtype=_DTYPE)
    for j, i in enumerate(dims):
        steps[1 + 2 * j, i], steps[2 + 2 * j, i] = -1.0, 1.0
    h = spacing / 2
    x = x[:, :, chosen, None].expand(-1, -1, -1, s).reshape(symbol.g, symbol.c_in, c * s)  # warm: the coarse vectors
    best_value = torch.full((c,), -1.0, dtype=_SEARCH_DTYPE)
    best_point = centres.clone()
    for _ in range(REFINE_ROUNDS):
        points = (centres[:, None, :] + steps[None] * h).reshape(c, s, geometry.ndim)
        sigma, x = _power(symbol, symbol.phases(points.reshape(-1, geometry.ndim) / dilation), x, REFINE_STEPS)
        value = sigma.max(0).values.reshape(c, s)
        top, where = value.max(1)
        improved = top > best_value
        best_value = torch.where(improved, top, best_value)
        best_point = torch.where(improved[:, None], points[torch.arange(c), where], best_point)
        f0, fm, fp = value[:, :1], value[:, 1::2], value[:, 2::2]
        curvature = (fp + fm - 2 * f0).to(_DTYPE)
        shift = torch.where(curvature < 0, (fm - fp).to(_DTYPE) / (2 * curvature).clamp_max(-1e-30),
                            torch.sign(fp - fm).to(_DTYPE))
        move = torch.zeros_like(centres)
        move[:, dims] = shift.clamp(-1, 1) * h[dims]
        centres = torch.where(improved[:, None], centres + move, best_point)
        # the centre's vector warm-starts the next round's stencil
        x = x.reshape(symbol.g, symbol.c_in, c, s)[..., :1].expand(-1, -1, -1, s).reshape(symbol.g, symbol.c_in, -1)
        h = h / 2
    return best_point[int(best_value.argmax())]


def _grid_neighbours(m: torch.Tensor, sizes) -> torch.Tensor:
    """The integer frequencies ``m (ndim,)`` and their neighbours on the torus ``sizes``."""
    shifts = torch.cartesian_prod(*([torch.tensor([-1, 0, 1])] * len(sizes))).reshape(-1, len(sizes))
    return (m[None] + shifts) % torch.tensor(sizes)


def _snap_to_grid(symbol: _Symbol, w: torch.Tensor, sizes) -> torch.Tensor:
    """A circulant operator's frequencies are ``2 pi m / n``: from the grid point nearest ``w``, a
    hill-climb on the grid by exact sigma_1 of ``M`` (a local maximum over the DFT grid)."""
    scale = torch.tensor([2 * math.pi / n for n in sizes], dtype=_DTYPE)
    seen: Dict[tuple, float] = {}

    def evaluate(candidates) -> None:
        new = sorted({tuple(m.tolist()) for m in candidates} - seen.keys())
        if new:
            values = torch.linalg.matrix_norm(symbol.matrices(torch.tensor(new, dtype=_DTYPE) * scale), ord=2)
            seen.update(zip(new, values.max(1).values.tolist()))

    best = tuple((torch.round(w / scale).long() % torch.tensor(sizes)).tolist())
    for _ in range(math.prod(sizes)):
        evaluate(_grid_neighbours(torch.tensor(best), sizes))
        top = max(seen, key=seen.get)
        if seen[top] <= seen[best]:
            break
        best = top
    return torch.tensor(best, dtype=_DTYPE) * scale


def symbol_start(geometry: ConvGeometry, kernel: torch.Tensor) -> Optional[SymbolStart]:
    """The top singular pair of the symbol at its maximizing frequency (see the module docstring).

    ``kernel``: the ``(C_out, C_in/g, *k)`` kernel of ``geometry``'s conv. For a circulant operator
    ``w`` is on the DFT grid of the input size (a local maximum over that grid). None for a stride
    > 1 and for a zero or non-finite kernel.
    """
    if any(s != 1 for s in geometry.stride):
        return None
    with torch.no_grad():
        symbol = _Symbol(geometry, kernel)
        if not symbol.finite_nonzero():
            return None
        w = _search(symbol, geometry) / torch.tensor(geometry.dilation, dtype=_DTYPE)  # theta's alias of least |w|
        if geometry.is_circulant:
            w = _snap_to_grid(symbol, w, geometry.input_size)
        matrices = symbol.matrices(w[None])[0]  # (g, Co, Ci)
        u, s, vh = torch.linalg.svd(matrices)
        group = int(s[:, 0].argmax())
        return SymbolStart(w=tuple(w.tolist()), group=group, sigma=float(s[group, 0]), u_hat=u[group, :, 0],
                           v_hat=vh[group, 0].conj())


def _wave(w, size, windowed: bool) -> torch.Tensor:
    """``(prod(size), 2)``: real and imaginary part of ``exp(i w.x)`` over a map of ``size``, times
    ``prod_d sin(pi (x_d + 1) / (n_d + 1))`` when ``windowed``."""
    out = torch.ones((), dtype=torch.complex128)
    for wd, n in zip(w, size):
        x = torch.arange(n, dtype=_DTYPE)
        axis = torch.polar(torch.ones(n, dtype=_DTYPE), wd * x)
        if windowed:
            axis = axis * torch.sin(math.pi * (x + 1) / (n + 1))
        out = out[..., None] * axis
    return torch.view_as_real(out.reshape(-1))


def start_vectors(geometry: ConvGeometry, start: SymbolStart, dtype: torch.dtype, device,
                  memory_format=torch.contiguous_format, window: Optional[bool] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)``: real unit start vectors ``(1, C_out, *output_size)``, ``(1, C_in, *input_size)``
    from ``start``: plane waves at ``start.w`` carrying the symbol's top pair in its group's
    channels, under the sine boundary window (``window``; default: unless the operator is circulant)."""
    windowed = not geometry.is_circulant if window is None else window
    waves = [_wave(start.w, size, windowed) for size in (geometry.output_size, geometry.input_size)]
    # the global phase that maximizes ||Re(.)|| of v (matters at w = 0 or pi, where the wave is real)
    e_in = torch.view_as_complex(waves[1].contiguous())
    phase = torch.polar(torch.ones((), dtype=_DTYPE), -torch.angle((start.v_hat * start.v_hat).sum() * (e_in * e_in).sum()) / 2)
    vectors = []
    for hat, wave, channels, size in ((start.u_hat, waves[0], geometry.out_channels, geometry.output_size),
                                      (start.v_hat, waves[1], geometry.in_channels, geometry.input_size)):
        # Re(c e) = Re(c) Re(e) - Im(c) Im(e), channel c of the group
        coefficients = torch.zeros(channels, 2, dtype=_DTYPE)
        per_group = hat.shape[0]
        rotated = phase * hat
        coefficients[start.group * per_group:(start.group + 1) * per_group] = torch.stack([rotated.real, -rotated.imag], 1)
        norm = torch.linalg.vector_norm(wave @ coefficients.T).clamp_min(1e-300)  # (P, C): cheap in float64
        coefficients, wave = (coefficients / norm).to(device=device, dtype=dtype), wave.to(device=device, dtype=dtype)
        if memory_format == torch.channels_last and len(size) == 2:
            value = (wave @ coefficients.T).reshape(1, *size, channels).permute(0, 3, 1, 2)
        else:
            value = (coefficients @ wave.T).reshape(1, channels, *size)
        vectors.append(value.contiguous(memory_format=memory_format))
    return vectors[0], vectors[1]


def layer_start(layer) -> Optional[Dict[str, torch.Tensor]]:
    """The symbol start of an SRN-C layer's power iteration(s) on its current weight: ``{name: vector}``
    for ``u``, ``v`` and, when the layer's variant runs the second power iteration, ``u_out``,
    ``v_out`` (at beta = 1 they exist but no refresh reads them: left to the random start), unit, in the dtype, device and memory format
    of the layer's vectors (``PowerIterationState.allocate``), as normal tensors even under inference
    mode; None where ``supported`` says no, on the meta device, or for a zero or non-finite weight
    (the caller then keeps the random start and the full warm-up).

    The projected variant's second power iteration (the reweighted kernel's, ``u_out``, ``v_out``)
    starts from the symbol start of the reweighted kernel that the first start's rank-one kernel
    gives (the batched refresh then recomputes it from the refreshed vectors).
    """
    geometry, weight = layer.geometry, layer.weight
    if geometry is None or weight.is_meta or not supported(geometry):
        return None
    dtype, device = layer.compute_dtype, weight.device
    fmt = batched_refresh.vector_format(device, geometry.ndim)
    with torch.no_grad(), normal_tensors(), no_autocast(weight):
        kernel = weight.detach().to(dtype).reshape(geometry.weight_shape)
        start = symbol_start(geometry, kernel)
        if start is None:
            return None
        u, v = start_vectors(geometry, start, dtype, device, fmt)
        vectors = {"u": u, "v": v}
        if layer.variant_code == VARIANT_PROJECTED:  # (at beta = 1 u_out, v_out exist but stay unused)
            taps = geometry.taps
            s1 = geometry.kernel_grad(v, u).reshape(1, -1, taps)
            gram, gram_pinv = geometry.kernel_gram(dtype, device), geometry.kernel_gram_pinv(dtype, device)
            direction, consts = prepare_constants(s1, s1, gram_pinv, VARIANT_PROJECTED)
            reweighted, _ = layer.ops.reweight_forward(kernel.reshape(1, -1, taps), s1, direction, s1, gram, consts,
                                                       *layer.op_scalars()[:5])
            second = symbol_start(geometry, reweighted.reshape(geometry.weight_shape))
            if second is None:
                return None
            vectors["u_out"], vectors["v_out"] = start_vectors(geometry, second, dtype, device, fmt)
    return vectors
