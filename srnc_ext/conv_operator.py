"""The true linear operator of a 1-, 2- or 3-D convolution layer, and its exact adjoint.

A conv layer with kernel ``K`` of shape ``(C_out, C_in // groups, *k)`` acting on
``(C_in, *n)`` inputs (``n`` and ``k`` have one entry per spatial dimension) is the linear map
``W: R^(C_in*prod(n)) -> R^(C_out*prod(n'))``, padding mode, stride, dilation and groups
included. ``ConvGeometry`` describes that map (everything but the kernel) and applies it, its
adjoint and its kernel gradient, with one implementation for every dimensionality. Every
padding mode is written as an explicit pad followed by an unpadded convolution, exactly as
``nn.Conv2d`` does for its non-zero modes, so the adjoint is ``pad^T`` after ``conv^T``:

* ``conv^T`` is ``conv_transpose{1,2,3}d`` with the ``output_padding`` that restores the padded size;
* ``pad^T`` is a crop for zero padding, and for circular/reflect/replicate padding a
  scatter-add along the padding's index map (each padded pixel is a copy of one input pixel).

The other layer kinds are operators of this family: a transposed conv (``nn.ConvTranspose*d``)
is the adjoint of the conv with the same weight on the transposed layer's *output* size
(``ConvGeometry.for_transposed``: same singular values, vectors swapped), and ``nn.Linear`` is
the 1-D conv with a one-tap kernel on a one-pixel map (``ConvGeometry.for_linear``).

The kernel-to-operator map ``A: K -> W(K)`` is linear, and ``A^T A`` acts on each
``(out, in)`` kernel slice by one ``(T, T)`` spatial Gram matrix ``G`` over the ``T = prod(k)``
taps (``kernel_gram``): ``||W(K)||_F^2 = sum_{o,i} vec(K[o,i])^T G vec(K[o,i])``. For zero and
circular padding ``G`` is diagonal (circular: ``prod(n)*I`` at stride 1); for reflect and
replicate padding mirrored pixels make it dense.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
_PAD_MODE = {"zeros": "constant", "circular": "circular", "reflect": "reflect", "replicate": "replicate"}
SPATIAL_DIMS = (1, 2, 3)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}

IntPair = Tuple[int, int]
IntTuple = Tuple[int, ...]
SizeLike = Union[int, Sequence[int], torch.Size]


def ntuple(value, n: int, name: str) -> IntTuple:
    """``value`` as a tuple of ``n`` ints (an int is repeated); raises naming ``name`` otherwise."""
    what = "an int" if n == 1 else f"an int or {n} ints"
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, int):
        return (value,) * n
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {value!r}") from None
    if len(items) != n or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    return items


def pair(value, name: str) -> IntPair:
    """``value`` as an (h, w) pair of ints; raises naming ``name`` otherwise."""
    return ntuple(value, 2, name)  # type: ignore[return-value]


def resolve_padding(padding, kernel_size: IntTuple, dilation: IntTuple, stride: IntTuple) -> IntTuple:
    """Padding in ``F.pad`` order (last dimension first: ``(left, right, top, bottom, front, back)``
    for 3-D), the way ``nn.Conv*d`` pads.

    ``padding`` is an int, one int per dimension, ``"valid"`` or ``"same"`` (stride 1 only; for
    even kernels the extra pixel goes to the end, as in ``nn.Conv2d``).
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * (2 * n)
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' requires stride 1, got stride={stride}")
            pads = []
            for k, d in zip(reversed(kernel_size), reversed(dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        raise ValueError(f"padding must be an int, {n} ints, 'same' or 'valid', got {padding!r}")
    per_dim = ntuple(padding, n, "padding")
    if min(per_dim) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return tuple(p for p in reversed(per_dim) for _ in range(2))


def transposed_output_size(input_size: IntTuple, kernel_size: IntTuple, stride: IntTuple, padding: IntTuple,
                           output_padding: IntTuple, dilation: IntTuple) -> IntTuple:
    """The output size of ``nn.ConvTranspose*d`` on ``input_size`` (its documented formula)."""
    return tuple((i - 1) * s - 2 * p + d * (k - 1) + op + 1
                 for i, k, s, p, op, d in zip(input_size, kernel_size, stride, padding, output_padding, dilation))


@dataclass(frozen=True)
class ConvGeometry:
    """Everything that defines a conv layer's linear operator except its kernel.

    ``pad`` is in ``F.pad`` order (``(left, right, top, bottom)`` in 2-D); ``input_size`` has one
    entry per spatial dimension (``(H, W)`` in 2-D).
    """

    in_channels: int
    out_channels: int
    kernel_size: IntTuple
    stride: IntTuple
    dilation: IntTuple
    groups: int
    pad: IntTuple
    padding_mode: str
    input_size: IntTuple

    def __post_init__(self) -> None:
        # (positions, dim_in, dim_out), computed once (in __dict__, not a field: equality and hash
        # stay the fields'). The reweight op's scalars read them on every forward, and under
        # torch.compile Dynamo traced the chain of properties behind them on every layer call:
        # about a fifth of its tracing time on a 12-layer, 7-frame unroll (8.6 s -> 6.7 s).
        positions = math.prod(self.output_size)
        object.__setattr__(self, "_counts", (positions, self.in_channels * math.prod(self.input_size),
                                             self.out_channels * positions))

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        weight_shape,
        input_size: SizeLike,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> "ConvGeometry":
        """Validated geometry for a kernel of ``weight_shape`` ``(C_out, C_in/groups, *k)``, 1 to 3
        spatial dimensions."""
        n = len(weight_shape) - 2
        if n not in SPATIAL_DIMS:
            raise ValueError(f"weight must have 3, 4 or 5 dims (C_out, C_in/groups, *kernel_size), got shape "
                             f"{tuple(weight_shape)}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        c_out, c_in_g, *kernel = (int(s) for s in weight_shape)
        if c_out % groups:
            raise ValueError(f"out_channels={c_out} is not divisible by groups={groups}")
        if min(kernel) < 1 or c_out < 1 or c_in_g < 1:
            raise ValueError(f"weight must have no empty dimension, got shape {tuple(weight_shape)}")
        stride, dilation = ntuple(stride, n, "stride"), ntuple(dilation, n, "dilation")
        if min(stride) < 1 or min(dilation) < 1:
            raise ValueError(f"stride and dilation must be >= 1, got stride={stride}, dilation={dilation}")
        size = tuple(input_size) if isinstance(input_size, torch.Size) else input_size
        geometry = cls(
            in_channels=c_in_g * groups,
            out_channels=c_out,
            kernel_size=tuple(kernel),
            stride=stride,
            dilation=dilation,
            groups=groups,
            pad=resolve_padding(padding, tuple(kernel), dilation, stride),
            padding_mode=padding_mode,
            input_size=ntuple(size, n, "input_size"),
        )
        geometry._validate_size()
        return geometry

    @classmethod
    def from_conv(cls, conv, input_size: SizeLike) -> "ConvGeometry":
        """The geometry of an ``nn.Conv1d/2d/3d`` (or subclass) acting on ``input_size`` inputs."""
        return cls.create(
            conv.weight.shape,
            input_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
        )

    @classmethod
    def for_transposed(cls, weight_shape, input_size: SizeLike, *, stride=1, padding=0, output_padding=0,
                       dilation=1, groups: int = 1) -> "ConvGeometry":
        """The conv whose adjoint is ``nn.ConvTranspose*d`` (weight ``(C_in, C_out/groups, *k)``) on
        ``input_size`` inputs: the conv with the same weight acting on the transposed layer's output
        size. Its output size is ``input_size``; the transposed layer's operator is its adjoint, with
        the same singular values.

        ``output_padding`` must be below the stride in every dimension (PyTorch also allows it below
        the dilation; then the transposed layer is not the adjoint of one conv and is refused here).
        """
        n = len(weight_shape) - 2
        if n not in SPATIAL_DIMS:
            raise ValueError(f"weight must have 3, 4 or 5 dims (C_in, C_out/groups, *kernel_size), got shape "
                             f"{tuple(weight_shape)}")
        kernel = tuple(int(k) for k in weight_shape[2:])
        stride, dilation = ntuple(stride, n, "stride"), ntuple(dilation, n, "dilation")
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int or {n} ints for a transposed conv, got {padding!r}")
        padding = ntuple(padding, n, "padding")
        output_padding = ntuple(output_padding, n, "output_padding")
        if min(padding) < 0 or min(output_padding) < 0:
            raise ValueError(f"padding and output_padding must be non-negative, got padding={padding}, "
                             f"output_padding={output_padding}")
        if any(op >= s for op, s in zip(output_padding, stride)):
            raise ValueError(
                f"output_padding={output_padding} must be smaller than stride={stride} in every dimension for "
                "SRN-C: with output_padding >= stride (PyTorch allows it below the dilation) the transposed "
                "conv is not the adjoint of a conv, so its operator is not the one normalized here")
        size = ntuple(tuple(input_size) if isinstance(input_size, torch.Size) else input_size, n, "input_size")
        if min(size) < 1:
            raise ValueError(f"input_size must be positive, got {size}")
        out = transposed_output_size(size, kernel, stride, padding, output_padding, dilation)
        if min(out) < 1:
            raise ValueError(f"input_size={size} gives a non-positive output size {out} for this transposed conv")
        geometry = cls.create(weight_shape, out, stride=stride, padding=padding, dilation=dilation, groups=groups)
        if geometry.output_size != size:  # cannot happen for output_padding < stride; a guard for the algebra
            raise ValueError(f"internal: the conv of transposed size {out} maps to {geometry.output_size}, not {size}")
        return geometry

    @classmethod
    def for_linear(cls, in_features: int, out_features: int) -> "ConvGeometry":
        """The operator of ``nn.Linear(in_features, out_features)``: the weight matrix, written as a
        1-D conv with a one-tap kernel on a one-pixel map (weight ``(out, in, 1)``)."""
        return cls.create((out_features, in_features, 1), (1,))

    @property
    def min_input_size(self) -> IntTuple:
        """The smallest input size at which ``nn.Conv*d`` runs this layer (and so the operator exists).

        PyTorch's limits: the padded map must hold the dilated kernel (conv, every mode);
        reflect padding must be smaller than the input on each side, circular padding at most
        the input (F.pad: it wraps around once). Zero and replicate padding accept any map that
        the kernel fits once padded, maps smaller than the kernel included.
        """
        sizes = []
        for i, (k, d) in enumerate(zip(self.kernel_size, self.dilation)):
            low, high = self._pad_of(i)
            smallest = max(1, d * (k - 1) + 1 - low - high)
            if self.padding_mode == "reflect":
                smallest = max(smallest, max(low, high) + 1)
            elif self.padding_mode == "circular":
                smallest = max(smallest, max(low, high))
            sizes.append(smallest)
        return tuple(sizes)

    def _pad_of(self, dim: int) -> IntPair:
        """``(before, after)`` padding of spatial dimension ``dim`` (0 = the first, e.g. H in 2-D)."""
        j = 2 * (self.ndim - 1 - dim)
        return self.pad[j], self.pad[j + 1]

    def _validate_size(self) -> None:
        """Refuse exactly the sizes at which ``nn.Conv*d`` itself fails, naming PyTorch's limit."""
        if all(s >= m for s, m in zip(self.input_size, self.min_input_size)):
            return
        kernel = tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))
        limits = [f"the padded map must hold the dilated kernel {kernel} (conv{self.ndim}d)"]
        if self.padding_mode == "reflect":
            limits.append("reflect padding must be smaller than the input on each side (F.pad)")
        elif self.padding_mode == "circular":
            limits.append("circular padding must not exceed the input on any side (F.pad: it wraps around once)")
        raise ValueError(
            f"input_size={self.input_size} is too small for padding_mode={self.padding_mode!r} with padding "
            f"(F.pad order){self.pad}: PyTorch requires that {' and '.join(limits)}; the smallest "
            f"input_size this layer accepts is {self.min_input_size}")

    # ----------------------------------------------------------------- sizes
    @property
    def ndim(self) -> int:
        """The number of spatial dimensions (1, 2 or 3)."""
        return len(self.kernel_size)

    @property
    def padded_size(self) -> IntTuple:
        return tuple(s + sum(self._pad_of(i)) for i, s in enumerate(self.input_size))

    @property
    def output_size(self) -> IntTuple:
        return tuple((p - d * (k - 1) - 1) // s + 1
                     for p, k, s, d in zip(self.padded_size, self.kernel_size, self.stride, self.dilation))

    @property
    def taps(self) -> int:
        """``T = prod(kernel_size)``: the entries of one kernel slice."""
        return math.prod(self.kernel_size)

    @property
    def positions(self) -> int:
        """``prod(output_size)``: the output positions."""
        return self._counts[0]

    @property
    def dim_in(self) -> int:
        """Dimension of the operator's domain, ``C_in * prod(input_size)``."""
        return self._counts[1]

    @property
    def dim_out(self) -> int:
        """Dimension of the operator's codomain, ``C_out * prod(output_size)``."""
        return self._counts[2]

    @property
    def full_rank(self) -> int:
        """``min(dim_in, dim_out)``: the largest rank an operator of this shape can have."""
        return min(self._counts[1], self._counts[2])

    @property
    def weight_shape(self) -> IntTuple:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def is_circulant(self) -> bool:
        """True when the operator is block-circulant: circular padding, stride 1, same size."""
        return (self.padding_mode == "circular" and all(s == 1 for s in self.stride)
                and self.output_size == self.input_size)

    def input_shape(self, batch: int = 1) -> IntTuple:
        return (batch, self.in_channels, *self.input_size)

    def output_shape(self, batch: int = 1) -> IntTuple:
        return (batch, self.out_channels, *self.output_size)

    # ----------------------------------------------------------------- the operator
    @property
    def _conv_padding(self) -> Optional[IntTuple]:
        """Symmetric zero padding that the convolution itself can apply (saves a padded copy)."""
        if self.padding_mode != "zeros":
            return None
        pads = [self._pad_of(i) for i in range(self.ndim)]
        if any(low != high for low, high in pads):
            return None
        return tuple(low for low, _ in pads)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if not any(self.pad):
            return x
        return F.pad(x, self.pad, mode=_PAD_MODE[self.padding_mode])

    def _unpad_adjoint(self, z: torch.Tensor) -> torch.Tensor:
        """``pad^T``: ``(B, C, *padded) -> (B, C, *input_size)``."""
        n = self.ndim
        if self.padding_mode == "zeros" or not any(self.pad):
            crop = tuple(slice(self._pad_of(i)[0], self._pad_of(i)[0] + s) for i, s in enumerate(self.input_size))
            return z[(Ellipsis, *crop)]
        index = self.pad_index(z.device)
        out = z.new_zeros(*z.shape[:-n], math.prod(self.input_size))
        return out.index_add_(-1, index, z.flatten(-n)).unflatten(-1, self.input_size)

    def apply(self, kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``W x``: ``x (B, C_in, *input_size) -> (B, C_out, *output_size)``, no bias."""
        conv = _CONV[self.ndim]
        if self._conv_padding is not None:
            return conv(x, kernel, None, self.stride, self._conv_padding, self.dilation, self.groups)
        return conv(self._pad(x), kernel, None, self.stride, 0, self.dilation, self.groups)

    def adjoint(self, kernel: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``W^T y``: ``y (B, C_out, *output_size) -> (B, C_in, *input_size)``; ``<W x, y> = <x, W^T y>``
        exactly."""
        n = self.ndim
        same = self._conv_padding
        if all(s == 1 for s in self.stride) and not self._transpose_is_faster(y):
            # conv^T at stride 1 is a full-padded conv with the flipped, in/out-swapped kernel:
            # for NCHW inputs oneDNN runs it faster than a grouped conv_transpose2d (benchmarks/,
            # 12-layer refresh: 8 ms against 18 ms when this was written).
            g = self.groups
            c_out, c_in_g = kernel.shape[:2]
            swapped = (kernel.reshape(g, c_out // g, c_in_g, *self.kernel_size).transpose(1, 2)
                       .reshape(g * c_in_g, c_out // g, *self.kernel_size).flip(tuple(range(-n, 0))))
            full = tuple(d * (k - 1) for k, d in zip(self.kernel_size, self.dilation))
            if same is not None and all(p <= f for p, f in zip(same, full)):  # pad and crop in one conv
                padding = tuple(f - p for f, p in zip(full, same))
                return _CONV[n](y, swapped, None, 1, padding, self.dilation, g)
            z = _CONV[n](F.pad(y, tuple(f for f in reversed(full) for _ in range(2))), swapped, None, 1, 0,
                         self.dilation, g)
        else:
            output_padding = tuple(
                p - ((o - 1) * s + d * (k - 1) + 1)
                for p, o, s, d, k in zip(self.padded_size, self.output_size, self.stride, self.dilation,
                                         self.kernel_size))
            if same is not None:  # conv^T and the crop pad^T in one call
                return _CONV_TRANSPOSE[n](y, kernel, None, self.stride, same, output_padding, self.groups,
                                          self.dilation)
            z = _CONV_TRANSPOSE[n](y, kernel, None, self.stride, 0, output_padding, self.groups, self.dilation)
        return self._unpad_adjoint(z)

    def _transpose_is_faster(self, y: torch.Tensor) -> bool:
        """Whether ``conv_transpose2d`` beats the flipped-kernel conv for this adjoint.

        For channels-last inputs oneDNN's grouped transposed conv is the faster one (2 threads,
        32x32, 10 groups of 32 channels: 1.04 ms against 1.79 ms), except with few output
        channels per group (32 -> 3: 0.36 ms against 0.05 ms).
        """
        return is_channels_last(y) and self.out_channels // self.groups >= 8

    def kernel_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``grad_K <y, W(K) x>`` summed over the batch: ``(C_out, C_in/groups, *kernel_size)``.

        With unit vectors ``x = v``, ``y = u`` this is the paper's ``S1`` (Algorithm 2, step 5),
        and ``<K, S1> = <u, W(K) v>`` exactly, by linearity.
        """
        weight_grad = _CONV_WEIGHT[self.ndim]
        if self._conv_padding is not None:
            return weight_grad(x, self.weight_shape, y, self.stride, self._conv_padding, self.dilation, self.groups)
        return weight_grad(self._pad(x), self.weight_shape, y, self.stride, 0, self.dilation, self.groups)

    # ----------------------------------------------------------------- index maps and Gram
    def pad_index(self, device=None) -> torch.Tensor:
        """For each pixel of the padded input, the flat index of the input pixel it copies.

        ``(prod(padded_size),)`` int64, ``-1`` where zero padding supplies the value.
        """
        return _pad_index(self).to(device)

    def kernel_gram(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """``G`` with ``G[a, b] = <W(E_a), W(E_b)>_F`` for single-channel unit kernels ``E_a``.

        ``(T, T)``; ``||W(K)||_F^2 = sum_{o,i} vec(K[o,i])^T G vec(K[o,i])``.
        """
        return _kernel_gram(self).to(dtype=dtype, device=device)

    def kernel_gram_pinv(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """Moore-Penrose pseudo-inverse of ``kernel_gram`` (kernel taps that never touch the input
        span its null space)."""
        return _kernel_gram_pinv(self).to(dtype=dtype, device=device)

    def frobenius_sq(self, kernel: torch.Tensor) -> torch.Tensor:
        """``||W(K)||_F^2`` exactly, from the kernel (no convolution)."""
        return gram_inner(kernel, kernel, self.kernel_gram(kernel.dtype, kernel.device))


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` (4-D) lies channels-last in memory and not also contiguous (C, H or W of 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def gram_inner(a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``<W(a), W(b)>_F = sum_{o,i} vec(a[o,i])^T G vec(b[o,i])`` for kernels ``a, b (C_out, C_in/g, *k)``."""
    return ((a.flatten(2) @ gram) * b.flatten(2)).sum()


@functools.lru_cache(maxsize=256)
def _pad_index(geometry: ConvGeometry) -> torch.Tensor:
    size = geometry.input_size
    # an explicit device: the result is cached, and a `with torch.device("meta")` block around the
    # first layer of this geometry must not leave a meta tensor for every later one
    index = torch.arange(math.prod(size), dtype=torch.float64, device="cpu").reshape(1, 1, *size)
    if geometry.padding_mode == "zeros":
        padded = F.pad(index, geometry.pad, value=-1.0)
    else:
        padded = F.pad(index, geometry.pad, mode=_PAD_MODE[geometry.padding_mode])
    return padded.flatten().long()


def _tap_sources(geometry: ConvGeometry) -> torch.Tensor:
    """``(T, positions)``: the input pixel (flat index, -1 for zero padding) that each kernel tap
    reads at each output position."""
    source = _pad_index(geometry).reshape(geometry.padded_size)
    rows = []
    for tap in itertools.product(*(range(k) for k in geometry.kernel_size)):
        window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                       for t, d, o, s in zip(tap, geometry.dilation, geometry.output_size, geometry.stride))
        rows.append(source[window].reshape(-1))
    return torch.stack(rows)


@functools.lru_cache(maxsize=256)
def _kernel_gram(geometry: ConvGeometry) -> torch.Tensor:
    taps = _tap_sources(geometry)
    n_taps = taps.shape[0]
    gram = torch.zeros(n_taps, n_taps, dtype=torch.float64, device="cpu")  # cached: see _pad_index
    for chunk in taps.split(max(1, 2**22 // max(1, n_taps * n_taps)), dim=1):
        same = (chunk[:, None, :] == chunk[None, :, :]) & (chunk[:, None, :] >= 0)
        gram += same.sum(-1, dtype=torch.float64)
    return gram


@functools.lru_cache(maxsize=256)
def _kernel_gram_pinv(geometry: ConvGeometry) -> torch.Tensor:
    return torch.linalg.pinv(_kernel_gram(geometry), hermitian=True)
