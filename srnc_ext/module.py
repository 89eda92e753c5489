"""``SRNCConv2d``: a drop-in ``nn.Conv2d`` whose true operator has spectral norm ``alpha``.

Lifecycle of the normalization state:

* The power-iteration vectors are buffers (``u``, ``v``; the projected variant adds
  ``u_out``, ``v_out`` for the renormalization) shaped by ``input_size``. They are created
  ("materialized") when ``input_size`` is known: at construction if it is given, else from the
  first input seen. Materializing draws random unit vectors and runs ``WARMUP_ITERATIONS``
  power iterations on the current weight, as ``torch.nn.utils.spectral_norm`` does.
* Refresh (``refresh()``): ``n_power_iterations`` steps of each power iteration plus one
  weight-gradient convolution per iteration, without gradient. In training mode it runs
  automatically on the first forward after the weight changed (its version counter moved: an
  optimizer step, ``load_state_dict``, any in-place edit), so a T-frame recurrent unroll or
  several gradient-accumulation micro-batches advance the iteration once per optimizer step.
* Every forward recomputes the effective weight from the raw weight and the refreshed
  rank-one kernels: the differentiable part of SRN-C is elementwise work on the kernel, so
  each forward builds its own small graph and gradients accumulate exactly as if the
  reference were applied once with the same vectors.
* Eval mode never refreshes: the output equals the last training-mode output for the same
  weights, and a fresh layer that loads the state_dict gives the identical output.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import reference
from .operator import ConvGeometry, pair

WARMUP_ITERATIONS = 15
_VECTOR_NAMES = ("u", "v", "u_out", "v_out")


def _check_float_dtype(dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and (not dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"dtype must be a floating point dtype (float16, bfloat16, float32, float64), got {dtype}"
        )


def _check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the power iteration and reweighting: float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    ) -> None:
        _check_float_dtype(dtype)
        alpha = _check_positive_finite("alpha", alpha)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < beta <= 1.0):
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
        eps = _check_positive_finite("eps", eps)
        if variant not in reference.VARIANTS:
            raise ValueError(f"variant must be one of {reference.VARIANTS}, got {variant!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.alpha = alpha
        self.beta = float(beta)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.variant = variant
        self._geometry: Optional[ConvGeometry] = None
        for name in self._vector_names:
            self.register_buffer(name, None)
        self._reset_caches()
        if input_size is not None:
            self.set_input_size(input_size)

    # ------------------------------------------------------------------ state
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

    def set_input_size(self, input_size) -> None:
        """Set the feature-map size (int or (h, w)) and start a fresh warmed-up power iteration."""
        geometry = ConvGeometry.from_conv(self, pair(input_size, "input_size"))  # validates first
        self._geometry = geometry
        self.reset_power_iteration()

    def _reset_caches(self) -> None:
        self._rank_one: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._refreshed_at: Optional[Tuple[int, int]] = None
        self._gram_cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _vector_dtype(self) -> torch.dtype:
        return compute_dtype(self.weight.dtype)

    def _weight_key(self) -> Tuple[int, int]:
        return (id(self.weight), self.weight._version)

    def _random_unit(self, shape) -> torch.Tensor:
        x = torch.randn(shape, dtype=self._vector_dtype(), device=self.weight.device)
        return x / torch.linalg.vector_norm(x).clamp_min(self.eps)

    @torch.no_grad()
    def reset_power_iteration(self, n_iterations: int = WARMUP_ITERATIONS) -> None:
        """Draw new random vectors and run ``n_iterations`` power iterations on the current weight.

        Call it after replacing the weight wholesale (``convert`` does). Requires ``input_size``.
        """
        if self._geometry is None:
            raise RuntimeError("input_size is unknown: pass input_size= or run a forward first")
        geometry = self._geometry
        vectors = {}
        for name in self._vector_names:
            shape = geometry.output_shape() if name.startswith("u") else geometry.input_shape()
            vectors[name] = self._random_unit(shape)
        self._iterate(vectors, n_iterations)

    @torch.no_grad()
    def refresh(self, n_iterations: Optional[int] = None) -> None:
        """Advance the power iteration(s) by ``n_iterations`` (default ``n_power_iterations``)
        steps on the current weight.

        Runs automatically once per optimizer step in training mode; call it to control it,
        e.g. ``refresh(200)`` before deployment to remove the tracking lag of training.
        Raises ``ValueError`` (vectors untouched) if the weight has NaN or inf entries.
        """
        if not self.materialized:
            raise RuntimeError("input_size is unknown: pass input_size= or run a forward first")
        n_iterations = self.n_power_iterations if n_iterations is None else n_iterations
        if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
            raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")
        self._iterate({name: getattr(self, name) for name in self._vector_names}, n_iterations)
        self._refreshed_at = self._weight_key()

    @torch.compiler.disable
    def _iterate(self, vectors: Dict[str, torch.Tensor], n_iterations: int) -> None:
        """Run the iteration(s) from ``vectors`` and commit buffers and caches only on success."""
        weight = self.weight
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight contains NaN or inf; the power-iteration vectors were not updated")
        geometry, eps = self._geometry, self.eps
        with _no_autocast(weight):
            kernel = weight.detach().to(self._vector_dtype())
            u, v = reference.power_iteration(kernel, vectors["u"], vectors["v"], geometry, n_iterations, eps)
            s1 = reference.rank_one_kernel(u, v, geometry)
            new = {"u": u, "v": v}
            s1_out = None
            if self.variant == "projected":
                u_out, v_out = vectors["u_out"], vectors["v_out"]
                if reference.needs_second_iteration(self.variant, self.beta):
                    reweighted = self._reweighted(kernel, s1)
                    u_out, v_out = reference.power_iteration(reweighted, u_out, v_out, geometry, n_iterations, eps)
                    s1_out = reference.rank_one_kernel(u_out, v_out, geometry)
                new.update(u_out=u_out, v_out=v_out)
        for name, value in new.items():
            if getattr(self, name) is None or getattr(self, name).shape != value.shape:
                self._buffers[name] = value.clone()
            else:
                getattr(self, name).copy_(value)
        self._rank_one = (s1, s1_out)

    @torch.compiler.disable
    def _rank_one_kernels(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(s1, s1_out)`` for the stored vectors (cached; recomputed after load or ``.to()``)."""
        if self._rank_one is None:
            geometry = self._geometry
            with torch.no_grad(), _no_autocast(self.weight):
                s1 = reference.rank_one_kernel(self.u, self.v, geometry)
                s1_out = None
                if reference.needs_second_iteration(self.variant, self.beta):
                    s1_out = reference.rank_one_kernel(self.u_out, self.v_out, geometry)
            self._rank_one = (s1, s1_out)
        return self._rank_one

    @torch.compiler.disable
    def _grams(self, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (self._geometry, dtype, device)
        if key not in self._gram_cache:
            self._gram_cache = {
                key: (self._geometry.kernel_gram(dtype, device), self._geometry.kernel_gram_pinv(dtype, device))
            }
        return self._gram_cache[key]

    def _reweighted(self, kernel: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        gram = gram_pinv = None
        if self.variant == "projected" and self.beta < 1.0:
            gram, gram_pinv = self._grams(kernel.dtype, kernel.device)
        return reference.reweighted_kernel(
            kernel, s1, self._geometry, beta=self.beta, eps=self.eps, variant=self.variant, gram=gram, gram_pinv=gram_pinv
        )

    # ------------------------------------------------------------------ forward
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``alpha * K~`` (differentiable w.r.t. ``weight``)."""
        if not self.materialized:
            raise RuntimeError("input_size is unknown: pass input_size= or run a forward first")
        s1, s1_out = self._rank_one_kernels()
        weight = self.weight
        with _no_autocast(weight):
            kernel = weight.to(self._vector_dtype())
            out = self._reweighted(kernel, s1)
            if s1_out is not None:
                out = reference.spectral_normalize(out, s1_out, self.eps)
            out = self.alpha * out
        return out.to(weight.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in (3, 4):
            raise ValueError(f"input must be (N, C, H, W) or (C, H, W), got shape {tuple(input.shape)}")
        if input.shape[-3] != self.in_channels:
            raise ValueError(
                f"input has {input.shape[-3]} channels but the layer has in_channels={self.in_channels}"
            )
        if not self.materialized:
            self.set_input_size(self.input_size or tuple(input.shape[-2:]))
        if self.training and self._refreshed_at != self._weight_key():
            self.refresh()
        return self._conv_forward(input, self.effective_weight(), self.bias)

    # ------------------------------------------------------------------ nn.Module plumbing
    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, variant={self.variant!r}, "
            f"input_size={self.input_size}, n_power_iterations={self.n_power_iterations}"
        )

    def get_extra_state(self):
        return {"input_size": self.input_size, "variant": self.variant}

    def set_extra_state(self, state) -> None:
        size = state.get("input_size")
        self._geometry = None if size is None else ConvGeometry.from_conv(self, tuple(size))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
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
            for name in self._vector_names:  # give the buffers the incoming shapes so copy_ works
                incoming = state_dict.get(prefix + name)
                if incoming is not None:
                    self._buffers[name] = torch.empty(
                        incoming.shape, dtype=self._vector_dtype(), device=self.weight.device
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._reset_caches()

    def _apply(self, fn, recurse=True):
        # Keep the vectors in the compute dtype (float32 for half/bfloat16 weights) across .half() etc.
        saved = {name: self._buffers.get(name) for name in self._vector_names}
        super()._apply(fn, recurse)
        target = self._vector_dtype()
        for name, old in saved.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != target:
                self._buffers[name] = old.to(device=new.device, dtype=target)
        self._rank_one = None
        self._gram_cache = {}
        return self


def _no_autocast(tensor: torch.Tensor):
    """Autocast off for ``tensor``'s device: the normalization runs in float32/float64."""
    if tensor.device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    return contextlib.nullcontext()
