"""The true linear operator of a 2-D convolution layer, and its exact adjoint.

A conv layer with kernel ``K`` of shape ``(C_out, C_in // groups, kh, kw)`` acting on
``(C_in, H, W)`` inputs is the linear map ``W: R^(C_in*H*W) -> R^(C_out*H'*W')``, padding
mode, stride, dilation and groups included. ``ConvGeometry`` describes that map (everything
but the kernel) and applies it, its adjoint and its kernel gradient. Every padding mode is
written as an explicit pad followed by an unpadded convolution, exactly as ``nn.Conv2d``
does for its non-zero modes, so the adjoint is ``pad^T`` after ``conv^T``:

* ``conv^T`` is ``conv_transpose2d`` with the ``output_padding`` that restores the padded size;
* ``pad^T`` is a crop for zero padding, and for circular/reflect/replicate padding a
  scatter-add along the padding's index map (each padded pixel is a copy of one input pixel).

The kernel-to-operator map ``A: K -> W(K)`` is linear, and ``A^T A`` acts on each
``(out, in)`` kernel slice by one ``(kh*kw, kh*kw)`` spatial Gram matrix ``G``
(``kernel_gram``): ``||W(K)||_F^2 = sum_{o,i} vec(K[o,i])^T G vec(K[o,i])``. For zero and
circular padding ``G`` is diagonal (circular: ``H*W*I`` at stride 1); for reflect and
replicate padding mirrored pixels make it dense.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
_PAD_MODE = {"zeros": "constant", "circular": "circular", "reflect": "reflect", "replicate": "replicate"}

IntPair = Tuple[int, int]
SizeLike = Union[int, Tuple[int, int], torch.Size]


def pair(value, name: str) -> IntPair:
    """``value`` as an (h, w) pair of ints; raises naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


def resolve_padding(padding, kernel_size: IntPair, dilation: IntPair, stride: IntPair) -> Tuple[int, int, int, int]:
    """Padding as ``(left, right, top, bottom)`` in ``F.pad`` order, the way ``nn.Conv2d`` pads.

    ``padding`` is an int, an (h, w) pair, ``"valid"`` or ``"same"`` (stride 1 only; for
    even kernels the extra pixel goes to the right/bottom, as in ``nn.Conv2d``).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' requires stride 1, got stride={stride}")
            pads = []
            for k, d in ((kernel_size[1], dilation[1]), (kernel_size[0], dilation[0])):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)  # type: ignore[return-value]
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (pw, pw, ph, ph)


@dataclass(frozen=True)
class ConvGeometry:
    """Everything that defines a conv layer's linear operator except its kernel.

    ``pad`` is ``(left, right, top, bottom)``; ``input_size`` is ``(H, W)``.
    """

    in_channels: int
    out_channels: int
    kernel_size: IntPair
    stride: IntPair
    dilation: IntPair
    groups: int
    pad: Tuple[int, int, int, int]
    padding_mode: str
    input_size: IntPair

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
        """Validated geometry for a kernel of ``weight_shape`` ``(C_out, C_in/groups, kh, kw)``."""
        if len(weight_shape) != 4:
            raise ValueError(f"weight must have 4 dims (C_out, C_in/groups, kh, kw), got shape {tuple(weight_shape)}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        c_out, c_in_g, kh, kw = (int(s) for s in weight_shape)
        if c_out % groups:
            raise ValueError(f"out_channels={c_out} is not divisible by groups={groups}")
        stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
        if min(stride) < 1 or min(dilation) < 1:
            raise ValueError(f"stride and dilation must be >= 1, got stride={stride}, dilation={dilation}")
        geometry = cls(
            in_channels=c_in_g * groups,
            out_channels=c_out,
            kernel_size=(kh, kw),
            stride=stride,
            dilation=dilation,
            groups=groups,
            pad=resolve_padding(padding, (kh, kw), dilation, stride),
            padding_mode=padding_mode,
            input_size=pair(tuple(input_size) if isinstance(input_size, torch.Size) else input_size, "input_size"),
        )
        geometry._validate_size()
        return geometry

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, input_size: SizeLike) -> "ConvGeometry":
        """The geometry of an ``nn.Conv2d`` (or subclass) acting on ``input_size`` inputs."""
        return cls.create(
            conv.weight.shape,
            input_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
        )

    @property
    def min_input_size(self) -> IntPair:
        """The smallest ``(H, W)`` at which ``nn.Conv2d`` runs this layer (and so the operator exists).

        PyTorch's limits: the padded map must hold the dilated kernel (conv2d, every mode);
        reflect padding must be smaller than the input on each side, circular padding at most
        the input (F.pad: it wraps around once). Zero and replicate padding accept any map that
        the kernel fits once padded, maps smaller than the kernel included.
        """
        left, right, top, bottom = self.pad
        sizes = []
        for k, d, low, high in ((*self.kernel_size[:1], self.dilation[0], top, bottom),
                                (self.kernel_size[1], self.dilation[1], left, right)):
            smallest = max(1, d * (k - 1) + 1 - low - high)
            if self.padding_mode == "reflect":
                smallest = max(smallest, max(low, high) + 1)
            elif self.padding_mode == "circular":
                smallest = max(smallest, max(low, high))
            sizes.append(smallest)
        return tuple(sizes)  # type: ignore[return-value]

    def _validate_size(self) -> None:
        """Refuse exactly the sizes at which ``nn.Conv2d`` itself fails, naming PyTorch's limit."""
        (h, w), (min_h, min_w) = self.input_size, self.min_input_size
        if h >= min_h and w >= min_w:
            return
        left, right, top, bottom = self.pad
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        limits = [f"the padded map must hold the dilated kernel ({dh * (kh - 1) + 1}, {dw * (kw - 1) + 1}) (conv2d)"]
        if self.padding_mode == "reflect":
            limits.append("reflect padding must be smaller than the input on each side (F.pad)")
        elif self.padding_mode == "circular":
            limits.append("circular padding must not exceed the input on any side (F.pad: it wraps around once)")
        raise ValueError(
            f"input_size={self.input_size} is too small for padding_mode={self.padding_mode!r} with padding "
            f"(left, right, top, bottom)={self.pad}: PyTorch requires that {' and '.join(limits)}; the smallest "
            f"input_size this layer accepts is {(min_h, min_w)}")

    # ----------------------------------------------------------------- sizes
    @property
    def padded_size(self) -> IntPair:
        left, right, top, bottom = self.pad
        return (self.input_size[0] + top + bottom, self.input_size[1] + left + right)

    @property
    def output_size(self) -> IntPair:
        hp, wp = self.padded_size
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return ((hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1)

    @property
    def dim_in(self) -> int:
        """Dimension of the operator's domain, ``C_in * H * W``."""
        return self.in_channels * self.input_size[0] * self.input_size[1]

    @property
    def dim_out(self) -> int:
        """Dimension of the operator's codomain, ``C_out * H' * W'``."""
        h, w = self.output_size
        return self.out_channels * h * w

    @property
    def full_rank(self) -> int:
        """``min(dim_in, dim_out)``: the largest rank an operator of this shape can have."""
        return min(self.dim_in, self.dim_out)

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def is_circulant(self) -> bool:
        """True when the operator is block-circulant: circular padding, stride 1, same size."""
        return self.padding_mode == "circular" and self.stride == (1, 1) and self.output_size == self.input_size

    def input_shape(self, batch: int = 1) -> Tuple[int, int, int, int]:
        return (batch, self.in_channels, *self.input_size)

    def output_shape(self, batch: int = 1) -> Tuple[int, int, int, int]:
        return (batch, self.out_channels, *self.output_size)

    # ----------------------------------------------------------------- the operator
    @property
    def _conv_padding(self) -> Optional[IntPair]:
        """Symmetric zero padding that the convolution itself can apply (saves a padded copy)."""
        left, right, top, bottom = self.pad
        if self.padding_mode == "zeros" and left == right and top == bottom:
            return (top, left)
        return None

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad == (0, 0, 0, 0):
            return x
        return F.pad(x, self.pad, mode=_PAD_MODE[self.padding_mode])

    def _unpad_adjoint(self, z: torch.Tensor) -> torch.Tensor:
        """``pad^T``: ``(B, C, Hp, Wp) -> (B, C, H, W)``."""
        h, w = self.input_size
        left, _, top, _ = self.pad
        if self.padding_mode == "zeros" or self.pad == (0, 0, 0, 0):
            return z[..., top : top + h, left : left + w]
        index = self.pad_index(z.device)
        out = z.new_zeros(*z.shape[:-2], h * w)
        return out.index_add_(-1, index, z.flatten(-2)).unflatten(-1, (h, w))

    def apply(self, kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``W x``: ``x (B, C_in, H, W) -> (B, C_out, H', W')``, no bias."""
        if self._conv_padding is not None:
            return F.conv2d(x, kernel, None, self.stride, self._conv_padding, self.dilation, self.groups)
        return F.conv2d(self._pad(x), kernel, None, self.stride, 0, self.dilation, self.groups)

    def adjoint(self, kernel: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``W^T y``: ``y (B, C_out, H', W') -> (B, C_in, H, W)``; ``<W x, y> = <x, W^T y>`` exactly."""
        (hp, wp), (ho, wo) = self.padded_size, self.output_size
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        if self.stride == (1, 1) and not self._transpose_is_faster(y):
            # conv^T at stride 1 is a full-padded conv with the flipped, in/out-swapped kernel:
            # for NCHW inputs oneDNN runs it faster than a grouped conv_transpose2d (benchmarks/,
            # 12-layer refresh: 8 ms against 18 ms when this was written).
            g = self.groups
            c_out, c_in_g = kernel.shape[:2]
            swapped = kernel.reshape(g, c_out // g, c_in_g, kh, kw).transpose(1, 2).reshape(g * c_in_g, c_out // g, kh, kw)
            full_h, full_w = dh * (kh - 1), dw * (kw - 1)
            same = self._conv_padding
            if same is not None and same[0] <= full_h and same[1] <= full_w:  # pad and crop in one conv
                padding = (full_h - same[0], full_w - same[1])
                return F.conv2d(y, swapped.flip(-2, -1), None, 1, padding, self.dilation, g)
            z = F.conv2d(F.pad(y, (full_w, full_w, full_h, full_h)), swapped.flip(-2, -1), None, 1, 0, self.dilation, g)
        else:
            output_padding = (hp - ((ho - 1) * sh + dh * (kh - 1) + 1), wp - ((wo - 1) * sw + dw * (kw - 1) + 1))
            same = self._conv_padding
            if same is not None:  # conv^T and the crop pad^T in one call
                return F.conv_transpose2d(y, kernel, None, self.stride, same, output_padding, self.groups, self.dilation)
            z = F.conv_transpose2d(y, kernel, None, self.stride, 0, output_padding, self.groups, self.dilation)
        return self._unpad_adjoint(z)

    def _transpose_is_faster(self, y: torch.Tensor) -> bool:
        """Whether ``conv_transpose2d`` beats the flipped-kernel conv for this adjoint.

        For channels-last inputs oneDNN's grouped transposed conv is the faster one (2 threads,
        32x32, 10 groups of 32 channels: 1.04 ms against 1.79 ms), except with few output
        channels per group (32 -> 3: 0.36 ms against 0.05 ms).
        """
        return is_channels_last(y) and self.out_channels // self.groups >= 8

    def kernel_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``grad_K <y, W(K) x>`` summed over the batch: ``(C_out, C_in/groups, kh, kw)``.

        With unit vectors ``x = v``, ``y = u`` this is the paper's ``S1`` (Algorithm 2, step 5),
        and ``<K, S1> = <u, W(K) v>`` exactly, by linearity.
        """
        if self._conv_padding is not None:
            return torch.nn.grad.conv2d_weight(x, self.weight_shape, y, self.stride, self._conv_padding, self.dilation, self.groups)
        return torch.nn.grad.conv2d_weight(self._pad(x), self.weight_shape, y, self.stride, 0, self.dilation, self.groups)

    # ----------------------------------------------------------------- index maps and Gram
    def pad_index(self, device=None) -> torch.Tensor:
        """For each pixel of the padded input, the flat index of the input pixel it copies.

        ``(Hp * Wp,)`` int64, ``-1`` where zero padding supplies the value.
        """
        return _pad_index(self).to(device)

    def kernel_gram(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """``G`` with ``G[a, b] = <W(E_a), W(E_b)>_F`` for single-channel unit kernels ``E_a``.

        ``(kh*kw, kh*kw)``; ``||W(K)||_F^2 = sum_{o,i} vec(K[o,i])^T G vec(K[o,i])``.
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
    """``<W(a), W(b)>_F = sum_{o,i} vec(a[o,i])^T G vec(b[o,i])`` for kernels ``a, b (C_out, C_in/g, kh, kw)``."""
    return ((a.flatten(2) @ gram) * b.flatten(2)).sum()


@functools.lru_cache(maxsize=256)
def _pad_index(geometry: ConvGeometry) -> torch.Tensor:
    h, w = geometry.input_size
    index = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    if geometry.padding_mode == "zeros":
        padded = F.pad(index, geometry.pad, value=-1.0)
    else:
        padded = F.pad(index, geometry.pad, mode=_PAD_MODE[geometry.padding_mode])
    return padded.flatten().long()


@functools.lru_cache(maxsize=256)
def _kernel_gram(geometry: ConvGeometry) -> torch.Tensor:
    hp, wp = geometry.padded_size
    source = _pad_index(geometry).to(torch.float64).reshape(1, 1, hp, wp)
    # (taps, positions): the input pixel each kernel tap reads at each output position
    taps = F.unfold(source, geometry.kernel_size, geometry.dilation, 0, geometry.stride)[0]
    n_taps = taps.shape[0]
    gram = torch.zeros(n_taps, n_taps, dtype=torch.float64)
    for chunk in taps.split(max(1, 2**22 // max(1, n_taps * n_taps)), dim=1):
        same = (chunk[:, None, :] == chunk[None, :, :]) & (chunk[:, None, :] >= 0)
        gram += same.sum(-1, dtype=torch.float64)
    return gram


@functools.lru_cache(maxsize=256)
def _kernel_gram_pinv(geometry: ConvGeometry) -> torch.Tensor:
    return torch.linalg.pinv(_kernel_gram(geometry), hermitian=True)
