"""Exact spectra of the linear operator of a conv (or linear) layer.

A conv layer with kernel ``K (C_out, C_in/groups, *k)`` acting on ``(C_in, *n)`` inputs (1, 2 or
3 spatial dimensions) is the linear map ``W: R^dim_in -> R^dim_out`` described by
:class:`srnc_ext.conv_operator.ConvGeometry` (padding mode, stride, dilation and groups included).
A transposed conv is the adjoint of a conv (the same singular values, ``layer_kinds.operator_of``)
and a Linear layer is its weight matrix.
``spectrum`` returns its singular values by one of four methods:

* ``"fft"`` -- exact, circulant operators only (circular padding, stride 1, output size =
  input size). Such a ``W`` is block-circulant, so it is block-diagonalised by the N-D DFT:
  its singular values are the union over the ``prod(n)`` frequencies ``w`` of the singular values
  of the ``(C_out, C_in)`` matrices ``K_hat(w)``, the DFT of the kernel embedded in an
  ``n``-sized grid (Sedghi, Gupta & Long 2019, "The singular values of convolutional layers").
  Dilation places the taps at dilated offsets; groups make ``K_hat(w)`` block-diagonal; the
  padding offset is a circular shift (a unit phase per frequency). Cost ``O(C^2 HW log HW)``.
* ``"matrix"`` -- exact for every configuration: the explicit ``(dim_out, dim_in)`` matrix is
  built by applying the operator to the identity basis and passed to ``torch.linalg.svdvals``.
  Refused above ``MAX_MATRIX_ENTRIES`` entries.
* ``"arpack"`` -- matrix-free, approximate: the top ``k`` singular values from
  ``scipy.sparse.linalg.svds`` (ARPACK, relative tolerance ``tol``) on a ``LinearOperator``
  whose products are the operator and its exact adjoint. Any size.
* ``"krylov"`` -- matrix-free, with bounds: the top ``k`` singular values by Lanczos on
  ``W^T W`` (``srnc_ext.spectral_iterative``): float32 iterations, then float64 ones where
  ``tol`` needs them, every result certified by float64 products. ``tol``: the relative width of
  the bounds, ``upper - lower <= tol * lower`` (``Spectrum.lower``/``upper``; the lower bound is
  certified, the upper one is the residual bound, see that module). ``maxiter``: the most
  products of ``W^T W``. On a 64->64 3x3 layer at 64x64 (zero padding) sigma_1 to 1e-6 takes
  166 products (165 in float32), 1.6-2.5 s on 2 quiet cores, where ARPACK takes 681 float64
  products and over a minute (benchmarks/results/spectral_cpu.md).

``"auto"`` picks ``"fft"`` for circulant operators, else ``"matrix"`` within budget, else
``"krylov"`` (``"arpack"`` when ARPACK's ``ncv`` is given); when only the top ``k`` values are
asked (``k=``: ``spectral_norm``, ``stable_rank`` and ``model_report`` ask ``k=1``) the dense
SVD is used only for operators small enough that it is cheap (``MAX_DENSE_TOP_K_FLOPS``), since
the iterative methods reach their tolerance far faster beyond that (a 16->16 layer at 16x16:
53 s dense, 0.15 s ARPACK, the same sigma_1 to 1e-16). The result's ``method`` says which ran.
Everything runs on the CPU, in float64 (``"krylov"``: float32 iterations, float64 certification).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, svds
from torch import nn

from .conv_operator import ConvGeometry, SizeLike
from .spectral_iterative import layer_start_vector, top_singular_values

METHODS = ("auto", "fft", "matrix", "arpack", "krylov")
ITERATIVE = ("arpack", "krylov")  # the methods that return only the top k values
MAX_MATRIX_ENTRIES = 2**24  # largest explicit operator matrix (dim_out * dim_in) "matrix" builds
# "auto" with k given: the dense SVD only below this cost estimate (dim_out * dim_in * full_rank),
# about a second here; above it an iterative method on the matrix-free operator
MAX_DENSE_TOP_K_FLOPS = 2**28
_CHUNK_ENTRIES = 2**22  # bound on the entries of one batch of basis vectors / their images
_CONFIG = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "padding_mode": "zeros"}


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values of a conv operator.

    ``values``: float64 CPU tensor, descending; all ``full_rank`` singular values for the exact
    methods (``"fft"``, ``"matrix"``), the top ``k`` for ``"arpack"`` and ``"krylov"``. ``tol``:
    the iterative method's relative tolerance (``None`` when exact). ``frobenius_sq``: exact
    ``||W||_F^2``. ``full_rank``: ``min(dim_in, dim_out)``. ``lower``, ``upper``: ``"krylov"``'s
    bounds on each value (float64, like ``values``; ``None`` for the other methods), ``converged``
    whether they are within ``tol`` (``None`` for the other methods).
    """

    values: torch.Tensor
    method: str
    exact: bool
    tol: Optional[float]
    frobenius_sq: float
    full_rank: int
    lower: Optional[torch.Tensor] = None
    upper: Optional[torch.Tensor] = None
    converged: Optional[bool] = None

    @property
    def sigma_max(self) -> float:
        """Spectral norm ``sigma_1 = ||W||_2``."""
        return float(self.values[0])

    @property
    def stable_rank(self) -> float:
        """Absolute stable rank ``||W||_F^2 / sigma_1^2`` (in ``[1, full_rank]``; 0 for W = 0, the
        rank of the zero operator)."""
        sigma = self.sigma_max
        return self.frobenius_sq / sigma**2 if sigma > 0 else 0.0

    @property
    def stable_rank_fraction(self) -> float:
        """``stable_rank / full_rank``, in ``(0, 1]``."""
        return self.stable_rank / self.full_rank


# --------------------------------------------------------------------------- the three methods
def fft_singular_values(geometry: ConvGeometry, kernel: torch.Tensor) -> torch.Tensor:
    """All singular values of a circulant operator, unsorted: ``(full_rank,)``.

    ``K_hat = fft2`` of the kernel embedded in an ``(H, W)`` grid at its dilated tap offsets,
    shifted by the pad offset; the ``(C_out/g, C_in/g)`` block of each group at each frequency
    contributes its singular values.
    """
    if not geometry.is_circulant:
        raise ValueError(
            "method='fft' needs a circulant operator (padding_mode='circular', stride 1, output size == "
            f"input size); got padding_mode={geometry.padding_mode!r}, stride={geometry.stride}, "
            f"input {geometry.input_size} -> output {geometry.output_size}. Use method='matrix' "
            "(exact, small operators), 'arpack' (matrix-free top-k) or 'auto'"
        )
    size, n = geometry.input_size, geometry.ndim
    c_out, c_in_g = kernel.shape[:2]
    # tap a sits at offset d*a mod n in each dimension: on maps smaller than the dilated kernel several
    # taps wrap onto one pixel of the period and add up (one-hot placement, so they accumulate)
    grid = kernel
    for dim, (k, d, m) in enumerate(zip(geometry.kernel_size, geometry.dilation, size)):
        place = torch.nn.functional.one_hot((d * torch.arange(k)) % m, m).to(kernel.dtype)  # (k, m)
        grid = torch.tensordot(grid, place, dims=([2 + dim], [0])).movedim(-1, 2 + dim)
    before = tuple(-geometry._pad_of(i)[0] for i in range(n))
    spatial = tuple(range(-n, 0))
    k_hat = torch.fft.fftn(torch.roll(grid, before, spatial), dim=spatial)  # (C_out, C_in/g, *n)
    g = geometry.groups
    blocks = k_hat.reshape(g, c_out // g, c_in_g, -1).permute(0, 3, 1, 2)  # (g, prod(n), Co/g, Ci/g)
    return torch.linalg.svdvals(blocks).flatten()


def operator_matrix(geometry: ConvGeometry, kernel: torch.Tensor) -> torch.Tensor:
    """The explicit ``(dim_out, dim_in)`` matrix of ``W``, column ``j`` = ``W e_j``.

    Built from the identity basis in batches of at most ``_CHUNK_ENTRIES`` entries.
    """
    n_in, n_out = geometry.dim_in, geometry.dim_out
    if n_in * n_out > MAX_MATRIX_ENTRIES:
        raise ValueError(
            f"explicit operator matrix {n_out} x {n_in} exceeds MAX_MATRIX_ENTRIES={MAX_MATRIX_ENTRIES}; "
            "use method='arpack' (or 'fft' for circulant operators)"
        )
    padded = geometry.in_channels * math.prod(geometry.padded_size)
    chunk = max(1, _CHUNK_ENTRIES // max(n_in, n_out, padded))
    columns = []
    for start in range(0, n_in, chunk):
        stop = min(start + chunk, n_in)
        basis = kernel.new_zeros(stop - start, n_in)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        columns.append(geometry.apply(kernel, basis.reshape(geometry.input_shape(stop - start))).flatten(1))
    return torch.cat(columns).T


def arpack_singular_values(geometry: ConvGeometry, kernel: torch.Tensor, k: int, tol: float,
                           ncv: Optional[int] = None, maxiter: Optional[int] = None) -> torch.Tensor:
    """Top ``k`` singular values by ARPACK on the matrix-free operator, unsorted: ``(k,)``.
    ``ncv`` (Lanczos vectors kept) and ``maxiter``: ARPACK's, ``scipy.sparse.linalg.svds``'s defaults when None."""
    if not 1 <= k < geometry.full_rank:
        raise ValueError(f"method='arpack' needs 1 <= k < full_rank={geometry.full_rank}, got k={k}")

    def product(fn, shape):
        return lambda v: fn(kernel, torch.from_numpy(np.ascontiguousarray(v, np.float64)).reshape(shape)).reshape(-1).numpy()

    op = LinearOperator(
        (geometry.dim_out, geometry.dim_in),
        matvec=product(geometry.apply, geometry.input_shape(1)),
        rmatvec=product(geometry.adjoint, geometry.output_shape(1)),
        dtype=np.float64,
    )
    v0 = np.random.default_rng(0).standard_normal(geometry.full_rank)
    if ncv is not None and not k < ncv <= geometry.full_rank:
        raise ValueError(f"ncv must be in ({k}, full_rank={geometry.full_rank}] (more than k={k}), got {ncv}")
    if maxiter is not None and maxiter < 1:
        raise ValueError(f"maxiter must be >= 1 or None, got {maxiter}")
    values = svds(op, k=k, tol=tol, v0=v0, ncv=ncv, maxiter=maxiter, return_singular_vectors=False)
    return torch.from_numpy(values.copy())


# --------------------------------------------------------------------------- entry points
def _resolve(weight_or_conv, input_size, config) -> Tuple[torch.Tensor, ConvGeometry]:
    """The float64 kernel and the geometry, from a kernel tensor (a conv's, 3 to 5 dims) or a layer
    of a kind SRN-C covers (``layer_kinds``: convs, transposed convs, Linear; plain or SRN-C)."""
    from .layer_kinds import TORCH_KINDS, operator_of  # layer_kinds imports the layers; spectral stays importable alone

    if isinstance(weight_or_conv, TORCH_KINDS):
        layer = weight_or_conv
        for name, value in config.items():
            if value is not None:
                raise ValueError(f"{name} is taken from the module {type(layer).__name__}; do not pass {name}=")
        if input_size is None and not isinstance(layer, nn.Linear) and getattr(layer, "input_size", None) is None:
            raise ValueError(f"input_size is required for a {type(layer).__name__} (the operator depends on it): "
                             "pass input_size= (one int per spatial dimension)")
        return operator_of(layer, input_size)
    if isinstance(weight_or_conv, torch.Tensor):
        weight = weight_or_conv
        config = {name: _CONFIG[name] if value is None else value for name, value in config.items()}
    else:
        names = ", ".join(kind.__name__ for kind in TORCH_KINDS)
        raise TypeError(f"expected a conv kernel tensor (3 to 5 dims) or a layer ({names}), got "
                        f"{type(weight_or_conv).__name__}")
    if input_size is None:
        raise ValueError("input_size is required (the operator depends on it): pass input_size=(H, W)")
    kernel = weight.detach().to(device="cpu", dtype=torch.float64)
    return kernel, ConvGeometry.create(kernel.shape, input_size, **config)


def spectrum(
    weight_or_conv: Union[torch.Tensor, nn.Conv2d],
    input_size: Optional[SizeLike] = None,
    *,
    stride=None,
    padding=None,
    dilation=None,
    groups: Optional[int] = None,
    padding_mode: Optional[str] = None,
    method: str = "auto",
    k: Optional[int] = None,
    tol: float = 1e-8,
    ncv: Optional[int] = None,
    maxiter: Optional[int] = None,
) -> Spectrum:
    """Singular values of the operator of a conv layer on ``input_size`` inputs.

    ``weight_or_conv``: a kernel ``(C_out, C_in/groups, kh, kw)`` or an ``nn.Conv2d`` (any
    subclass; ``effective_weight()`` is used when the module has it, and its ``input_size``
    attribute when ``input_size`` is None). ``input_size``: int or ``(H, W)``. The layer
    configuration (``None`` = default ``stride=1, padding=0, dilation=1, groups=1,
    padding_mode="zeros"``) must not be passed with a module, which supplies its own.
    ``method``: one of ``METHODS`` (see the module docstring). ``k``: the number of top values
    needed (None: all of them; ``"arpack"`` and ``"krylov"`` then compute 1); with ``k`` given,
    ``"auto"`` picks an iterative method over a dense SVD that would be slow. ``tol`` (relative),
    ``maxiter``: the iterative method's (``"krylov"``: bound width and products, see the module
    docstring; ``"arpack"``: ARPACK's, with ``ncv``). ``"krylov"`` starts an SRN-C layer from its
    power-iteration vector (``spectral_iterative.layer_start_vector``) and warns when ``maxiter``
    stops it short of ``tol``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be None or an int >= 1, got {k!r}")
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"tol must be a number in [0, 1) (0: machine precision), got {tol!r}")
    if method == "krylov" and ncv is not None:
        raise ValueError("ncv is ARPACK's (method='arpack'); method='krylov' takes tol and maxiter")
    config = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)
    with torch.no_grad():
        kernel, geometry = _resolve(weight_or_conv, input_size, config)
        if method == "auto":
            entries = geometry.dim_in * geometry.dim_out
            fits = entries <= MAX_MATRIX_ENTRIES
            if k is not None:  # only the top k: dense only where it is cheap (and ARPACK needs k < full_rank)
                fits = fits and (entries * geometry.full_rank <= MAX_DENSE_TOP_K_FLOPS or k >= geometry.full_rank)
            method = "fft" if geometry.is_circulant else "matrix" if fits else "krylov" if ncv is None else "arpack"
        k = 1 if k is None else k
        bounds = None
        if not bool(kernel.any()):  # the zero operator: ARPACK fails on it (error -9), nothing to compute
            values = kernel.new_zeros(k if method in ITERATIVE else geometry.full_rank)
            bounds = (values, values, True) if method == "krylov" else None
        elif method == "krylov":
            found = top_singular_values(geometry, kernel, k, tol, maxiter=maxiter,
                                        start=layer_start_vector(weight_or_conv, geometry))
            values, bounds = found.values, (found.lower, found.upper, found.converged)
            if not found.converged:
                warnings.warn(f"method='krylov' stopped at maxiter={maxiter} products short of tol={tol}: sigma_1 in "
                              f"[{float(found.lower[0]):.10g}, {float(found.upper[0]):.10g}] (relative width "
                              f"{found.relative_gap:.2e}); Spectrum.lower/upper hold the bounds", RuntimeWarning,
                              stacklevel=2)
        elif method == "fft":
            values = fft_singular_values(geometry, kernel)
        elif method == "matrix":
            values = torch.linalg.svdvals(operator_matrix(geometry, kernel))
        else:
            values = arpack_singular_values(geometry, kernel, k, tol, ncv, maxiter)
        values = values.sort(descending=True).values
        if method not in ITERATIVE and len(values) < geometry.full_rank:  # rank-deficient shapes: zeros
            values = torch.cat([values, values.new_zeros(geometry.full_rank - len(values))])
        return Spectrum(
            values=values,
            method=method,
            exact=method not in ITERATIVE,
            tol=tol if method in ITERATIVE else None,
            frobenius_sq=float(geometry.frobenius_sq(kernel)),
            full_rank=geometry.full_rank,
            **({} if bounds is None else dict(lower=bounds[0], upper=bounds[1], converged=bounds[2])),
        )


def singular_values(weight_or_conv, input_size=None, **kwargs) -> torch.Tensor:
    """``spectrum(...).values``: float64, descending. Same arguments as :func:`spectrum`."""
    return spectrum(weight_or_conv, input_size, **kwargs).values


def spectral_norm(weight_or_conv, input_size=None, **kwargs) -> float:
    """``sigma_1 = ||W||_2``. Same arguments as :func:`spectrum` (``k`` defaults to 1 here: no dense
    SVD where Lanczos is faster; ``result.tol`` of :func:`spectrum` says when a value is iterative, and
    ``result.lower``/``upper`` bound it)."""
    kwargs.setdefault("k", 1)
    return spectrum(weight_or_conv, input_size, **kwargs).sigma_max


def stable_rank(weight_or_conv, input_size=None, **kwargs) -> float:
    """Absolute stable rank ``||W||_F^2 / sigma_1^2`` (exact Frobenius norm, sigma_1 as
    :func:`spectral_norm`). Same arguments as :func:`spectrum`."""
    kwargs.setdefault("k", 1)
    return spectrum(weight_or_conv, input_size, **kwargs).stable_rank


# --------------------------------------------------------------------------- model reports
@dataclass
class LayerSpectrum:
    """One row of :func:`model_report`."""

    name: str
    weight_shape: Tuple[int, ...]
    input_size: Tuple[int, ...]  # () for a Linear layer; a transposed conv's input size
    sigma_max: float
    stable_rank: float
    stable_rank_fraction: float
    method: str
    residual: Optional[float] = None  # SRN-C layers: the power iteration's residual (``SRNCConv2d.residual``)


def model_report(
    model: nn.Module,
    input_size: Union[None, SizeLike, Dict[str, SizeLike]],
    *,
    method: str = "auto",
    tol: float = 1e-8,
    ncv: Optional[int] = None,
    maxiter: Optional[int] = None,
) -> List[LayerSpectrum]:
    """Spectrum summary of every layer of a kind SRN-C covers in ``model`` (``named_modules`` order;
    ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear``, plain or SRN-C): sigma_1
    (``spectral_norm``'s rule: exact where cheap, else Lanczos to ``tol``, ARPACK with ``ncv``)
    and the stable rank. The ``method`` column says which ran.

    ``input_size``: one size for every conv layer (an int fits every dimensionality), or
    ``{qualified name: size}``; a layer missing from it (or every layer, when ``None``) uses its own
    ``input_size`` attribute; a transposed conv's size is that of its input; Linear layers need none.
    One ``UserWarning`` lists the conv-like modules it does not report (deformable convs and other
    kinds: see ``srnc_ext.convert.is_conv_like``).
    """
    from .convert import warn_left_alone  # convert imports the layer; spectral stays importable alone
    from .layer_kinds import TORCH_KINDS

    warn_left_alone(model, lambda name, m: None if isinstance(m, TORCH_KINDS) else f"{type(m).__name__}, not a kind "
                    "SRN-C covers", "spectral.model_report does not report")
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, TORCH_KINDS):
            continue
        linear = isinstance(layer, nn.Linear)
        size = None if linear else input_size.get(name) if isinstance(input_size, dict) else input_size
        size = size if size is not None or linear else getattr(layer, "input_size", None)
        if size is None and not linear:
            raise ValueError(f"no input_size for layer {name!r}: pass it in input_size or set the layer's input_size")
        try:
            result = spectrum(layer, size, method=method, k=1, tol=tol, ncv=ncv, maxiter=maxiter)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {name!r}: {err}") from err
        shown = () if linear else tuple(size) if not isinstance(size, int) else (size,) * (layer.weight.dim() - 2)
        rows.append(LayerSpectrum(name, tuple(layer.weight.shape), shown, result.sigma_max,
                                  result.stable_rank, result.stable_rank_fraction, result.method,
                                  getattr(layer, "residual", None)))
    return rows


def format_report(rows: List[LayerSpectrum]) -> str:
    """``rows`` as a Markdown table."""
    lines = [
        "| name | shape | input | sigma_1 | stable rank | fraction of full rank | method | residual |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        shape, size = "x".join(map(str, r.weight_shape)), "x".join(map(str, r.input_size)) or "-"
        residual = "" if r.residual is None else f"{r.residual:.2e}"
        lines.append(f"| {r.name} | {shape} | {size} | {r.sigma_max:.4f} | {r.stable_rank:.3f} "
                     f"| {r.stable_rank_fraction:.4f} | {r.method} | {residual} |")
    return "\n".join(lines)
