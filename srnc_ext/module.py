"""``SRNCConv2d``: a drop-in ``nn.Conv2d`` whose true operator has spectral norm ``alpha``.

Lifecycle of the normalization state:

* The power-iteration vectors are buffers (``u``, ``v``; the projected variant adds
  ``u_out``, ``v_out`` for the renormalization) shaped by ``input_size``. They are created
  ("materialized") when ``input_size`` is known: at construction if it is given, else from the
  first input seen. Materializing draws random unit vectors and runs ``WARMUP_ITERATIONS``
  power iterations on the current weight, as ``torch.nn.utils.spectral_norm`` does.
* Refresh (``refresh()``): ``n_power_iterations`` steps of each power iteration plus one
  weight-gradient convolution, without gradient, batched over all layers of the same
  signature (``srnc_ext.refresh``). In training mode it runs automatically right after each
  ``optimizer.step()`` that updates the weight, and otherwise (eager mode) on the first forward
  after the weight changed (its version counter moved: ``load_state_dict``, any in-place edit),
  so a T-frame recurrent unroll or several gradient-accumulation micro-batches advance the
  iteration once per optimizer step. Under ``torch.compile`` only the optimizer hook runs, so
  compiled forwards contain no refresh (give ``input_size`` so nothing materializes inside).
* Every forward recomputes the effective weight from the raw weight and the refreshed
  rank-one kernels: the differentiable part of SRN-C is elementwise work on the kernel, so
  each forward builds its own small graph and gradients accumulate exactly as if the
  reference were applied once with the same vectors.
* Eval mode never refreshes: the output equals the last training-mode output for the same
  weights, and a fresh layer that loads the state_dict gives the identical output.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from . import backends, batched_refresh as _refresh
from .ops import VARIANT_PROJECTED, prepare_constants, variant_code
from .operator import ConvGeometry, pair
from .precision import compute_dtype, no_autocast
from .reference import VARIANTS

WARMUP_ITERATIONS = 15
_VECTOR_NAMES = ("u", "v", "u_out", "v_out")
# Derived from the vectors: the rank-one kernels and the ops' constants. They are saved too, so a
# loaded layer computes bit for bit what the saved one did (a batched refresh and a per-layer
# recomputation differ in float rounding); the Gram matrices depend on the geometry only.
_SAVED_CONSTANT_NAMES = ("_s1", "_direction", "_s1_out", "_consts")
_CONSTANT_NAMES = (*_SAVED_CONSTANT_NAMES, "_gram", "_gram_pinv")


def _check_float_dtype(dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and (not dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"dtype must be a floating point dtype (float16, bfloat16, float32, float64), got {dtype}"
        )


def _check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class SRNCConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Stable Rank Normalization of its true convolution operator (SRN-C).

    The forward uses ``effective_weight() = alpha * K~``, where ``K~`` is the raw ``weight``
    divided by the spectral norm of the layer's operator on ``input_size`` maps (padding mode,
    stride, dilation and groups included) and, for ``beta < 1``, reweighted to lower its
    stable rank toward ``beta * min(dim_in, dim_out)``. ``weight`` stays the raw trainable
    parameter.

    Args (beyond ``nn.Conv2d``'s):
        alpha: target spectral norm of the operator (> 0).
        beta: target stable rank as a fraction of the operator's full rank, in (0, 1];
            ``beta = 1`` is spectral normalization of the true operator.
        input_size: int or (h, w), the feature-map size the operator acts on; None takes it
            from the first input seen. Inputs of other sizes are accepted by forward (the
            normalized weight does not depend on them) but the guarantee is for this size.
        n_power_iterations: power-iteration steps per optimizer step (>= 1).
        eps: added to the spectral norm estimate before dividing (> 0).
        variant: ``"projected"`` (default: sigma_1 = alpha for every beta) or ``"paper"``
            (Algorithm 2 literally; see docs/variants.md).
        backend: ``None`` (the global choice, see ``srnc_ext.set_backend``), ``"auto"``,
            ``"cuda"``, ``"cpu"``, ``"triton"`` or ``"reference"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        input_size=None,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        variant: str = "projected",
        backend: Optional[str] = None,
    ) -> None:
        _check_float_dtype(dtype)
        alpha = _check_positive_finite("alpha", alpha)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < beta <= 1.0):
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
        eps = _check_positive_finite("eps", eps)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        backends.check_backend(backend)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.alpha = alpha
        self.beta = float(beta)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.variant = variant
        self._backend = backend
        self._geometry: Optional[ConvGeometry] = None
        self._refreshed_at: Optional[Tuple[int, int]] = None
        self._state_version = 0  # bumped whenever vectors/constants change: invalidates _weight_cache
        self._weight_cache = None
        for name in self._vector_names:
            self.register_buffer(name, None)
        for name in _CONSTANT_NAMES:
            self.register_buffer(name, None, persistent=name in _SAVED_CONSTANT_NAMES)
        self._resolve_ops()
        _refresh.register(self)
        if input_size is not None:
            self.set_input_size(input_size)

    # ------------------------------------------------------------------ configuration
    @property
    def _vector_names(self) -> Tuple[str, ...]:
        return _VECTOR_NAMES if self.variant == "projected" else _VECTOR_NAMES[:2]

    @property
    def input_size(self) -> Optional[Tuple[int, int]]:
        """The (h, w) the operator acts on, or None until known."""
        return None if self._geometry is None else self._geometry.input_size

    @property
    def geometry(self) -> Optional[ConvGeometry]:
        """The layer's operator geometry (None until ``input_size`` is known)."""
        return self._geometry

    @property
    def materialized(self) -> bool:
        return self._geometry is not None and self.u is not None

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self._backend = backends.check_backend(name)
        self._resolve_ops()

    @property
    def variant_code(self) -> int:
        return variant_code(self.variant, self.beta)

    def op_scalars(self) -> Tuple[float, float, float, float, int]:
        """``(alpha, beta * full_rank, output positions, eps, variant code)`` for the reweight op."""
        h, w = self._geometry.output_size
        return (self.alpha, self.beta * self._geometry.full_rank, float(h * w), self.eps, self.variant_code)

    def signature(self) -> tuple:
        """Layers with equal signatures are refreshed together as one grouped convolution."""
        return (self._geometry, self.variant_code, self.beta, self.eps, self._vector_dtype(),
                self.weight.device, id(self._op_impl))

    def _resolve_ops(self) -> None:
        self._op_impl = backends.ops(self._backend, self.weight.device)

    def _vector_dtype(self) -> torch.dtype:
        return compute_dtype(self.weight.dtype)

    def _weight_key(self) -> Tuple[int, int]:
        return (id(self.weight), self.weight._version)

    def is_stale(self) -> bool:
        """True when the weight changed since the last refresh."""
        return self._refreshed_at != self._weight_key()

    # ------------------------------------------------------------------ state
    def set_input_size(self, input_size) -> None:
        """Set the feature-map size (int or (h, w)) and start a fresh warmed-up power iteration."""
        geometry = ConvGeometry.from_conv(self, pair(input_size, "input_size"))  # validates first
        self._geometry = geometry
        self._resolve_ops()  # the weight may have moved since construction (convert swaps it in)
        self.reset_power_iteration()

    def _allocate(self, geometry: ConvGeometry) -> None:
        """Buffers for ``geometry``: random unit vectors and derived constants (zeros)."""
        dtype, device = self._vector_dtype(), self.weight.device
        for name in self._vector_names:
            shape = geometry.output_shape() if name.startswith("u") else geometry.input_shape()
            x = torch.randn(shape, dtype=dtype, device=device)
            x = x / torch.linalg.vector_norm(x).clamp_min(self.eps)
            self._buffers[name] = x.contiguous(memory_format=_refresh.vector_format(device))
        taps = geometry.kernel_size[0] * geometry.kernel_size[1]
        slices = geometry.out_channels * geometry.in_channels // geometry.groups
        for name in ("_s1", "_direction", "_s1_out"):
            self._buffers[name] = torch.zeros(1, slices, taps, dtype=dtype, device=device)
        self._buffers["_consts"] = torch.zeros(1, 2, dtype=dtype, device=device)
        self._buffers["_gram"] = geometry.kernel_gram(dtype, device)
        self._buffers["_gram_pinv"] = geometry.kernel_gram_pinv(dtype, device)

    @torch.no_grad()
    def reset_power_iteration(self, n_iterations: int = WARMUP_ITERATIONS) -> None:
        """Draw new random vectors and run ``n_iterations`` power iterations on the current weight.

        Call it after replacing the weight wholesale (``convert`` does). Requires ``input_size``.
        """
        if self._geometry is None:
            raise RuntimeError("input_size is unknown: pass input_size= or run a forward first")
        self._allocate(self._geometry)
        _refresh.refresh_layers([self], n_iterations)  # counts as this weight's refresh

    def refresh(self, n_iterations: Optional[int] = None) -> None:
        """Advance the power iteration(s) by ``n_iterations`` (default ``n_power_iterations``)
        steps on the current weight.

        Runs automatically once per optimizer step in training mode; call it to control it,
        e.g. ``refresh(200)`` before deployment to remove the tracking lag of training.
        ``srnc_ext.refresh(model)`` refreshes all layers of a model in batched groups.
        Raises ``ValueError`` (vectors untouched) if the weight has NaN or inf entries.
        """
        if not self.materialized:
            raise RuntimeError("input_size is unknown: pass input_size= or run a forward first")
        if n_iterations is not None and (isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1):
            raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")
        _refresh.refresh_layers([self], n_iterations)

    def _commit_pairs(self, vectors, s1, direction, s1_out, consts) -> list:
        """``(buffer, new value)`` for each buffer a refresh's results go to."""
        buffers = self._buffers  # not Module.__getattr__: this runs for every layer on every step
        pairs = [(buffers[name], value) for name, value in vectors.items()]
        return pairs + [(buffers["_s1"], s1), (buffers["_direction"], direction), (buffers["_s1_out"], s1_out),
                        (buffers["_consts"], consts)]

    def _committed(self, mark_refreshed: bool) -> None:
        """Record that the buffers of ``_commit_pairs`` now hold a refresh's results."""
        self._state_version += 1
        if mark_refreshed:
            self._refreshed_at = self._weight_key()

    def _commit(self, vectors, s1, direction, s1_out, consts, mark_refreshed: bool) -> None:
        """Store a refresh's results."""
        for buffer, value in self._commit_pairs(vectors, s1, direction, s1_out, consts):
            buffer.copy_(value)
        self._committed(mark_refreshed)

    @torch.no_grad()
    def _recompute_constants(self) -> None:
        """The rank-one kernels and op constants from the stored vectors, without iterating."""
        geometry, code = self._geometry, self.variant_code
        taps = geometry.kernel_size[0] * geometry.kernel_size[1]
        with no_autocast(self.weight):
            s1 = geometry.kernel_grad(self.v, self.u).reshape(1, -1, taps)
            s1_out = s1
            if code == VARIANT_PROJECTED:
                s1_out = geometry.kernel_grad(self.v_out, self.u_out).reshape(1, -1, taps)
            direction, consts = prepare_constants(s1, s1_out, self._gram_pinv, code)
        self._commit({}, s1, direction, s1_out, consts, mark_refreshed=False)

    # ------------------------------------------------------------------ forward
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``alpha * K~`` (differentiable w.r.t. ``weight``).

        In eager mode it is computed once per weight version and refresh and shared by every
        forward until then (a T-frame unroll runs the reweight op once, and its backward once
        per ``backward()`` call); under ``torch.compile`` the op is traced into the graph.
        """
        if not self.materialized:
            raise RuntimeError("input_size is unknown: pass input_size= or run a forward first")
        if torch.compiler.is_compiling():
            return self._reweight()
        weight = self.weight
        key = (self._weight_key(), self._state_version, torch.is_grad_enabled(), weight.requires_grad,
               self.alpha, self.beta, self.eps, id(self._op_impl))
        if self._weight_cache is None or self._weight_cache[0] != key:
            if torch.is_grad_enabled() and weight.requires_grad:
                out = _SharedReweight.apply(weight, self)
            else:
                with torch.no_grad():
                    out = self._reweight()
            self._weight_cache = (key, out)
        return self._weight_cache[1]

    def _op_inputs(self) -> tuple:
        b = self._buffers  # not Module.__getattr__: this runs on every step
        return (b["_s1"], b["_direction"], b["_s1_out"], b["_gram"], b["_consts"])

    def _reweight(self) -> torch.Tensor:
        """The reweight op with its own autograd (traceable by ``torch.compile``)."""
        weight = self.weight
        with no_autocast(weight):
            kernel = weight.to(self._vector_dtype()).reshape(self._s1.shape)
            out, _ = self._op_impl.reweight_forward(kernel, *self._op_inputs(), *self.op_scalars())
        return out.reshape(weight.shape).to(weight.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in (3, 4):
            raise ValueError(f"input must be (N, C, H, W) or (C, H, W), got shape {tuple(input.shape)}")
        if input.shape[-3] != self.in_channels:
            raise ValueError(
                f"input has {input.shape[-3]} channels but the layer has in_channels={self.in_channels}"
            )
        if not self.materialized:
            self.set_input_size(self.input_size or tuple(input.shape[-2:]))
        if self.training and not torch.compiler.is_compiling() and self.is_stale():
            _refresh.refresh_layers([self])
        return self._conv_forward(input, self.effective_weight(), self.bias)

    # ------------------------------------------------------------------ nn.Module plumbing
    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, variant={self.variant!r}, "
            f"input_size={self.input_size}, n_power_iterations={self.n_power_iterations}"
        )

    def get_extra_state(self):
        # "fresh": the vectors were refreshed for exactly the saved weight, so a resumed run does
        # not refresh again before its first step (resume equals an uninterrupted run)
        return {"input_size": self.input_size, "variant": self.variant,
                "fresh": bool(self.materialized and not self.is_stale())}

    def set_extra_state(self, state) -> None:
        size = state.get("input_size")
        self._geometry = None if size is None else ConvGeometry.from_conv(self, tuple(size))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        geometry = self._geometry
        if isinstance(extra, dict):
            if extra.get("variant") != self.variant:
                error_msgs.append(
                    f"{prefix}: checkpoint has variant={extra.get('variant')!r}, layer has variant={self.variant!r}"
                )
                return
            size = extra.get("input_size")
            try:
                geometry = None if size is None else ConvGeometry.from_conv(self, tuple(size))
            except (TypeError, ValueError) as err:
                error_msgs.append(f"{prefix}_extra_state: {err}")
                return
            for name in self._vector_names:
                incoming = state_dict.get(prefix + name)
                if incoming is None or geometry is None:
                    continue
                expected = geometry.output_shape() if name.startswith("u") else geometry.input_shape()
                if tuple(incoming.shape) != expected:
                    error_msgs.append(f"{prefix}{name}: shape {tuple(incoming.shape)} does not match {expected}")
                    return
            if geometry is not None and (self._geometry != geometry or self.u is None):
                self._allocate(geometry)  # buffers of the incoming shapes, so copy_ works
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        fresh = isinstance(extra, dict) and extra.get("fresh") is True and (prefix + "weight") in state_dict
        self._refreshed_at = self._weight_key() if fresh and self.materialized else None
        if self.materialized and any(prefix + name not in state_dict for name in _SAVED_CONSTANT_NAMES):
            self._recompute_constants()  # a state_dict without them (vectors only)

    def _apply(self, fn, recurse=True):
        # Keep vectors and constants in the compute dtype (float32 for half/bfloat16 weights).
        saved = {name: self._buffers.get(name) for name in (*self._vector_names, *_CONSTANT_NAMES)}
        super()._apply(fn, recurse)
        target = self._vector_dtype()
        for name, old in saved.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != target:
                self._buffers[name] = new = old.to(device=new.device, dtype=target)
            if name in self._vector_names and new is not None:  # the memory format the refresh uses there
                self._buffers[name] = new.contiguous(memory_format=_refresh.vector_format(new.device))
        self._resolve_ops()
        self._weight_cache = None
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_refreshed_at"] = self.materialized and not self.is_stale()  # a copy is as fresh as its original
        state.pop("_op_impl", None)  # a module object: resolved again on load
        state["_weight_cache"] = None  # holds an autograd graph
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._refreshed_at = self._weight_key() if state.get("_refreshed_at") is True else None
        self._resolve_ops()
        _refresh.register(self)


class _SharedReweight(torch.autograd.Function):
    """The effective weight as one autograd node that every forward of a step can share.

    Its inputs for the backward are kept on ``ctx`` (not ``save_for_backward``), so the node
    survives one ``backward()`` and serves the next micro-batch of gradient accumulation; the
    layer drops it (``_weight_cache``) as soon as the weight or the vectors change.
    """

    @staticmethod
    def forward(ctx, weight, layer):
        inputs, scalars = layer._op_inputs(), layer.op_scalars()
        with torch.no_grad(), no_autocast(weight):
            kernel = weight.detach().to(layer._vector_dtype()).reshape(inputs[0].shape)
            out, stats = layer._op_impl.reweight_forward(kernel, *inputs, *scalars)
        ctx.saved = (layer._op_impl, kernel, inputs, stats, scalars, weight.shape, weight.dtype)
        return out.reshape(weight.shape).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        ops, kernel, inputs, stats, scalars, shape, dtype = ctx.saved
        with torch.no_grad(), no_autocast(grad):
            grad_kernel = ops.reweight_backward(grad.to(kernel.dtype).reshape(kernel.shape), kernel, *inputs, stats, *scalars)
        return grad_kernel.reshape(shape).to(dtype), None
