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
from typing import Dict, List, Optional, Tuple

import torch

from . import batched_refresh
from .conv_operator import ConvGeometry
from .ops import VARIANT_PROJECTED
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
# the largest product of one batched search, in entries (float32, 64 MiB): about 360 64->64 3x3 kernels
SEARCH_ELEMENTS = 2**24
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
    """``M(w)`` of ``B`` kernels of one geometry, applied to batches of vectors at batches of
    frequencies (one set of frequencies per kernel; float32), or formed explicitly (float64).

    Vectors are ``(B*g, C, F)``: kernel ``b``'s group ``j`` at row ``b*g + j``, frequency ``f`` of that
    kernel in column ``f``."""

    def __init__(self, geometry: ConvGeometry, kernels: torch.Tensor) -> None:
        g, taps = geometry.groups, geometry.taps
        self.g, self.c_out, self.c_in, self.taps = g, geometry.out_channels // g, geometry.in_channels // g, taps
        self.b = kernels.shape[0]
        k = kernels.detach().to(device="cpu", dtype=_DTYPE).reshape(self.b, g, self.c_out, self.c_in, taps)
        self.kernel = k.permute(0, 1, 4, 2, 3)  # (B, g, T, Co, Ci) float64
        self.stacked = self.kernel.reshape(self.b * g, taps * self.c_out, self.c_in).to(_SEARCH_DTYPE)  # (B*g, T*Co, Ci)
        self.offsets = _offsets(geometry)

    def usable(self) -> torch.Tensor:
        """``(B,)`` bool: the kernels that are finite and not all zero."""
        flat = self.kernel.reshape(self.b, -1)
        return torch.isfinite(flat).all(1) & flat.ne(0).any(1)

    def phases(self, w: torch.Tensor, dtype=_SEARCH_DTYPE) -> torch.Tensor:
        """``(B, T, F)`` complex: ``exp(i w.(d t - p))`` for frequencies ``w (B, F, ndim)`` (float64)."""
        angle = torch.einsum("td,bfd->btf", self.offsets, w).to(dtype)
        return torch.polar(torch.ones_like(angle), angle)

    def matrices(self, w: torch.Tensor) -> torch.Tensor:
        """``(B, F, g, Co, Ci)`` complex128: ``M(w)`` explicitly, ``w (B, F, ndim)``."""
        return torch.einsum("btf,bgtoi->bfgoi", self.phases(w, _DTYPE), self.kernel.to(torch.complex128))

    def apply(self, phases: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``M(w_f) x_f``: ``x (B*g, Ci, F)`` complex64 -> ``(B*g, Co, F)`` (one batched real GEMM)."""
        bg, f = x.shape[0], x.shape[-1]
        y = self.stacked @ torch.view_as_real(x).reshape(bg, self.c_in, 2 * f)  # (B*g, T*Co, 2F)
        y = torch.view_as_complex(y.reshape(self.b, self.g, self.taps, self.c_out, f, 2))
        return (y * phases[:, None, :, None, :]).sum(2).reshape(bg, self.c_out, f)

    def adjoint(self, phases: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``M(w_f)^H y_f``: ``y (B*g, Co, F)`` -> ``(B*g, Ci, F)`` (one batched real GEMM)."""
        bg, f = y.shape[0], y.shape[-1]
        z = phases.conj()[:, None, :, None, :] * y.reshape(self.b, self.g, 1, self.c_out, f)  # (B, g, T, Co, F)
        z = torch.view_as_real(z).reshape(bg, self.taps * self.c_out, 2 * f)
        return torch.view_as_complex((self.stacked.transpose(1, 2) @ z).reshape(bg, self.c_in, f, 2).contiguous())

    def top(self, sigma: torch.Tensor) -> torch.Tensor:
        """``(B, F)``: the largest over each kernel's groups of ``sigma (B*g, F)``."""
        return sigma.reshape(self.b, self.g, -1).max(1).values


def _power(symbol: _Symbol, phases: torch.Tensor, x: torch.Tensor, steps: int):
    """``steps`` power steps on ``M^H M`` at each frequency: ``(sigma (B*g, F), x (B*g, Ci, F))``, x unit;
    sigma = ||M x|| before the last step (a lower bound on sigma_1(M))."""
    sigma = None
    for _ in range(steps):
        y = symbol.apply(phases, x)
        sigma = _norms(y)
        x = symbol.adjoint(phases, y)
        x = x / _norms(x).clamp_min(1e-30)[:, None, :]
    return sigma, x


def _norms(x: torch.Tensor) -> torch.Tensor:
    """``(B*g, F)``: the norms of the columns of ``x (B*g, C, F)`` complex (a real sum of squares: a
    third of the time of ``vector_norm`` on complex values)."""
    return torch.view_as_real(x).square().sum((1, 3)).sqrt()


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
    """``(B, ndim)``: for each kernel, ``theta`` at a local maximum of ``max_group sigma_1(M)``: the
    coarse grid's best ``CANDIDATES`` points refined by a pattern search (a stencil of +-h along each
    dim, then the vertex of each dim's parabola; back to the best point seen when that went downhill;
    h halves each round), the best point found. The kernels are searched side by side (batched
    GEMMs), each on its own points."""
    b, g, ci = symbol.b, symbol.g, symbol.c_in
    dilation = torch.tensor(geometry.dilation, dtype=_DTYPE)
    grid, spacing = _coarse_grid(geometry)
    gen = torch.Generator().manual_seed(0)  # deterministic, and the global RNG stream is left alone
    x0 = torch.view_as_complex(torch.randn(g, ci, 1, 2, generator=gen, dtype=_SEARCH_DTYPE))
    x0 = x0.expand(b, -1, -1, len(grid)).reshape(b * g, ci, len(grid))  # the same start for every kernel
    sigma, x = _power(symbol, symbol.phases((grid / dilation).expand(b, -1, -1)), x0, COARSE_STEPS)
    coarse = symbol.top(sigma)  # (B, F)
    dims = [i for i in range(geometry.ndim) if spacing[i] > 0]
    if not dims:
        return grid[coarse.argmax(1)]
    chosen = coarse.argsort(1, descending=True)[:, :CANDIDATES]  # (B, C)
    centres = grid[chosen]  # (B, C, ndim)
    c, s = chosen.shape[1], 1 + 2 * len(dims)
    steps = torch.zeros(s, geometry.ndim, dtype=_DTYPE)
    for j, i in enumerate(dims):
        steps[1 + 2 * j, i], steps[2 + 2 * j, i] = -1.0, 1.0
    h = spacing / 2
    # warm: the coarse vectors of the chosen points
    x = torch.gather(x.reshape(b, g, ci, -1), 3, chosen[:, None, None, :].expand(-1, g, ci, -1))
    x = x[..., None].expand(-1, -1, -1, -1, s).reshape(b * g, ci, c * s)
    best_value = torch.full((b, c), -1.0, dtype=_SEARCH_DTYPE)
    best_point = centres.clone()
    for _ in range(REFINE_ROUNDS):
        points = centres[:, :, None, :] + steps * h  # (B, C, s, ndim)
        sigma, x = _power(symbol, symbol.phases(points.reshape(b, c * s, -1) / dilation), x, REFINE_STEPS)
        value = symbol.top(sigma).reshape(b, c, s)
        top, where = value.max(2)
        improved = top > best_value
        best_value = torch.where(improved, top, best_value)
        reached = torch.gather(points, 2, where[:, :, None, None].expand(-1, -1, 1, geometry.ndim))[:, :, 0]
        best_point = torch.where(improved[..., None], reached, best_point)
        f0, fm, fp = value[..., :1], value[..., 1::2], value[..., 2::2]
        curvature = (fp + fm - 2 * f0).to(_DTYPE)
        shift = torch.where(curvature < 0, (fm - fp).to(_DTYPE) / (2 * curvature).clamp_max(-1e-30),
                            torch.sign(fp - fm).to(_DTYPE))
        move = torch.zeros_like(centres)
        move[..., dims] = shift.clamp(-1, 1) * h[dims]
        centres = torch.where(improved[..., None], centres + move, best_point)
        # the centre's vector warm-starts the next round's stencil
        x = x.reshape(b, g, ci, c, s)[..., :1].expand(-1, -1, -1, -1, s).reshape(b * g, ci, c * s)
        h = h / 2
    return best_point[torch.arange(b), best_value.argmax(1)]


def _grid_neighbours(m: torch.Tensor, sizes) -> torch.Tensor:
    """The integer frequencies ``m (ndim,)`` and their neighbours on the torus ``sizes``."""
    shifts = torch.cartesian_prod(*([torch.tensor([-1, 0, 1])] * len(sizes))).reshape(-1, len(sizes))
    return (m[None] + shifts) % torch.tensor(sizes)


def _snap_to_grid(symbol: _Symbol, w: torch.Tensor, sizes) -> torch.Tensor:
    """A circulant operator's frequencies are ``2 pi m / n``: from the grid point nearest ``w``, a
    hill-climb on the grid by exact sigma_1 of ``M`` (a local maximum over the DFT grid); ``symbol``
    holds one kernel."""
    scale = torch.tensor([2 * math.pi / n for n in sizes], dtype=_DTYPE)
    seen: Dict[tuple, float] = {}

    def evaluate(candidates) -> None:
        new = sorted({tuple(m.tolist()) for m in candidates} - seen.keys())
        if new:
            values = torch.linalg.matrix_norm(symbol.matrices(torch.tensor(new, dtype=_DTYPE)[None] * scale)[0], ord=2)
            seen.update(zip(new, values.max(1).values.tolist()))

    best = tuple((torch.round(w / scale).long() % torch.tensor(sizes)).tolist())
    for _ in range(math.prod(sizes)):
        evaluate(_grid_neighbours(torch.tensor(best), sizes))
        top = max(seen, key=seen.get)
        if seen[top] <= seen[best]:
            break
        best = top
    return torch.tensor(best, dtype=_DTYPE) * scale


def _batch_size(geometry: ConvGeometry) -> int:
    """How many kernels one batched search takes: its largest product ``(B*g, T*Co, 2F)`` at most
    ``SEARCH_ELEMENTS`` entries."""
    grid, spacing = _coarse_grid(geometry)
    points = max(len(grid), CANDIDATES * (1 + 2 * int((spacing > 0).sum())))
    per_kernel = geometry.taps * geometry.out_channels * 2 * points
    return max(1, SEARCH_ELEMENTS // per_kernel)


def symbol_starts(geometry: ConvGeometry, kernels: torch.Tensor) -> List[Optional[SymbolStart]]:
    """``symbol_start`` of each of ``kernels (B, C_out, C_in/g, *k)``, one batched search for all
    (in runs of ``_batch_size``): None for a stride > 1 and for a zero or non-finite kernel."""
    if any(s != 1 for s in geometry.stride):
        return [None] * len(kernels)
    starts: List[Optional[SymbolStart]] = []
    with torch.no_grad():
        step = _batch_size(geometry)
        for first in range(0, len(kernels), step):
            starts += _starts(geometry, kernels[first:first + step])
    return starts


def _starts(geometry: ConvGeometry, kernels: torch.Tensor) -> List[Optional[SymbolStart]]:
    symbol = _Symbol(geometry, kernels)
    usable = symbol.usable()
    if not bool(usable.all()):
        starts: List[Optional[SymbolStart]] = [None] * len(kernels)
        index = usable.nonzero().flatten().tolist()
        if index:
            for i, start in zip(index, _starts(geometry, kernels[index])):
                starts[i] = start
        return starts
    w = _search(symbol, geometry) / torch.tensor(geometry.dilation, dtype=_DTYPE)  # theta's alias of least |w|
    if geometry.is_circulant:
        w = torch.stack([_snap_to_grid(_Symbol(geometry, kernels[i:i + 1]), w[i], geometry.input_size)
                         for i in range(len(kernels))])
    matrices = symbol.matrices(w[:, None])[:, 0]  # (B, g, Co, Ci)
    u, s, vh = torch.linalg.svd(matrices)
    groups = s[..., 0].argmax(1).tolist()
    return [SymbolStart(w=tuple(w[i].tolist()), group=j, sigma=float(s[i, j, 0]), u_hat=u[i, j, :, 0],
                        v_hat=vh[i, j, 0].conj()) for i, j in enumerate(groups)]


def symbol_start(geometry: ConvGeometry, kernel: torch.Tensor) -> Optional[SymbolStart]:
    """The top singular pair of the symbol at its maximizing frequency (see the module docstring).

    ``kernel``: the ``(C_out, C_in/g, *k)`` kernel of ``geometry``'s conv. For a circulant operator
    ``w`` is on the DFT grid of the input size (a local maximum over that grid). None for a stride
    > 1 and for a zero or non-finite kernel.
    """
    return symbol_starts(geometry, kernel[None])[0]


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
    return layer_starts([layer])[0]


def layer_starts(layers) -> List[Optional[Dict[str, torch.Tensor]]]:
    """``layer_start`` of each of ``layers``, the layers of one refresh signature searched together
    (one batched symbol search per signature, and per signature one batched rank-one kernel and
    reweighting for the projected variant's second start)."""
    layers = list(layers)
    starts: List[Optional[Dict[str, torch.Tensor]]] = [None] * len(layers)
    groups: Dict[tuple, List[int]] = {}
    for i, layer in enumerate(layers):
        geometry = layer.geometry
        if geometry is not None and not layer.weight.is_meta and supported(geometry):
            groups.setdefault(layer.signature(), []).append(i)
    for index in groups.values():
        for i, vectors in zip(index, _group_starts([layers[i] for i in index])):
            starts[i] = vectors
    return starts


def _group_starts(layers) -> List[Optional[Dict[str, torch.Tensor]]]:
    """``layer_start`` of same-signature ``layers``."""
    first = layers[0]
    geometry, dtype, device = first.geometry, first.compute_dtype, first.weight.device
    fmt = batched_refresh.vector_format(device, geometry.ndim)
    with torch.no_grad(), normal_tensors(), no_autocast(first.weight):
        kernels = torch.stack([layer.weight.detach().to(dtype).reshape(geometry.weight_shape) for layer in layers])
        found = symbol_starts(geometry, kernels)
        vectors: List[Optional[Dict[str, torch.Tensor]]] = [None] * len(layers)
        for i, start in enumerate(found):
            if start is not None:
                u, v = start_vectors(geometry, start, dtype, device, fmt)
                vectors[i] = {"u": u, "v": v}
        if first.variant_code != VARIANT_PROJECTED:  # (at beta = 1 u_out, v_out exist but stay unused)
            return vectors
        index = [i for i, value in enumerate(vectors) if value is not None]
        if not index:
            return vectors
        n, taps = len(index), geometry.taps
        group = batched_refresh.stacked(geometry, n)
        s1 = group.kernel_grad(torch.cat([vectors[i]["v"] for i in index], 1),
                               torch.cat([vectors[i]["u"] for i in index], 1)).reshape(n, -1, taps)
        gram, gram_pinv = geometry.kernel_gram(dtype, device), geometry.kernel_gram_pinv(dtype, device)
        reweighted = batched_refresh.reweighted_kernels(first, kernels[index].reshape(n, -1, taps), s1, gram, gram_pinv)[0]
        second = symbol_starts(geometry, reweighted.reshape(n, *geometry.weight_shape))
        for i, start in zip(index, second):
            if start is None:
                vectors[i] = None
            else:
                vectors[i]["u_out"], vectors[i]["v_out"] = start_vectors(geometry, start, dtype, device, fmt)
    return vectors
