"""Top singular values of a conv operator by Lanczos, matrix-free, with a posteriori bounds.

``top_singular_values`` runs the Lanczos process on the Gram operator ``M = W^T W`` (or
``W W^T`` when the output side is the smaller one; the nonzero eigenvalues are the same, the
squared singular values of ``W``). Only the geometry's ``apply``/``adjoint`` are used, with a
batch dimension for blocks of vectors, so every padding mode, stride, dilation and group count
is handled exactly as the layer computes it.

**Stages** (``dtype_schedule``, default float32 then float64). Each stage is a (block) Lanczos
process in its dtype: the three-term recurrence (a second orthogonalization pass for blocks, and
against the whole basis for small operators, ``FULL_REORTH_ENTRIES``), a thick restart (the top
Ritz vectors are kept) when the basis reaches ``MAX_BASIS_BYTES``. A stage stops when its own residual estimates ``||R_j s_i||`` (the
Lanczos coupling times the last block of the Ritz vector) reach half the target or the rounding
floor of its dtype (``FLOORS``; float32 products carry relative errors ~1e-7, so a float32 stage
cannot certify below a few 1e-7). Its top Ritz vectors are then *certified in float64*: they
are orthonormalized, multiplied by ``M`` in float64 and a Rayleigh-Ritz step gives values
``theta_i`` and explicit residuals ``r_i = ||M x_i - theta_i x_i||``. If the tolerance is not
met, the next stage (or the last dtype again) restarts from those vectors, reusing their
float64 images. On the 64->64 3x3 layer at 64x64 (zero padding) ``tol=1e-6`` takes 165 float32
products and the one float64 product of the certification; ``tol=1e-8`` 180 float32 and 26
float64 ones (ARPACK: 681 and 841 float64 products; ``benchmarks/results/spectral_cpu.md``).

Measured and not kept: blocks of 2, 3, 4 vectors for ``k = 1`` (the products batched through one
conv: 1.2-1.6x the throughput per vector, but 2x, 2.5x, 3.4x the products: the top of a conv
spectrum comes in near-pairs, and a block resolves the pair instead of converging past it);
full reorthogonalization in float32 (memory-bound at this size, and a worse float32 floor);
channels-last vectors (no gain once the layout copies are paid); the quadratic bound
``r^2 / gap`` (no certified gap: the near-pairs make ``theta_1 - theta_2`` ~1e-9 relative, and
a bound on the gap below the pair needs an upper bound on ``lambda_3``).

**Bounds** (float64, per returned value ``sigma_i``):

* ``lower_i = sqrt(theta_i)``: a certified lower bound (Cauchy interlacing: the ``i``-th Ritz
  value of an orthonormal set is at most the ``i``-th eigenvalue of ``M``), up to float64
  rounding of the products (~1e-15 relative).
* ``upper_i = sqrt(theta_i + r_i)``: the residual bound -- an eigenvalue of ``M`` lies within
  ``r_i`` of ``theta_i``. It bounds ``sigma_i`` when that eigenvalue is the ``i``-th one: the
  Krylov space from a random start finds the top of the spectrum with probability one, but no a
  posteriori test excludes an eigenvalue above that the start vector missed; a cluster of
  eigenvalues narrower than ``r_i`` may put ``sigma_i`` above ``upper_i`` by at most the
  cluster's width (conv operators come with near-pairs: the top two eigenvalues of the 64x64
  layer's ``W^T W`` are 7e-10 apart, the next two too; a circulant operator of a real kernel has
  exact pairs, from the frequencies ``w`` and ``-w``). ``k > 1`` uses blocks of ``k + 1`` vectors, so that clusters of up to ``k + 1``
  eigenvalues are resolved.

``converged`` means ``upper_i - lower_i <= tol * lower_i`` for every returned value (``tol=0``:
the float64 floor ``r_i <= MIN_RELATIVE_RESIDUAL * theta_1``, also accepted for values that small
for any ``tol``). ``values`` are the ``sqrt(theta_i)`` (``= lower``): a Rayleigh-Ritz value is
off by second order in the residual, so the true value lies near the lower end (on the 64x64
layer at ``tol=1e-6``: 2e-11 below ARPACK's sigma_1, bounds 4e-7 wide).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import torch

DTYPE_SCHEDULE: Tuple[torch.dtype, ...] = (torch.float32, torch.float64)
# a stage's residual estimate relative to theta_1 below which its dtype's rounding dominates
FLOORS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: 1e-14}
# a stage stops at this fraction of the target: float32 rounding adds to the residual that the
# float64 certification finds (up to ~5e-7 relative), float64's own estimate is that residual to
# ~1e-13, and stopping at half of it cost upconv 64->256 184 float64 products instead of ~30 at
# tol=1e-8 (resolving a near-pair of top eigenvalues that the residual bound did not need resolved)
STAGE_MARGIN = {torch.float32: 0.5, torch.float64: 0.9}
MIN_RELATIVE_RESIDUAL = 1e-13  # float64 certification floor: r_i <= this * theta_1 counts as converged
MAX_BASIS_BYTES = 2**31  # memory of one stage's Lanczos basis; a thick restart beyond it
MIN_BASIS = 24  # vectors: the basis is never smaller (the memory bound gives way)
FULL_REORTH_ENTRIES = 2**22  # basis entries (vectors x dimension) up to which new blocks are
# orthogonalized against the whole basis (small operators, where the Krylov space fills R^n)
DEFAULT_MAXITER = 10000  # products of M, all stages together
CHECK_EVERY = 5  # Lanczos steps between two convergence checks (an eigh of the projected matrix)
REFINE = True  # float32 stages anchored at certified float64 vectors (see _lanczos_stage)
REFINE_CUTOFF = 1e-5  # relative singular value of M - theta below which a refinement does not move
STALL_STEPS = 40  # a stage stops when its residual estimate has not halved in this many steps
START_NOISE = 1e-2  # relative weight of the random part mixed into a given start vector


@dataclass(frozen=True, eq=False)
class IterativeResult:
    """What :func:`top_singular_values` found.

    ``values``, ``lower``, ``upper``: ``(k,)`` float64, descending values and their bounds (see
    the module docstring). ``residuals``: ``r_i = ||M x_i - theta_i x_i||``, float64.
    ``products``: applications of ``M`` to one vector (each one ``apply`` and one ``adjoint``), all
    stages and certifications together; ``float64_products`` of them in float64. ``stages``: the
    ``(dtype name, products)`` of each Lanczos stage run. ``method``: ``"lanczos"`` (``k == 1``)
    or ``"block-lanczos"``.
    """

    values: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    residuals: torch.Tensor
    products: int
    float64_products: int
    stages: Tuple[Tuple[str, int], ...]
    method: str
    converged: bool
    tol: float

    @property
    def relative_gap(self) -> float:
        """``(upper_1 - lower_1) / lower_1`` (0 for the zero operator)."""
        lo, hi = float(self.lower[0]), float(self.upper[0])
        return (hi - lo) / lo if lo > 0 else (0.0 if hi == 0 else math.inf)


class _Gram:
    """``M = W^T W`` (side "in") or ``W W^T`` (side "out") in one dtype, on rows ``(b, n)``."""

    def __init__(self, geometry, kernel: torch.Tensor, dtype: torch.dtype, side: str) -> None:
        self.kernel = kernel.to(dtype)
        self.dtype = dtype
        if side == "in":
            self.first, self.second, self.shape = geometry.apply, geometry.adjoint, geometry.input_shape
        else:
            self.first, self.second, self.shape = geometry.adjoint, geometry.apply, geometry.output_shape
        self.products = 0

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        b = rows.shape[0]
        self.products += b
        x = rows.reshape(self.shape(b))
        return self.second(self.kernel, self.first(self.kernel, x)).contiguous().reshape(b, -1)


def _orthonormal_rows(rows: torch.Tensor, rtol: float = 1e-8) -> torch.Tensor:
    """An orthonormal basis (rows) of the span of ``rows``, dropping numerically dependent ones."""
    q, r = torch.linalg.qr(rows.T)
    diag = r.diagonal().abs()
    keep = diag > rtol * diag.max() if len(diag) else diag.bool()
    return q[:, keep].T.contiguous()


def _rayleigh_ritz(gram64: _Gram, rows: torch.Tensor):
    """Certification: orthonormalize ``rows`` in float64, multiply by ``M`` in float64, rotate to
    the Ritz basis. Returns ``(theta desc, ritz vectors, their images, residual norms)``."""
    x = _orthonormal_rows(rows.to(torch.float64))
    y = gram64(x)
    g = x @ y.T
    theta, s = torch.linalg.eigh((g + g.T) / 2)
    theta, s = theta.flip(0), s.flip(1)
    x, y = s.T @ x, s.T @ y
    residuals = torch.linalg.vector_norm(y - theta[:, None] * x, dim=1)
    return theta, x, y, residuals


def _top_eig(h: np.ndarray, q: int):
    """The top ``q`` eigenpairs of the symmetric ``h``, descending."""
    m = h.shape[0]
    q = min(q, m)
    theta, s = scipy.linalg.eigh(h, subset_by_index=[m - q, m - 1], check_finite=False)
    return theta[::-1].copy(), s[:, ::-1].copy()


def _lanczos_stage(gram: _Gram, start: torch.Tensor, image: Optional[torch.Tensor], *, k: int, target: float,
                   floor: float, budget: int, max_basis: int, full: bool, generator: torch.Generator,
                   anchored: bool = False, stall: bool = True) -> Tuple[torch.Tensor, int]:
    """One block Lanczos stage in ``gram.dtype`` from the orthonormal rows ``start`` (``(b, n)``;
    ``image``: ``M start`` when known, not counted). Runs until the residual estimate of each of
    the top ``k`` Ritz values is at most ``max(target * theta_i, floor * theta_1)``, until it has
    not halved in ``STALL_STEPS`` steps (``stall``: when another kind of stage follows), or for
    ``budget`` products. Returns the top ``b`` Ritz
    vectors (rows, in ``gram.dtype``; float64 when ``anchored``) and the products used.

    ``anchored``: ``start`` and ``image`` are float64 (certified vectors and their float64
    products) and stay so: the first step (the residual ``M x - theta x``, ~1e-7 of ``M x``) is
    computed in float64 and the Ritz vectors are assembled on the float64 start. The later
    products, of unit vectors whose coefficients in the Ritz vector are of the order of that
    residual, may carry float32's relative error: the float32 floor no longer applies (inexact
    Krylov: a product's error counts in proportion to the residual at that step). Every new
    vector is orthogonalized against the start as well: it is nearly an eigenvector, which float32
    vectors lose orthogonality to at once (and rebuild, with float32's error).

    Orthogonalization: single vectors on large operators run the plain three-term recurrence
    (subtract the previous vector, then the current one: no second pass; a vector pass costs
    ~0.2 ms at n = 2^18 after a conv, against ~5 ms for the product, and a second pass raised the
    float32 floor); blocks, small operators (``full``: against the whole basis) and the vectors
    after a thick restart (against the top kept Ritz vectors) get a second pass, whose
    coefficients on the current block are added to ``H`` (dropped, they leave ``H`` off by the
    rounding of the first: in float32 Ritz values came out 1e-6 above the eigenvalue).
    """
    dtype = gram.dtype
    b, n = start.shape
    # room for R^n (and a block past it, found dependent) when it fits: no restart; else at least
    # enough rows for a thick restart to keep k + 2b Ritz vectors and grow
    max_basis = n + b if max_basis >= n else max(max_basis, 4 * b + k)
    basis = torch.empty(max_basis, n, dtype=dtype)
    h = np.zeros((max_basis, max_basis))
    basis[:b] = start
    anchor = start.to(torch.float64) if anchored else None
    kept, cur, size, used, steps = 0, 0, b, 0, 0  # rows [0, kept): Ritz vectors kept by a restart
    coupling = None  # (rows, C): the block at `cur` couples to basis[rows] by H[rows, cur] = C
    scale = 0.0  # largest |H| entry seen: the operator's norm, for breakdown tests
    best, best_step = math.inf, 0  # the smallest relative residual estimate so far, and when
    while True:
        x = basis[cur:cur + b]
        if anchor is not None and image is not None:  # the first step, in float64
            y = image.to(torch.float64)
            a = anchor @ y.T
            a = (a + a.T) / 2
            y = y - a @ anchor
            d = anchor @ y.T
            w, a, image = (y - d.T @ anchor).to(dtype), a + (d + d.T) / 2, None
            exact = torch.float64  # its residual (~1e-7 of M x) is no breakdown
        else:
            exact = dtype
            if image is not None:
                w, image = image.to(dtype).clone(), None
            elif used + b > budget:  # (the checks below stop before this)
                cur -= b  # block `cur` was never multiplied: leave it out of the Ritz values
                break
            else:
                w = gram(x)
                used += b
            if coupling is not None:
                rows, c = coupling
                if b == 1 and c.shape[0] == 1:
                    w.sub_(basis[rows], alpha=float(c[0, 0]))
                else:
                    w -= torch.from_numpy(np.ascontiguousarray(c.T)).to(dtype) @ basis[rows]
            a = x @ w.T
            a = (a + a.T) / 2
            if b == 1:
                w.sub_(x, alpha=float(a))
            else:
                w -= a @ x
            a = a.double()
        if full or b > 1 or kept or anchor is not None:
            spans = [slice(0, cur)] if full else [slice(0, min(kept, k + 2 * b)), slice(max(kept, cur - b), cur)]
            if anchor is not None and not full and cur > 2 * b:
                # the anchor is (nearly) an eigenvector: float32 vectors lose orthogonality to it at
                # once and would rebuild it with float32's error
                spans.append(slice(0, b))
            for span in spans:
                if span.stop > span.start:
                    against = basis[span]
                    w -= (against @ w.T).T @ against
            d = x @ w.T
            w -= d.T @ x
            a = a + (d.double() + d.double().T) / 2
        h[cur:cur + b, cur:cur + b] = a.numpy()
        scale = max(scale, float(a.abs().max()))
        # the next block: into its row of the basis when there is room (written once)
        new = basis[size:size + b] if size + b <= max_basis else torch.empty(b, n, dtype=dtype)
        if b == 1:
            beta = float(torch.linalg.vector_norm(w))
            r = np.array([[beta]])
            if beta > 0:
                torch.div(w, beta, out=new)
        else:
            q, rr = torch.linalg.qr(w.T)
            new.copy_(q.T)
            r = rr.double().numpy()
        # breakdown (the Krylov space is invariant): continue with random directions
        tiny = 100 * torch.finfo(exact).eps * max(scale, 1e-300)
        exhausted = False
        for i in np.flatnonzero(np.abs(np.diag(r)) <= tiny):
            z = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)
            z /= torch.linalg.vector_norm(z)
            others = new[torch.arange(b) != i]
            for _ in range(2):
                z -= (basis[:cur + b] @ z) @ basis[:cur + b]
                z -= (others @ z) @ others
            norm = float(torch.linalg.vector_norm(z))
            if norm < 1e-2:  # R^n is spanned: the Ritz values are exact
                exhausted = True
                break
            new[i] = z / norm
            r[i, :] = 0.0
        steps += 1
        full_space = cur + b >= n or exhausted
        restart = size + b > max_basis and not full_space
        if steps % CHECK_EVERY == 0 or used + b > budget or restart or full_space:
            theta, s = _top_eig(h[:cur + b, :cur + b], max(b, k))
            if anchor is not None:
                correction, est = _anchored_correction(h, r, cur)
            else:
                est = np.linalg.norm(r @ s[cur:cur + b, :], axis=0)[:k]
            allowed = np.maximum(target * theta[:k], floor * theta[0])
            done = bool(np.all(est <= allowed))
            worst = float(np.max(est / np.maximum(allowed, 1e-300)))
            if worst < 0.5 * best:
                best, best_step = worst, steps
            if done or used + b > budget or full_space or (stall and steps - best_step >= STALL_STEPS):
                break
            if restart:  # thick restart: keep the top Ritz vectors, the new block couples to them
                p = min(max_basis - 2 * b, max(k + 2 * b, max_basis // 2))
                theta, s = _top_eig(h[:cur + b, :cur + b], p)
                ritz = torch.from_numpy(s.T.copy()).to(dtype) @ basis[:cur + b]
                basis[:p] = ritz
                c = (r @ s[cur:cur + b, :]).T  # (p, b)
                h[:] = 0.0
                h[:p, :p] = np.diag(theta)
                h[:p, p:p + b], h[p:p + b, :p] = c, c.T
                basis[p:p + b] = new
                kept, cur, size, anchor = p, p, p + b, None
                coupling = (slice(0, p), c)
                continue
        h[size:size + b, cur:cur + b], h[cur:cur + b, size:size + b] = r, r.T
        coupling = (slice(cur, cur + b), r.T.copy())
        cur, size = size, size + b
    m = cur + b
    if anchor is None:
        theta, s = _top_eig(h[:m, :m], b)
        return torch.from_numpy(s.T.copy()).to(dtype) @ basis[:m], used
    correction, _ = _anchored_correction(h, r, cur)
    return anchor + (torch.from_numpy(correction).to(dtype) @ basis[1:m]).to(torch.float64), used


def _anchored_correction(h: np.ndarray, r: np.ndarray, cur: int):
    """For an anchored stage (one vector ``x``, row 0): the correction ``c`` on rows ``1..cur``
    minimizing ``||(M - theta) (x + V c)||``, ``theta`` the Rayleigh quotient of ``x``, from the
    Lanczos relation ``M V = V_+ H_+``; and that minimum (a residual estimate, length-1 array).

    Minimal residual, not Rayleigh-Ritz, and only along directions that ``M - theta`` moves by
    more than ``REFINE_CUTOFF * theta`` (a truncated SVD): the top of a conv spectrum comes in
    near-pairs (1e-10 to 1e-8 apart), closer than float32's error in ``H`` (~4e-7), and along the
    pair's other vector both the top Ritz vector of ``H`` and an untruncated least-squares
    correction are set by that error (measured: the residual back at ~4e-7 after the stage). The
    pair's share of the residual is at most half its width, which is what float64 stages are for."""
    m = cur + 1
    extended = np.zeros((m + 1, m))
    extended[:m, :m] = h[:m, :m] - h[0, 0] * np.eye(m)
    extended[m, cur] = r[0, 0]
    u, sv, vt = np.linalg.svd(extended[:, 1:], full_matrices=False)
    keep = sv > REFINE_CUTOFF * abs(h[0, 0])
    c = -vt[keep].T @ ((u[:, keep].T @ extended[:, 0]) / sv[keep])
    return c[None, :], np.array([np.linalg.norm(extended[:, 0] + extended[:, 1:] @ c)])


def layer_start_vector(layer, geometry) -> Optional[torch.Tensor]:
    """An SRN-C layer's power-iteration vector on the input of ``geometry`` (the operator of its
    effective weight), as a start for :func:`top_singular_values`; None for other layers.

    The effective weight's top right singular vector is approximated by ``v_out`` where the
    variant renormalizes by a second power iteration (projected, ``beta < 1``), else by ``v``.
    Measured on a 64->64 3x3 layer at 64x64 after 600 simulated steps (one power iteration
    each): 161 -> 121 products (``beta = 1``, ``v``) and 96 -> 61 (``beta = 0.1``, ``v_out``) at
    ``tol=1e-6``; the other vector costs up to 15% more than a random start.
    """
    state = getattr(layer, "power_iteration", None)
    if state is None or not hasattr(state, "vector"):
        return None
    from .reference import needs_second_iteration

    second = needs_second_iteration(getattr(layer, "variant", ""), getattr(layer, "beta", 1.0))
    try:
        vector = state.vector("v_out" if second else "v")
    except KeyError:
        return None
    if vector is None or vector.numel() != geometry.dim_in or vector.device.type == "meta":
        return None
    return vector.detach()


def _check_dtypes(schedule) -> Tuple[torch.dtype, ...]:
    names = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(schedule, (str, torch.dtype)) or not isinstance(schedule, Sequence) or not len(schedule):
        raise ValueError(f"dtype_schedule must be a non-empty sequence of torch.float32/torch.float64, got {schedule!r}")
    dtypes = tuple(names.get(d, d) if isinstance(d, str) else d for d in schedule)
    if not all(d in (torch.float32, torch.float64) for d in dtypes):
        raise ValueError(f"dtype_schedule must be a non-empty sequence of torch.float32/torch.float64, got {schedule!r}")
    return dtypes


def top_singular_values(geometry, kernel: torch.Tensor, k: int = 1, tol: float = 1e-6, *,
                        maxiter: Optional[int] = None, dtype_schedule=DTYPE_SCHEDULE,
                        start: Optional[torch.Tensor] = None, seed: int = 0,
                        block: Optional[int] = None) -> IterativeResult:
    """The top ``k`` singular values of the operator of ``kernel`` under ``geometry`` (a
    ``ConvGeometry``), with bounds, to relative tolerance ``tol`` (see the module docstring).

    ``maxiter``: the most products of ``M`` (one vector each, all stages; default
    ``DEFAULT_MAXITER``); when reached, ``converged`` is False and the bounds say how far it got.
    ``dtype_schedule``: the dtypes of the Lanczos stages, in order (the last one repeats while the
    tolerance is not met); certification is float64 whatever it says. ``start``: a start vector
    on the layer's input (``dim_in`` elements, any shape; several rows of ``dim_in`` for a block),
    e.g. an SRN-C layer's power-iteration vector; a ``START_NOISE`` part of a random vector is
    mixed in, so that a start orthogonal to the top singular vector still finds it. ``seed``: of
    the random start (results are deterministic). ``block``: vectors per Lanczos step (default 1
    for ``k = 1``, ``k + 1`` above, to resolve clusters; see the module docstring).
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= geometry.full_rank:
        raise ValueError(f"k must be an int in [1, full_rank={geometry.full_rank}], got {k!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1) (0: the float64 floor), got {tol!r}")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1):
        raise ValueError(f"maxiter must be None or an int >= 1 (products of W^T W), got {maxiter!r}")
    dtypes = _check_dtypes(dtype_schedule)
    budget = DEFAULT_MAXITER if maxiter is None else maxiter
    kernel = kernel.detach().to(device="cpu", dtype=torch.float64)
    side = "in" if geometry.dim_in <= geometry.dim_out else "out"
    n = geometry.dim_in if side == "in" else geometry.dim_out
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or not k <= block <= n):
        raise ValueError(f"block must be None or an int in [k={k}, {n}], got {block!r}")
    b = (1 if k == 1 else min(k + 1, n)) if block is None else block
    method = "lanczos" if b == 1 else "block-lanczos"
    generator = torch.Generator().manual_seed(seed)

    if not bool(kernel.any()):
        zeros = torch.zeros(k, dtype=torch.float64)
        return IterativeResult(zeros, zeros, zeros.clone(), zeros.clone(), 0, 0, (), method, True, tol)

    x0 = torch.randn(b, n, generator=generator, dtype=torch.float64)
    if start is not None:
        start = torch.as_tensor(start).detach().to(device="cpu", dtype=torch.float64)
        if start.numel() == 0 or start.numel() % geometry.dim_in:
            raise ValueError(f"start must hold a multiple of dim_in={geometry.dim_in} elements (rows on the layer's "
                             f"input), got shape {tuple(start.shape)}")
        given = start.reshape(-1, geometry.dim_in)[:b]
        if side == "out":
            given = geometry.apply(kernel, given.reshape(geometry.input_shape(len(given)))).reshape(len(given), -1)
        norms = torch.linalg.vector_norm(given, dim=1, keepdim=True)
        noise = x0[:len(given)] / torch.linalg.vector_norm(x0[:len(given)], dim=1, keepdim=True)
        x0[:len(given)] = torch.where(norms > 0, given / norms.clamp_min(1e-300), noise) + START_NOISE * noise
    x0 = _orthonormal_rows(x0)

    target = (1 + tol) ** 2 - 1  # r_i / theta_i giving (upper - lower) / lower <= tol
    gram64 = _Gram(geometry, kernel, torch.float64, side)
    grams = {torch.float64: gram64}
    rows, image = x0, None
    stages = []
    theta = residuals = None
    converged, anchored = False, False
    stage, before = 0, math.inf  # the schedule's position; the last certified relative residual
    while True:
        dtype = dtypes[min(stage, len(dtypes) - 1)]
        gram = grams.setdefault(dtype, _Gram(geometry, kernel, dtype, side))
        left = budget - sum(g.products for g in grams.values()) - b  # keep b for the certification
        if left < b:
            break
        if anchored or dtype == torch.float64:
            start_rows = rows  # float64, orthonormal, with their float64 images
        else:
            start_rows = _orthonormal_rows(rows.to(dtype), 1e-4)
            if len(start_rows) < b:  # numerically dependent after the cast: refill with random rows
                extra = torch.randn(b - len(start_rows), n, generator=generator, dtype=torch.float64).to(dtype)
                start_rows = _orthonormal_rows(torch.cat([start_rows, extra]))
        if image is not None and len(image) == len(start_rows) == b and (anchored or dtype == torch.float64):
            stage_image = image
        else:
            stage_image, anchored = None, False
            start_rows = start_rows.to(dtype) if start_rows.dtype != dtype else start_rows
        max_basis = max(MIN_BASIS, MAX_BASIS_BYTES // (n * torch.finfo(dtype).bits // 8))
        full = max_basis * n <= FULL_REORTH_ENTRIES or n <= max_basis
        floor = FLOORS[torch.float64 if anchored else dtype]
        ritz, used = _lanczos_stage(gram, start_rows, stage_image, k=k, target=STAGE_MARGIN[dtype] * target,
                                    floor=max(floor, 0.5 * MIN_RELATIVE_RESIDUAL), budget=left,
                                    max_basis=max_basis, full=full, generator=generator, anchored=anchored,
                                    stall=anchored or stage < len(dtypes) - 1)
        stages.append((str(dtype).replace("torch.", "") + ("-refine" if anchored else ""), used))
        theta, rows, image, residuals = _rayleigh_ritz(gram64, ritz)
        top = float(theta[0]) if len(theta) else 0.0
        ok = residuals[:k] <= torch.maximum(target * theta[:k].clamp_min(0), torch.tensor(MIN_RELATIVE_RESIDUAL * top))
        converged = len(theta) >= k and bool(ok.all())
        if converged or used == 0:
            break
        after = float((residuals[:k] / theta[:k].clamp_min(1e-300)).max()) if len(theta) >= k else math.inf
        # float32 again, anchored at the certified vectors, while that cuts the residual 4x; then on
        anchored = REFINE and dtype == torch.float32 and b == 1 and after <= before / 4
        stage += 0 if anchored else 1
        before = after
    if theta is None:  # no stage ran (maxiter below two blocks): certify the start
        theta, rows, image, residuals = _rayleigh_ritz(gram64, x0)
    products = sum(g.products for g in grams.values())
    theta, residuals = theta[:k].clamp_min(0), residuals[:k]
    if len(theta) < k:  # fewer independent Ritz vectors than k (not converged): no bounds for the rest
        pad = k - len(theta)
        theta, residuals = torch.cat([theta, theta.new_zeros(pad)]), torch.cat([residuals, residuals.new_full((pad,), math.inf)])
    lower = theta.sqrt()
    upper = (theta + residuals).sqrt()
    return IterativeResult(values=lower.clone(), lower=lower, upper=upper, residuals=residuals, products=products,
                           float64_products=gram64.products, stages=tuple(stages), method=method,
                           converged=converged, tol=tol)
