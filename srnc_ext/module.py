"""SRN-C layers: drop-in ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``nn.Linear`` whose
true operator has spectral norm ``alpha``.

``SRNCLayer`` holds everything SRN-C (state, refresh, effective weight, state_dict); each kind adds
only its operator (``ConvGeometry``: a conv on its input size, the conv whose adjoint a transposed
conv is, or the weight matrix of a Linear) and its forward. Below, "the layer" is any of them.

Contract: the forward's weight is always ``f(current weight, current vectors)``, where ``f`` is
the differentiable SRN-C reweighting and the vectors are the layer's power-iteration state
(``power_iteration.py``). Nothing that changes the raw weight -- an optimizer step, a ``.data``
edit (EMA updates), ``copy_``, ``load_state_dict``, ``functional_call``, ``to_empty`` -- can leave
the output on an older weight, in train or eval, with or without grad.

* The vectors are buffers (``u``, ``v``; the projected variant adds ``u_out``, ``v_out``) shaped by
  ``input_size``. They are made ("materialized") when ``input_size`` is known: at construction if
  it is given, else from the first input seen; then they start from the kernel's symbol
  (``warm_start.py``; random where it does not apply) and ``max(SYMBOL_WARMUP_ITERATIONS,
  n_power_iterations)`` (random start: ``WARMUP_ITERATIONS``, or on to ``WARMUP_TOL`` where the
  operator is small) power iterations run on the current weight. On the meta device they are allocated, not filled.
* Refresh: ``n_power_iterations`` steps of each power iteration plus one weight-gradient
  convolution, without gradient, batched over all layers of the same signature. In training
  mode it runs right after each ``optimizer.step()`` that updates the weight, and otherwise
  (eager mode) on the first forward after the weight changed (another tensor, or its version
  counter moved), so a T-frame recurrent unroll or several gradient-accumulation micro-batches
  advance the iteration once per optimizer step. Never under ``torch.compile``, ``torch.func``
  transforms or ``torch.jit.trace`` (give ``input_size`` so nothing materializes there), never in
  eval mode.
* The effective weight of one forward is reused by the next forwards (all frames of an unroll,
  all micro-batches: one autograd node per step) only while that is provably the same value:
  the same weight tensor at the same version holding the same values (``torch.equal`` against a
  copy, which ``.data`` edits cannot bypass) and the same vectors and settings. That check is
  cheap on the CPU only; on other devices every forward recomputes the weight (no host sync).
* Eval mode never refreshes: the output equals the last training-mode output for the same
  weights, and a fresh layer that loads the state_dict gives the identical output.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.modules.conv import _LazyConvXdMixin
from torch.nn.parameter import UninitializedParameter, is_lazy

from . import backends, batched_refresh as _refresh, warm_start, weight_scope
from .ops import VARIANT_PROJECTED, naive, prepare_constants, variant_code
from .conv_operator import ConvGeometry, ntuple
from .power_iteration import (FRESH_NAME, GRAM_NAMES, SAVED_CONSTANT_NAMES, VECTOR_NAMES, PowerIterationState,
                              normal_tensors, version_of)
from .hyperparameters import (check_alpha, check_beta, check_eps, check_float_dtype, check_iterations, check_sigma_floor,
                              check_variant)
from .precision import compute_dtype, no_autocast

WARMUP_ITERATIONS = 15  # from a random start
# From the symbol start (warm_start.py: stride-1 convs with zero or circular padding on maps of 64+ pixels).
# Relative error of the sigma_1 estimate u^T W v against the exact sigma_1 (srnc_ext.spectral, tol 1e-10),
# 64x64 maps, 3x3 kernels, float32 layers: after 15 iterations from a
# random start -1.6e-2 .. -3.5e-2 on the nine layers measured (default init 64->64 zeros/circular/
# groups=4/dilation 2, trained 16->16 and 19->16, a smooth 64->64); from the symbol start -8.2e-8 ..
# -7.6e-3 with no iteration, -1.9e-6 .. -4.0e-3 after one. One iteration then: every case at least 6x
# closer than 15 random-start iterations, at 1/15 of their cost.
SYMBOL_WARMUP_ITERATIONS = 1
# A warm-up on a small operator (either start) iterates on to WARMUP_TOL (residual ||W v - sigma u|| / sigma)
# within WARMUP_WORK multiply-adds of one conv per iteration, at most MAX_WARMUP_ITERATIONS: 15
# iterations left a 4->5 3x3 layer at 8x8 (PyTorch's init, 60 seeds) with sigma_1(W_eff)/alpha up to
# 1.076 (22 of 60 seeds above 1.01), at a cost of microseconds per iteration. Layers of 32 channels at
# 32x32 and larger keep WARMUP_ITERATIONS.
WARMUP_WORK = 2**27
MAX_WARMUP_ITERATIONS = 500
WARMUP_TOL = 1e-4
# sigma_floor's default: below sigma_1 estimates of 1e-3 alpha the weight is scaled linearly (gradient at
# most about 1e3 alpha |g| there, instead of alpha / eps at an all-zero weight); trained layers never get
# near it, so this is the paper's algorithm for them. convert uses 1.0 for all-zero (zero-initialized) layers.
DEFAULT_SIGMA_FLOOR = 1e-3
LAGGED_NAME = "_lagged_steps"  # saved with refresh_every > 1: steps since the last refresh
_LEGACY_EXTRA_STATE = "_extra_state"  # srnc_ext 0.1.0 saved {"input_size", "variant", "fresh"} there


def warmup_iterations(geometry: ConvGeometry, n_power_iterations: int, symbol_start: bool) -> Tuple[int, Optional[float]]:
    """``(iterations, tol)`` of a warm-up: ``SYMBOL_WARMUP_ITERATIONS`` from a symbol start, else
    ``WARMUP_ITERATIONS``, never fewer than ``n_power_iterations``; on a small operator, as many as
    ``WARMUP_WORK`` affords instead (at most ``MAX_WARMUP_ITERATIONS``), stopping at ``WARMUP_TOL``."""
    fixed = max(SYMBOL_WARMUP_ITERATIONS if symbol_start else WARMUP_ITERATIONS, n_power_iterations)
    conv_work = geometry.positions * geometry.out_channels * (geometry.in_channels // geometry.groups) * geometry.taps
    affordable = min(MAX_WARMUP_ITERATIONS, WARMUP_WORK // max(1, conv_work))
    return (affordable, WARMUP_TOL) if affordable > fixed else (fixed, None)


@torch.no_grad()
def reset_power_iterations(model_or_layers, n_iterations: Optional[int] = None) -> int:
    """``reset_power_iteration`` of every materialized SRN-C layer of a model, or of every layer of an
    iterable of layers (each with ``input_size`` known), batched: one symbol search per refresh
    signature (``warm_start.layer_starts``), then one batched warm-up refresh per signature and
    iteration count. Every start is computed before any buffer is written. Returns the number of
    layers reset. ``convert`` warms its layers up this way; call it after loading new weights
    wholesale into a converted model."""
    if isinstance(model_or_layers, nn.Module):
        layers = [m for m in _refresh._layers_of(model_or_layers) if m.materialized]
    else:
        layers = list(model_or_layers)
    for layer in layers:
        if layer._geometry is None:
            raise RuntimeError(f"{layer._display_name()}: input_size is unknown: pass input_size= or run a forward first")
    if n_iterations is not None:
        check_iterations("n_iterations", n_iterations)
    starts = warm_start.layer_starts(layers)
    counts: Dict[tuple, list] = {}
    for layer, start in zip(layers, starts):
        n, tol = (n_iterations, None) if n_iterations is not None else warmup_iterations(
            layer._geometry, layer.n_power_iterations, start is not None)
        counts.setdefault((n, tol), []).append(layer)
    for layer, start in zip(layers, starts):
        layer._allocate(layer._geometry, start)
    for (n, tol), members in counts.items():
        _refresh.refresh_layers(members, n, tol=tol, warn=False)  # counts as these weights' refresh
    return len(layers)


def _storage_shortfall(tensor) -> Optional[str]:
    """Why an incoming vector or constant cannot be loaded, or None: a tensor that is not dense
    (sparse, or a storage holding fewer elements than its shape has, e.g. a stride-0 expanded
    tensor claiming a huge shape) would make loading allocate buffers of that shape from a tiny
    file. Anything else (not a tensor, no accessible storage) is left to the shape checks."""
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.layout != torch.strided:
        return f"a {tensor.layout} tensor of shape {tuple(tensor.shape)}, not a dense one"
    try:
        held = tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return None
    if held < tensor.numel() * tensor.element_size():
        return (f"shape {tuple(tensor.shape)} needs {tensor.numel()} elements but its storage holds "
                f"{held // tensor.element_size()} (an expanded or crafted tensor)")
    return None


def _functorch_active() -> bool:
    """Inside a ``torch.func`` transform (grad, vjp, jvp, vmap, functionalize)."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # a torch without functorch's interpreter stack
        return False


def _functional_mode() -> bool:
    """Where the layer must be a pure function of its tensors: no refresh, no cache."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or _functorch_active()


def _check_track(input_size, padding_mode) -> bool:
    """Whether ``input_size`` is ``"track"`` (allowed with zero padding only); raises for other strings."""
    if not isinstance(input_size, str):
        return False
    if input_size != "track":
        raise ValueError(f"input_size must be an int, an (h, w) pair, None or 'track', got {input_size!r}")
    if padding_mode != "zeros":
        # Measured on explicit matrices (tests/test_operator.py): with zero padding sigma_1 never fell from
        # size n to n + 1 (every stride, dilation, kernel tried; it is a compression of the larger operator),
        # with reflect, replicate and circular padding it fell in about a third of the random cases, by up to
        # 31 %, 44 % and 61 %.
        raise ValueError(
            f"input_size='track' needs padding_mode='zeros', got padding_mode={padding_mode!r}: only with zero "
            "padding does sigma_1 never decrease with the map size, so that the largest size seen bounds the "
            "smaller ones (with reflect, replicate and circular padding it can fall by a third or more from "
            "one size to the next); give this layer the size it runs at instead (input_size=(h, w))")
    return True


_SRNC_ARGS_DOC = """
        alpha: target spectral norm of the operator (> 0).
        beta: target stable rank as a fraction of the operator's full rank, in (0, 1];
            ``beta = 1`` is spectral normalization of the true operator.
        input_size: int or one int per spatial dimension, the feature-map size the operator acts on
            (for a transposed conv: the size of its input); None takes it from the first input seen;
            ``"track"`` (zero padding only) takes it from the first input and re-normalizes for the
            largest size seen whenever a larger input arrives (with zero padding sigma_1 never
            decreases with the map size, so sigma_1 <= alpha at every size seen). Other sizes are
            accepted by forward (the normalized weight does not depend on them), with one warning
            per layer: the guarantee is for this size.
        n_power_iterations: power-iteration steps per optimizer step (>= 1).
        eps: added to the spectral norm estimate before dividing (> 0).
        refresh_every: refresh the power iteration after every ``refresh_every``-th optimizer step
            (default 1: every step); in between the forward uses the current weight with the last
            vectors, which saves the refresh's cost at the price of tracking (README, "Amortized
            refresh"). Refreshes for other weight changes (loading, in-place edits) are not skipped.
        sigma_floor: in [0, 1]; where the raw weight's sigma_1 estimate ``s`` is below
            ``tau = sigma_floor * alpha`` the effective weight is blended towards ``(alpha / tau) *
            weight`` (``srnc_ext.ops.coefficients``): a bounded gradient at and near an all-zero
            weight, ``sigma_1 <= alpha`` still, and the paper's normalization unchanged for ``s >= tau``.
            1.0 makes a zero-initialized layer train like an unconverted one until its sigma_1
            reaches alpha (``convert`` picks it for all-zero weights); 0 is Algorithm 2 exactly
            (gradient about ``alpha / eps`` at a zero weight). Default ``DEFAULT_SIGMA_FLOOR = 1e-3``.
        variant: ``"projected"`` (default: sigma_1 = alpha for every beta) or ``"paper"``
            (Algorithm 2 literally; see docs/variants.md).
        backend: ``None`` (the global choice, see ``srnc_ext.set_backend``), ``"auto"``,
            ``"cuda"``, ``"cpu"``, ``"triton"`` or ``"reference"``.

    ``srnc_name`` (set by ``convert`` to the qualified name) names the layer in warnings."""


def _check_srnc_args(dtype, input_size, padding_mode, alpha, beta, eps, n_power_iterations, variant, backend,
                     sigma_floor, refresh_every):
    """The SRN-C arguments, checked before the torch layer is built: ``(track, alpha, beta, eps)``."""
    check_float_dtype(dtype)
    check_iterations("refresh_every", refresh_every)
    check_sigma_floor(sigma_floor)
    track = _check_track(input_size, padding_mode)
    alpha, beta, eps = check_alpha(alpha), check_beta(beta), check_eps(eps)
    check_iterations("n_power_iterations", n_power_iterations)
    check_variant(variant)
    backends.check_backend(backend)
    return track, alpha, beta, eps


class SRNCLayer:
    """The SRN-C part of every SRN-C layer kind (a mixin before the torch layer class).

    A kind sets ``_SPATIAL_DIMS`` and implements ``_geometry_for(size)`` (the operator on inputs of
    that size) and ``forward``; ``_TRANSPOSED`` kinds' vectors are swapped (``u`` lives on the
    input, ``v`` on the output). ``weight`` stays the raw trainable parameter and the forward uses
    ``effective_weight()``.
    """

    _SPATIAL_DIMS = 2
    _TRANSPOSED = False

    def _init_srnc(self, *, track: bool, alpha: float, beta: float, input_size, n_power_iterations: int, eps: float,
                   variant: str, backend: Optional[str], sigma_floor: float, refresh_every: int) -> None:
        self.alpha = alpha
        self.refresh_every = check_iterations("refresh_every", refresh_every)
        self.sigma_floor = check_sigma_floor(sigma_floor)
        self.beta = beta
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.variant = variant
        self.srnc_name: Optional[str] = None
        self.track_input_size = track  # input_size="track": re-normalize for the largest size seen
        self._size_warned = False  # the once-per-layer warning about inputs of another size
        self._backend = backend
        self._geometry: Optional[ConvGeometry] = None
        self._weight_cache: Optional[_WeightCache] = None
        self._cache_weight = True  # False: recompute the effective weight on every forward (benchmarks)
        self.power_iteration = PowerIterationState(self._buffers, projected=variant == "projected")
        for name in (*self.power_iteration.vector_names, *SAVED_CONSTANT_NAMES):
            self.register_buffer(name, None)
        for name in GRAM_NAMES:
            self.register_buffer(name, None, persistent=False)
        backends.resolve(backend, self.weight.device)  # an explicit backend that cannot run says so now
        _refresh.register(self)
        if input_size is not None and not track:
            self.set_input_size(input_size)

    # ------------------------------------------------------------------ the kind's operator
    def _geometry_for(self, size) -> ConvGeometry:
        """The operator of this layer on inputs of ``size`` (validated)."""
        return ConvGeometry.from_conv(self, size)

    def _size_of(self, geometry: ConvGeometry) -> tuple:
        """The layer's input size for its operator ``geometry`` (a transposed conv's input is the
        output of the conv it is the adjoint of)."""
        return geometry.output_size if self._TRANSPOSED else geometry.input_size

    def _input_size_arg(self, input_size) -> tuple:
        return ntuple(input_size, self._SPATIAL_DIMS, "input_size")

    def _check_input(self, input: torch.Tensor) -> None:
        n = self._SPATIAL_DIMS
        if input.dim() not in (n + 1, n + 2):
            names = ("N", "C", *"DHW"[3 - n:])
            raise ValueError(f"input must be ({', '.join(names)}) or ({', '.join(names[1:])}), got shape "
                             f"{tuple(input.shape)}")
        if input.shape[-n - 1] != self.in_channels:
            raise ValueError(
                f"input has {input.shape[-n - 1]} channels but the layer has in_channels={self.in_channels}"
            )

    def _prepare_forward(self, size: tuple) -> None:
        """Before a forward on inputs of ``size``: materialize, note another size, refresh if stale."""
        if torch.jit.is_tracing() and self.training:
            raise RuntimeError(f"torch.jit.trace of an {type(self).__name__} in training mode would record one "
                               "refresh as constants: trace the model in eval mode, or trace "
                               "srnc_ext.to_conv2d(model)")
        if not self.materialized:
            self.set_input_size(self.input_size or size)
        elif size != self.input_size and not _functional_mode():  # a tuple comparison: no sync
            self._other_input_size(size)
        if self.training and not _functional_mode() and self.is_stale():
            _refresh.refresh_layers([self])

    # ------------------------------------------------------------------ configuration
    @property
    def input_size(self) -> Optional[Tuple[int, ...]]:
        """The input size (one int per spatial dimension) the operator is normalized for, or None
        until known."""
        return None if self._geometry is None else self._size_of(self._geometry)

    @property
    def geometry(self) -> Optional[ConvGeometry]:
        """The layer's operator geometry (None until ``input_size`` is known)."""
        return self._geometry

    @property
    def materialized(self) -> bool:
        return self._geometry is not None and self.power_iteration.allocated

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        backends.resolve(backends.check_backend(name), self.weight.device)
        self._backend = name

    @property
    def ops(self):
        """The op namespace of the backend for the weight's current device (resolved on each use,
        so a layer built on the meta device and moved later gets the compiled ops)."""
        return backends.op_set(self._backend, self.weight.device)

    _op_impl = ops  # the name this attribute had in srnc_ext 0.1.0

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the vectors and of the normalization (float64 for float64 weights, else float32)."""
        return compute_dtype(self.weight.dtype)

    @property
    def variant_code(self) -> int:
        return variant_code(self.variant, self.beta)

    def op_scalars(self) -> Tuple[float, float, float, float, int, float]:
        """``(alpha, beta * full_rank, output positions, eps, variant code, floor tau = sigma_floor * alpha)``
        for the reweight op."""
        geometry = self._geometry
        return (self.alpha, self.beta * geometry.full_rank, float(geometry.positions), self.eps, self.variant_code,
                self.sigma_floor * self.alpha)

    def signature(self) -> tuple:
        """Layers with equal signatures are refreshed together as one grouped convolution."""
        return (self._geometry, self.variant_code, self.beta, self.eps, self.compute_dtype,
                self.weight.device, id(self.ops))  # alpha and the floor do not enter the refresh

    def is_stale(self) -> bool:
        """True when the weight changed (another tensor, or written in place) since the last refresh."""
        return self.power_iteration.is_stale(self.weight)

    @property
    def residual(self) -> Optional[float]:
        """Convergence of the last refresh: ``||W v - sigma u|| / sigma`` of its last power-iteration
        step (the larger of the two iterations for the projected variant), None before any refresh."""
        residual = self.power_iteration.residual
        return None if residual is None else float(residual.max())

    # ------------------------------------------------------------------ state
    def set_input_size(self, input_size) -> None:
        """Set the feature-map size (an int or one per spatial dimension) and start a fresh warmed-up
        power iteration."""
        self._set_geometry(input_size)
        self.reset_power_iteration()

    def _set_geometry(self, input_size) -> None:
        """Set the feature-map size without touching the power iteration (``convert`` warms many
        layers up at once after this)."""
        self._geometry = self._geometry_for(self._input_size_arg(input_size))  # validates first
        self._size_warned = False

    def _other_input_size(self, size: Tuple[int, ...]) -> None:
        """A forward saw an input of ``size``, not the normalized ``input_size``: re-normalize for
        the elementwise largest size (``"track"``), or warn once."""
        current = self.input_size
        if self.track_input_size:
            if any(new > old for new, old in zip(size, current)):
                self.set_input_size(tuple(max(new, old) for new, old in zip(size, current)))
            return
        if self._size_warned:
            return
        self._size_warned = True
        where = ("with zero padding sigma_1 is at most alpha on smaller maps and can exceed it on larger ones"
                 if self.padding_mode == "zeros" else f"with padding_mode={self.padding_mode!r} it can be above or "
                 "below alpha at either smaller or larger sizes")
        track = " or input_size='track' (the largest size seen)" if self.padding_mode == "zeros" else ""
        warnings.warn(
            f"SRN-C layer {self._display_name()}: normalized for input size {current} but got an input of size "
            f"{size}; sigma_1 = alpha holds at {current} only, {where}. Give the layer the size it runs at "
            f"(input_size=, or convert(..., input_size={{name: size}})){track}. Warned once per layer.",
            RuntimeWarning, stacklevel=2)

    def _display_name(self) -> str:
        if self.srnc_name:
            return self.srnc_name
        if hasattr(self, "kernel_size"):
            return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size})"
        return f"{type(self).__name__}({self.in_features}, {self.out_features})"

    def _allocate(self, geometry: ConvGeometry, vectors: Optional[Dict[str, torch.Tensor]] = None) -> None:
        device = self.weight.device
        self.power_iteration.allocate(geometry, self.compute_dtype, device,
                                      _refresh.vector_format(device, geometry.ndim), self.eps, vectors)
        self._weight_cache = None

    def reset_power_iteration(self, n_iterations: Optional[int] = None) -> None:
        """Start new vectors and run ``n_iterations`` power iterations on the current weight (none on
        the meta device).

        The start is the symbol start (``warm_start.layer_start``: plane waves at the kernel's most
        amplified frequency) where it applies, with ``max(SYMBOL_WARMUP_ITERATIONS, n_power_iterations)``
        iterations by default, else random vectors with ``max(WARMUP_ITERATIONS, n_power_iterations)``
        (small operators: on to ``WARMUP_TOL``, see ``warmup_iterations``).
        Call it after replacing the weight wholesale. Requires ``input_size``.
        ``reset_power_iterations(layers)`` does this for many layers at once, batched.
        """
        reset_power_iterations([self], n_iterations)

    def reset_parameters(self) -> None:
        """The torch layer's initialization, then a fresh power iteration for the new weight (what
        ``to_empty()`` followed by ``reset_parameters()`` needs, as FSDP does)."""
        super().reset_parameters()
        if getattr(self, "power_iteration", None) is not None and self.materialized:  # not during __init__
            self.reset_power_iteration()

    def refresh(self, n_iterations: Optional[int] = None, *, tol: Optional[float] = None) -> Optional[float]:
        """Advance the power iteration(s) on the current weight and return ``residual``.

        ``n_iterations`` steps (default ``n_power_iterations``); with ``tol``, iterate until the
        residual is at most ``tol`` or ``n_iterations`` steps (default 1000) have run, warning if
        it was not reached. Runs automatically once per optimizer step in training mode; call it
        e.g. as ``refresh(500, tol=1e-6)`` before deployment to remove the tracking lag of
        training. ``srnc_ext.refresh(model)`` refreshes all layers of a model in batched groups.
        Raises ``ValueError`` (vectors untouched) if the weight has NaN or inf entries.
        """
        if not self.materialized:
            raise RuntimeError("input_size is unknown: pass input_size= or run a forward first")
        _refresh.refresh_layers([self], n_iterations, tol=tol)
        return self.residual

    @torch.no_grad()
    def _recompute_constants(self) -> None:
        """The rank-one kernels and op constants from the stored vectors, without iterating."""
        geometry, code, state = self._geometry, self.variant_code, self.power_iteration
        taps = geometry.taps
        with no_autocast(self.weight), normal_tensors():
            s1 = geometry.kernel_grad(state.vector("v"), state.vector("u")).reshape(1, -1, taps)
            s1_out = s1
            if code == VARIANT_PROJECTED:
                s1_out = geometry.kernel_grad(state.vector("v_out"), state.vector("u_out")).reshape(1, -1, taps)
            direction, consts = prepare_constants(s1, s1_out, self._buffers["_gram_pinv"], code)
            for buffer, value in state.commit_pairs({}, s1, direction, s1_out, consts):
                buffer.copy_(value)
        state.committed(None)

    def warn_floor(self, floor: float) -> None:
        """Warn (once per layer) that ``beta`` asks for a stable rank below what the reweighting of
        this kernel can reach (``floor``), where gamma underflows and the weight stops learning."""
        if self.power_iteration.floor_warned:
            return
        self.power_iteration.floor_warned = True
        full_rank = self._geometry.full_rank
        name = self._display_name()
        warnings.warn(
            f"SRN-C layer {name}: beta={self.beta} asks for stable rank {self.beta * full_rank:.4g}, below the floor "
            f"{floor:.4g} that the reweighting can reach for this kernel and input size {self.input_size} (the "
            f"stable rank of the kernel's rank-one component); there gamma underflows and the weight gets almost no "
            f"gradient. The smallest reachable beta here is {floor / full_rank:.4g}.",
            RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ forward
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``alpha * K~`` (differentiable w.r.t. ``weight``).

        In eager mode on the CPU it is computed once per weight value and refresh and shared by
        every forward until then (a T-frame unroll runs the reweight op once, and its backward
        once per ``backward()`` call); under ``torch.compile`` the op is traced into the graph
        (once per compiled forward of a model with ``share_effective_weights``, which ``convert``
        registers; see ``weight_scope.py``);
        under ``torch.func`` transforms and ``torch.jit.trace`` the pure-PyTorch reference ops
        run with plain autograd (they support vmap, jvp and higher-order gradients).
        """
        if not self.materialized:
            raise RuntimeError("input_size is unknown: pass input_size= or run a forward first")
        if torch.compiler.is_compiling():
            # one node per compiled forward of a model with share_effective_weights (convert's models)
            shared = weight_scope.lookup(self)
            if shared is None:
                shared = self._reweight(self.ops)
                weight_scope.store(self, shared)
            return shared
        if torch.jit.is_tracing() or _functorch_active():
            return self._reweight(backends.REFERENCE)
        if self.power_iteration.constants_stale():
            self._recompute_constants()  # the vectors were written from outside (e.g. an EMA of the buffers)
        weight, ops = self.weight, self.ops
        grad = torch.is_grad_enabled() and weight.requires_grad
        key = (self.power_iteration.version, grad, self.alpha, self.beta, self.eps, self.sigma_floor, id(ops))
        cache = self._weight_cache
        if cache is not None and cache.holds(weight, key):
            return cache.value
        if grad:
            out = _Reweight.apply(weight, self, ops)[0]
        else:
            with torch.no_grad():
                out = self._reweight(ops)
        self._weight_cache = _WeightCache.create(weight, key, out) if self._cache_weight else None
        return out

    def _reweight(self, ops) -> torch.Tensor:
        """The reweight op with its own autograd (traceable by ``torch.compile``)."""
        weight = self.weight
        inputs = self.power_iteration.op_inputs()
        with no_autocast(weight):
            kernel = weight.to(self.compute_dtype).reshape(inputs[0].shape)
            out, _ = ops.reweight_forward(kernel, *inputs, *self.op_scalars())
        return out.reshape(weight.shape).to(weight.dtype)

    # ------------------------------------------------------------------ nn.Module plumbing
    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, variant={self.variant!r}, "
            f"sigma_floor={self.sigma_floor}, "
            f"input_size={self.input_size}{' (track)' if self.track_input_size else ''}, "
            f"n_power_iterations={self.n_power_iterations}"
            + (f", refresh_every={self.refresh_every}" if self.refresh_every != 1 else "")
        )

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its forward refreshes Python-side state). "
            "Export srnc_ext.to_conv2d(copy.deepcopy(model)) -- plain torch layers holding the effective "
            "weights, the same function in eval mode -- or use torch.jit.trace in eval mode, torch.export or "
            "torch.compile.")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.materialized:
            # "fresh": the vectors were refreshed for exactly the saved weight, so a resumed run does not
            # refresh again before its first step (resume equals an uninterrupted run). A tensor, so the
            # state_dict holds tensors only (EMA code zips and lerps its values).
            destination[prefix + FRESH_NAME] = torch.tensor(not self.is_stale(), device=self.weight.device)
            if self.refresh_every > 1:  # where in its refresh cycle the layer is: a resumed run keeps the schedule
                destination[prefix + LAGGED_NAME] = torch.tensor(self.power_iteration.lagged_steps,
                                                                 device=self.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        legacy = state_dict.get(prefix + _LEGACY_EXTRA_STATE)
        legacy = legacy if isinstance(legacy, dict) else {}
        geometry = self._check_incoming(state_dict, prefix, legacy, error_msgs)
        if geometry is False:
            return  # nothing was touched
        if geometry is not None and (self._geometry != geometry or not self.power_iteration.allocated):
            self._geometry = geometry
            self._allocate(geometry)  # buffers of the incoming shapes, so copy_ works
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        own = {prefix + name for name in (_LEGACY_EXTRA_STATE, FRESH_NAME, LAGGED_NAME)}
        unexpected_keys[:] = [key for key in unexpected_keys if key not in own]
        optional = {prefix + name for name in SAVED_CONSTANT_NAMES}  # recomputed from the vectors when absent
        missing_keys[:] = [key for key in missing_keys if key not in optional]
        if not self.materialized:
            return
        self.power_iteration.committed(None)  # new vectors or constants: no cached weight survives
        self._weight_cache = None
        if any(prefix + name not in state_dict for name in SAVED_CONSTANT_NAMES):
            self._recompute_constants()  # a state_dict without them (vectors only)
        flag = state_dict.get(prefix + FRESH_NAME)
        fresh = (bool(flag) if isinstance(flag, torch.Tensor) and flag.numel() == 1 and not flag.is_meta
                 else legacy.get("fresh") is True)
        self.power_iteration.mark_fresh(self.weight if fresh and (prefix + "weight") in state_dict else None)
        lagged = state_dict.get(prefix + LAGGED_NAME)
        self.power_iteration.lagged_steps = (
            int(lagged) if isinstance(lagged, torch.Tensor) and lagged.numel() == 1 and not lagged.is_meta
            and not lagged.is_floating_point() and 0 <= int(lagged) < 2**31 else 0)

    def _check_incoming(self, state_dict, prefix, legacy, error_msgs):
        """The geometry the incoming vectors imply (their shapes carry the input size), the current
        one when there are none, or False after recording an error (before anything is loaded)."""
        def fail(message):
            error_msgs.append(f"{prefix or '<layer>.'}{message}")
            return False

        if legacy.get("variant", self.variant) != self.variant:
            return fail(f" checkpoint has variant={legacy.get('variant')!r}, layer has variant={self.variant!r}")
        vectors = {name: state_dict.get(prefix + name) for name in VECTOR_NAMES}
        for name in (*VECTOR_NAMES, *SAVED_CONSTANT_NAMES):  # before their shapes size any buffer
            short = _storage_shortfall(state_dict.get(prefix + name))
            if short:
                return fail(f"{name}: refused, {short}")
        if vectors["v"] is None:
            return self._geometry
        if (vectors["u_out"] is not None) != (self.variant == "projected"):
            saved = "projected" if vectors["u_out"] is not None else "paper"
            return fail(f" checkpoint has the vectors of variant={saved!r}, layer has variant={self.variant!r}")
        name = "u" if self._TRANSPOSED else "v"  # the vector on the layer's input
        v, n = vectors[name], self._SPATIAL_DIMS
        if (not isinstance(v, torch.Tensor) or v.dim() != n + 2 or v.shape[0] != 1
                or v.shape[1] != self._vector_channels()):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            spatial = ", ".join("DHW"[3 - n:]) if n else "1"
            return fail(f"{name}: shape {shape} is not (1, {self._vector_channels()}, {spatial})")
        try:
            geometry = self._geometry_for(tuple(int(s) for s in v.shape[2:]))
        except (TypeError, ValueError) as err:
            return fail(f"{name}: {err}")
        for name, expected in self.power_iteration.shapes(geometry).items():
            incoming = state_dict.get(prefix + name)
            if incoming is not None and (not isinstance(incoming, torch.Tensor) or tuple(incoming.shape) != expected):
                shape = tuple(incoming.shape) if isinstance(incoming, torch.Tensor) else type(incoming).__name__
                return fail(f"{name}: shape {shape} does not match {expected} (input size {self._size_of(geometry)})")
        return geometry

    def _apply(self, fn, recurse=True):
        # Keep vectors and constants in the compute dtype (float32 for half/bfloat16 weights).
        state = self.power_iteration
        saved = {name: self._buffers.get(name) for name in (*state.vector_names, *SAVED_CONSTANT_NAMES)}
        super()._apply(fn, recurse)
        target = self.compute_dtype
        for name, old in saved.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != target:
                source = new if old.is_meta and not new.is_meta else old
                self._buffers[name] = new = source.to(device=new.device, dtype=target)
            if name in state.vector_names and new is not None:  # the memory format the refresh uses there
                self._buffers[name] = new.contiguous(memory_format=_refresh.vector_format(new.device, new.dim() - 2))
        if self._geometry is not None and state.allocated:
            state.set_gram(self._geometry, target, self.weight.device)  # from the geometry: valid after to_empty too
            state.record_vectors()  # converted together: still consistent
        self._weight_cache = None
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_copy_is_fresh"] = self.materialized and not self.is_stale()  # a copy is as fresh as its original
        state["_weight_cache"] = None  # holds an autograd graph
        state.pop(weight_scope.SCOPE, None)
        state.pop(weight_scope.WEIGHTS, None)
        return state

    def __setstate__(self, state):
        fresh = state.pop("_copy_is_fresh", False)
        state.setdefault("sigma_floor", 0.0)  # pickled before sigma_floor existed: the algorithm it ran
        state.setdefault("refresh_every", 1)
        super().__setstate__(state)
        if fresh:
            self.power_iteration.mark_fresh(self.weight)
        _refresh.register(self)


    def _vector_channels(self) -> int:
        """The channels of the power-iteration vector on the layer's input (``v``; ``u`` for a
        transposed conv)."""
        return self.in_channels


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _SRNCConv(SRNCLayer):
    """SRN-C for ``nn.Conv1d/2d/3d``: the conv's own operator on ``input_size`` maps."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 alpha: float = 1.0, beta: float = 1.0, input_size=None, n_power_iterations: int = 1,
                 eps: float = 1e-12, variant: str = "projected", backend: Optional[str] = None,
                 sigma_floor: float = DEFAULT_SIGMA_FLOOR, refresh_every: int = 1) -> None:
        track, alpha, beta, eps = _check_srnc_args(dtype, input_size, padding_mode, alpha, beta, eps,
                                                   n_power_iterations, variant, backend, sigma_floor, refresh_every)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype)
        self._init_srnc(track=track, alpha=alpha, beta=beta, input_size=input_size,
                        n_power_iterations=n_power_iterations, eps=eps, variant=variant, backend=backend,
                        sigma_floor=sigma_floor, refresh_every=refresh_every)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        self._prepare_forward(tuple(input.shape[-self._SPATIAL_DIMS:]))
        return self._conv_forward(input, self.effective_weight(), self.bias)


class SRNCConv1d(_SRNCConv, nn.Conv1d):
    __doc__ = ("``nn.Conv1d`` with Stable Rank Normalization of its true convolution operator (SRN-C): the forward "
               "uses ``effective_weight()``, the raw ``weight`` divided by the spectral norm of the layer's operator "
               "on ``input_size`` maps (padding mode, stride, dilation and groups included) and, for ``beta < 1``, "
               "reweighted to lower its stable rank toward ``beta * min(dim_in, dim_out)``.\n\n"
               "    Args (beyond ``nn.Conv1d``'s):" + _SRNC_ARGS_DOC)
    _SPATIAL_DIMS = 1


class SRNCConv2d(_SRNCConv, nn.Conv2d):
    __doc__ = SRNCConv1d.__doc__.replace("Conv1d", "Conv2d")
    _SPATIAL_DIMS = 2


class SRNCConv3d(_SRNCConv, nn.Conv3d):
    __doc__ = SRNCConv1d.__doc__.replace("Conv1d", "Conv3d")
    _SPATIAL_DIMS = 3


class _SRNCConvTranspose(SRNCLayer):
    """SRN-C for ``nn.ConvTranspose1d/2d/3d``: the adjoint of the conv with the same weight, on the
    transposed layer's output size (``ConvGeometry.for_transposed``; same singular values)."""

    _TRANSPOSED = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None, dtype=None,
                 *, alpha: float = 1.0, beta: float = 1.0, input_size=None, n_power_iterations: int = 1,
                 eps: float = 1e-12, variant: str = "projected", backend: Optional[str] = None,
                 sigma_floor: float = DEFAULT_SIGMA_FLOOR, refresh_every: int = 1) -> None:
        track, alpha, beta, eps = _check_srnc_args(dtype, input_size, padding_mode, alpha, beta, eps,
                                                   n_power_iterations, variant, backend, sigma_floor, refresh_every)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self._init_srnc(track=track, alpha=alpha, beta=beta, input_size=input_size,
                        n_power_iterations=n_power_iterations, eps=eps, variant=variant, backend=backend,
                        sigma_floor=sigma_floor, refresh_every=refresh_every)

    def _geometry_for(self, size) -> ConvGeometry:
        return ConvGeometry.for_transposed(self.weight.shape, size, stride=self.stride, padding=self.padding,
                                           output_padding=self.output_padding, dilation=self.dilation,
                                           groups=self.groups)

    def forward(self, input: torch.Tensor, output_size: Optional[list] = None) -> torch.Tensor:
        n = self._SPATIAL_DIMS
        self._check_input(input)
        output_padding = tuple(self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                                    n, self.dilation))
        self._prepare_forward(tuple(input.shape[-n:]))
        if output_padding != tuple(self.output_padding) and not _functional_mode():
            self._other_output_padding(output_padding)
        return _CONV_TRANSPOSE[n](input, self.effective_weight(), self.bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)

    def _other_output_padding(self, output_padding: tuple) -> None:
        if self._size_warned:
            return
        self._size_warned = True
        warnings.warn(
            f"SRN-C layer {self._display_name()}: normalized for output_padding={tuple(self.output_padding)} but "
            f"forward's output_size gives output_padding={output_padding}: the operator that ran has more output "
            f"rows than the one normalized, so sigma_1 = alpha is not guaranteed for it. Build the layer with that "
            f"output_padding. Warned once per layer.", RuntimeWarning, stacklevel=3)


class SRNCConvTranspose1d(_SRNCConvTranspose, nn.ConvTranspose1d):
    __doc__ = ("``nn.ConvTranspose1d`` with SRN-C of its true operator: the adjoint of the conv with the same "
               "weight, acting on this layer's output size (it has the same singular values). ``input_size`` is the "
               "size of this layer's input; ``output_padding`` must be below the stride.\n\n"
               "    Args (beyond ``nn.ConvTranspose1d``'s):" + _SRNC_ARGS_DOC)
    _SPATIAL_DIMS = 1


class SRNCConvTranspose2d(_SRNCConvTranspose, nn.ConvTranspose2d):
    __doc__ = SRNCConvTranspose1d.__doc__.replace("ConvTranspose1d", "ConvTranspose2d")
    _SPATIAL_DIMS = 2


class SRNCConvTranspose3d(_SRNCConvTranspose, nn.ConvTranspose3d):
    __doc__ = SRNCConvTranspose1d.__doc__.replace("ConvTranspose1d", "ConvTranspose3d")
    _SPATIAL_DIMS = 3


class SRNCLinear(SRNCLayer, nn.Linear):
    """``nn.Linear`` with SRN (Sanyal et al.): the operator is the weight matrix itself, normalized to
    spectral norm ``alpha`` and, for ``beta < 1``, to stable rank toward ``beta * min(in, out)``.

    Args (beyond ``nn.Linear``'s): ``alpha``, ``beta``, ``n_power_iterations``, ``eps``, ``variant``,
    ``backend``, ``sigma_floor``, ``refresh_every`` as for ``SRNCConv2d``; there is no input size (``input_size`` is None). Inputs are
    ``(..., in_features)``.
    """

    _SPATIAL_DIMS = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 alpha: float = 1.0, beta: float = 1.0, n_power_iterations: int = 1, eps: float = 1e-12,
                 variant: str = "projected", backend: Optional[str] = None,
                 sigma_floor: float = DEFAULT_SIGMA_FLOOR, refresh_every: int = 1) -> None:
        _, alpha, beta, eps = _check_srnc_args(dtype, None, "zeros", alpha, beta, eps, n_power_iterations, variant,
                                               backend, sigma_floor, refresh_every)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_srnc(track=False, alpha=alpha, beta=beta, input_size=(1,), n_power_iterations=n_power_iterations,
                        eps=eps, variant=variant, backend=backend, sigma_floor=sigma_floor,
                        refresh_every=refresh_every)

    def _geometry_for(self, size) -> ConvGeometry:
        return ConvGeometry.for_linear(self.in_features, self.out_features)

    @property
    def input_size(self) -> None:
        """None: the operator of a Linear is its matrix, whatever the input's shape."""
        return None

    def _vector_channels(self) -> int:
        return self.in_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(f"input must be (..., in_features={self.in_features}), got shape {tuple(input.shape)}")
        if torch.jit.is_tracing() and self.training:
            raise RuntimeError("torch.jit.trace of an SRNCLinear in training mode would record one refresh as "
                               "constants: trace the model in eval mode, or trace srnc_ext.to_conv2d(model)")
        if self.training and not _functional_mode() and self.is_stale():
            _refresh.refresh_layers([self])
        return F.linear(input, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{nn.Linear.extra_repr(self)}, alpha={self.alpha}, beta={self.beta}, variant={self.variant!r}, "
                f"sigma_floor={self.sigma_floor}, "
                f"n_power_iterations={self.n_power_iterations}")


class _LazySRNC(_LazyConvXdMixin):
    """The lazy form of an SRN-C conv kind: ``in_channels`` inferred from the first input, as torch's
    ``nn.LazyConv*d`` / ``nn.LazyConvTranspose*d``.

    ``weight`` and ``bias`` are ``UninitializedParameter``s until the first forward, which
    materializes and initializes them (the torch layer's init), sets ``input_size`` (the one given,
    else that input's) with a warmed-up power iteration, and turns the module into its SRN-C kind
    (``cls_to_become``), which then runs that forward. Like torch's lazy modules, a ``state_dict``
    can be loaded before the first forward (its shapes materialize the parameters and, through the
    saved vectors, the input size); build the optimizer after materializing. ``convert`` turns torch's
    lazy convs into these.
    """

    def _finish_lazy(self, out_channels: int, bias: bool, device, dtype, input_size, track: bool) -> None:
        self.weight = UninitializedParameter(device=device, dtype=dtype)
        self.out_channels = out_channels
        if bias:
            self.bias = UninitializedParameter(device=device, dtype=dtype)
        self._pending_input_size = None
        if input_size is not None and not track:
            size = self._input_size_arg(input_size)
            # the size checks do not depend on the channels: refuse a bad size now, not at the first forward
            probe = (1, 1, *self.kernel_size)
            if self._TRANSPOSED:
                ConvGeometry.for_transposed(probe, size, stride=self.stride, padding=self.padding,
                                            output_padding=self.output_padding, dilation=self.dilation)
            else:
                ConvGeometry.create(probe, size, stride=self.stride, padding=self.padding, dilation=self.dilation,
                                    padding_mode=self.padding_mode)
            self._pending_input_size = size

    def _get_num_spatial_dims(self) -> int:
        return self._SPATIAL_DIMS

    def initialize_parameters(self, input: torch.Tensor, *args, **kwargs) -> None:
        self._check_lazy_input(input)
        super().initialize_parameters(input, *args, **kwargs)  # in_channels, weight, bias, reset_parameters
        if not self.materialized and self._pending_input_size is not None:
            self.set_input_size(self._pending_input_size)

    def _check_lazy_input(self, input: torch.Tensor) -> None:
        n = self._SPATIAL_DIMS
        if input.dim() not in (n + 1, n + 2):
            names = ("N", "C", *"DHW"[3 - n:])
            raise ValueError(f"input must be ({', '.join(names)}) or ({', '.join(names[1:])}), got shape "
                             f"{tuple(input.shape)}")

    def _lazy_load_hook(self, state_dict, prefix, *args) -> None:
        super()._lazy_load_hook(state_dict, prefix, *args)  # materializes weight/bias at the incoming shapes
        if not is_lazy(self.weight) and self.in_channels == 0:  # what the first forward would have inferred
            self.in_channels = self.weight.shape[0] if self._TRANSPOSED else self.weight.shape[1] * self.groups

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # SRN-C layers check the incoming vectors against in_channels before nn.Module runs the load
        # pre-hooks: materialize first (the hook then finds nothing left to do)
        self._lazy_load_hook(state_dict, prefix, *args)
        super()._load_from_state_dict(state_dict, prefix, *args)


class _LazySRNCConv(_LazySRNC):
    def __init__(self, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *, input_size=None,
                 **kwargs) -> None:
        track = isinstance(input_size, str)
        # bias=False as torch's lazy convs do: no tensor is made that the materialization would replace
        super().__init__(0, 0, kernel_size, stride, padding, dilation, groups, False, padding_mode, device, dtype,
                         input_size=input_size if track else None, **kwargs)
        self._finish_lazy(out_channels, bias, device, dtype, input_size, track)


class _LazySRNCConvTranspose(_LazySRNC):
    def __init__(self, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0, groups: int = 1,
                 bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None, dtype=None, *,
                 input_size=None, **kwargs) -> None:
        track = isinstance(input_size, str)
        super().__init__(0, 0, kernel_size, stride, padding, output_padding, groups, False, dilation, padding_mode,
                         device, dtype, input_size=input_size if track else None, **kwargs)
        self._finish_lazy(out_channels, bias, device, dtype, input_size, track)


class LazySRNCConv1d(_LazySRNCConv, SRNCConv1d):
    """``SRNCConv1d`` with ``in_channels`` inferred from the first input (see ``_LazySRNC``)."""
    cls_to_become = SRNCConv1d


class LazySRNCConv2d(_LazySRNCConv, SRNCConv2d):
    """``SRNCConv2d`` with ``in_channels`` inferred from the first input, as ``nn.LazyConv2d``: same
    arguments as ``SRNCConv2d`` without ``in_channels`` (see ``_LazySRNC``)."""
    cls_to_become = SRNCConv2d


class LazySRNCConv3d(_LazySRNCConv, SRNCConv3d):
    """``SRNCConv3d`` with ``in_channels`` inferred from the first input (see ``_LazySRNC``)."""
    cls_to_become = SRNCConv3d


class LazySRNCConvTranspose1d(_LazySRNCConvTranspose, SRNCConvTranspose1d):
    """``SRNCConvTranspose1d`` with ``in_channels`` inferred from the first input (see ``_LazySRNC``)."""
    cls_to_become = SRNCConvTranspose1d


class LazySRNCConvTranspose2d(_LazySRNCConvTranspose, SRNCConvTranspose2d):
    """``SRNCConvTranspose2d`` with ``in_channels`` inferred from the first input (see ``_LazySRNC``)."""
    cls_to_become = SRNCConvTranspose2d


class LazySRNCConvTranspose3d(_LazySRNCConvTranspose, SRNCConvTranspose3d):
    """``SRNCConvTranspose3d`` with ``in_channels`` inferred from the first input (see ``_LazySRNC``)."""
    cls_to_become = SRNCConvTranspose3d


class _WeightCache:
    """One forward's effective weight, reused while provably equal (see the module docstring)."""

    __slots__ = ("weight", "version", "snapshot", "key", "value")

    @classmethod
    def create(cls, weight: torch.Tensor, key: tuple, value: torch.Tensor) -> Optional["_WeightCache"]:
        if weight.device.type != "cpu":  # torch.equal would synchronize the device on every forward
            return None
        cache = cls()
        cache.weight, cache.version, cache.key, cache.value = weakref.ref(weight), version_of(weight), key, value
        cache.snapshot = weight.detach().clone()
        return cache

    def holds(self, weight: torch.Tensor, key: tuple) -> bool:
        return (self.weight() is weight and self.key == key and self.version == version_of(weight)
                and torch.equal(self.snapshot, weight))


class _Reweight(torch.autograd.Function):
    """The effective weight as one autograd node that every forward of a step can share.

    The closed-form backward's inputs are kept on ``ctx`` (not ``save_for_backward``), so the
    node survives one ``backward()`` and serves the next micro-batch of gradient accumulation;
    the layer drops it as soon as the weight or the vectors change. With ``create_graph=True``
    the backward is the same closed form written with differentiable PyTorch ops on the weight
    itself, so second-order gradients (Hessian-vector products) flow.
    """

    @staticmethod
    def forward(weight, layer, ops):
        inputs = layer.power_iteration.op_inputs()
        with no_autocast(weight):
            kernel = weight.detach().to(layer.compute_dtype).reshape(inputs[0].shape)
            out, stats = ops.reweight_forward(kernel, *inputs, *layer.op_scalars())
        return out.reshape(weight.shape).to(weight.dtype), stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, layer, ops = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.ops, ctx.inputs, ctx.scalars, ctx.stats = ops, layer.power_iteration.op_inputs(), layer.op_scalars(), output[1]
        ctx.weight, ctx.dtype = weight, layer.compute_dtype

    @staticmethod
    def backward(ctx, grad, _grad_stats):
        weight, dtype, shape = ctx.weight, ctx.dtype, ctx.inputs[0].shape
        with no_autocast(grad):
            grad_k = grad.to(dtype).reshape(shape)
            if torch.is_grad_enabled():  # create_graph=True: differentiable in the weight and in grad
                grad_kernel = naive.reweight_vjp(grad_k, weight.to(dtype).reshape(shape), *ctx.inputs, *ctx.scalars)
            else:
                kernel = weight.detach().to(dtype).reshape(shape)
                grad_kernel = ctx.ops.reweight_backward(grad_k, kernel, *ctx.inputs, ctx.stats, *ctx.scalars)
        return grad_kernel.reshape(weight.shape).to(weight.dtype), None, None
