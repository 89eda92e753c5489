"""The layer kinds SRN-C covers, and the operator of any layer of those kinds.

One table pairs each torch kind with its SRN-C kind (``convert``, ``remove``, ``to_conv2d`` and
``spectral`` read it): ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (their lazy forms too),
and ``nn.Linear``. ``operator_of`` gives the kernel and ``ConvGeometry`` of a layer, plain or SRN-C:
a transposed conv is the adjoint of the conv it returns (same singular values), a Linear is its
weight matrix as a one-tap 1-D conv.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .conv_operator import ConvGeometry
from .module import (LazySRNCConv1d, LazySRNCConv2d, LazySRNCConv3d, LazySRNCConvTranspose1d, LazySRNCConvTranspose2d,
                     LazySRNCConvTranspose3d, SRNCConv1d, SRNCConv2d, SRNCConv3d, SRNCConvTranspose1d,
                     SRNCConvTranspose2d, SRNCConvTranspose3d, SRNCLayer, SRNCLinear)

# torch kind -> SRN-C kind (subclasses of a torch kind take its SRN-C kind)
SRNC_KINDS = (
    (nn.Conv1d, SRNCConv1d), (nn.Conv2d, SRNCConv2d), (nn.Conv3d, SRNCConv3d),
    (nn.ConvTranspose1d, SRNCConvTranspose1d), (nn.ConvTranspose2d, SRNCConvTranspose2d),
    (nn.ConvTranspose3d, SRNCConvTranspose3d), (nn.Linear, SRNCLinear),
)
LAZY_SRNC_KINDS = (
    (nn.Conv1d, LazySRNCConv1d), (nn.Conv2d, LazySRNCConv2d), (nn.Conv3d, LazySRNCConv3d),
    (nn.ConvTranspose1d, LazySRNCConvTranspose1d), (nn.ConvTranspose2d, LazySRNCConvTranspose2d),
    (nn.ConvTranspose3d, LazySRNCConvTranspose3d),
)
TORCH_KINDS = tuple(kind for kind, _ in SRNC_KINDS)
CONV_KINDS = TORCH_KINDS[:-1]  # every conv kind: what convert converts by default
LAZY_TORCH = {nn.Conv1d: nn.LazyConv1d, nn.Conv2d: nn.LazyConv2d, nn.Conv3d: nn.LazyConv3d,
              nn.ConvTranspose1d: nn.LazyConvTranspose1d, nn.ConvTranspose2d: nn.LazyConvTranspose2d,
              nn.ConvTranspose3d: nn.LazyConvTranspose3d, nn.Linear: nn.LazyLinear}


def torch_kind(module: nn.Module) -> Optional[type]:
    """The torch kind of ``module`` (an SRN-C layer is one of its torch kind), or None."""
    for kind, _ in SRNC_KINDS:
        if isinstance(module, kind):
            return kind
    return None


def srnc_kind(module: nn.Module, lazy: bool = False) -> Optional[type]:
    """The SRN-C class that replaces ``module`` (its lazy form with ``lazy``), or None."""
    kind = torch_kind(module)
    table = dict(LAZY_SRNC_KINDS if lazy else SRNC_KINDS)
    return table.get(kind)


def layer_config(module: nn.Module) -> dict:
    """The constructor arguments of ``module``'s torch kind (no device, dtype or SRN-C settings)."""
    if isinstance(module, nn.Linear):
        return dict(in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None)
    config = dict(in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=module.kernel_size,
                  stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups,
                  bias=module.bias is not None, padding_mode=module.padding_mode)
    if module.transposed:
        config["output_padding"] = module.output_padding
    return config


def geometry_of(module: nn.Module, input_size) -> ConvGeometry:
    """The operator of a torch or SRN-C layer on inputs of ``input_size`` (ignored for a Linear)."""
    if isinstance(module, nn.Linear):
        return ConvGeometry.for_linear(module.in_features, module.out_features)
    if input_size is None:
        raise ValueError(f"input_size is required for a {type(module).__name__} (its operator depends on it)")
    if module.transposed:
        return ConvGeometry.for_transposed(module.weight.shape, input_size, stride=module.stride,
                                           padding=module.padding, output_padding=module.output_padding,
                                           dilation=module.dilation, groups=module.groups)
    return ConvGeometry.from_conv(module, input_size)


def operator_of(module: nn.Module, input_size=None) -> Tuple[torch.Tensor, ConvGeometry]:
    """``(kernel, geometry)`` of a layer: its effective weight for SRN-C layers (raw weight else), in
    float64 on the CPU, shaped as ``geometry.weight_shape``; ``input_size`` defaults to the layer's
    own."""
    if input_size is None and not isinstance(module, nn.Linear):
        input_size = getattr(module, "input_size", None)
    geometry = geometry_of(module, input_size)
    # an SRN-C layer's effective weight (any layer that has one: duck-typed), else the raw weight
    weight = module.effective_weight() if hasattr(module, "effective_weight") else module.weight
    return weight.detach().to(device="cpu", dtype=torch.float64).reshape(geometry.weight_shape), geometry
