"""Swap ``nn.Conv2d`` layers of a model for ``SRNCConv2d`` and back."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from .module import SRNCConv2d


def _conv_config(conv: nn.Conv2d) -> dict:
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _replace(model: nn.Module, make: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Replace every submodule for which ``make(qualified_name, module)`` returns a module.

    A module that appears several times (shared weights) is replaced by one shared module.
    Returns the model, or the replacement when ``model`` itself is replaced.
    """
    done: Dict[int, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = make(name, module)
        if new is not None:
            new.train(module.training)
            done[id(module)] = new
            return new
        for child_name, child in list(module._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            replacement = visit(child, f"{name}.{child_name}" if name else child_name)
            if replacement is not child:
                setattr(module, child_name, replacement)
        done[id(module)] = module
        return module

    return visit(model, "")


def convert(
    model: nn.Module,
    *,
    alpha: float,
    beta: float = 1.0,
    predicate: Optional[Callable[[str], bool]] = None,
    **kwargs,
) -> nn.Module:
    """Replace every ``nn.Conv2d`` (not already SRN-C) by an ``SRNCConv2d`` with the same
    configuration and the same weight and bias parameters.

    ``predicate(qualified_name) -> bool`` restricts which layers are converted; ``kwargs`` go
    to ``SRNCConv2d`` (``input_size``, ``n_power_iterations``, ``eps``, ``variant``). Layers
    with a known ``input_size`` start with a fresh warmed-up power iteration on their weight.
    Returns the model (or the new layer if ``model`` is itself a conv).
    """

    def make(name: str, module: nn.Module) -> Optional[nn.Module]:
        if not isinstance(module, nn.Conv2d) or isinstance(module, SRNCConv2d):
            return None
        if predicate is not None and not predicate(name):
            return None
        input_size = kwargs.get("input_size")
        options = {k: v for k, v in kwargs.items() if k != "input_size"}
        layer = SRNCConv2d(**_conv_config(module), device="meta", dtype=module.weight.dtype, alpha=alpha, beta=beta, **options)
        layer.weight = module.weight
        layer.bias = module.bias
        layer.srnc_name = name or None
        if input_size is not None:
            layer.set_input_size(input_size)
        return layer

    return _replace(model, make)


def to_conv2d(model: nn.Module) -> nn.Module:
    """Replace every ``SRNCConv2d`` by a plain ``nn.Conv2d`` holding its effective weight.

    For deployment: the result computes the same function with no normalization cost.
    Returns the model (or the new layer if ``model`` is itself an ``SRNCConv2d``).
    """

    def make(name: str, module: nn.Module) -> Optional[nn.Module]:
        if not isinstance(module, SRNCConv2d):
            return None
        if not module.materialized:
            raise RuntimeError(f"layer {name or '<model>'!r} has no input_size yet: run a forward or pass input_size")
        with torch.no_grad():
            weight = module.effective_weight().detach().clone()
        conv = nn.Conv2d(**_conv_config(module), device="meta", dtype=weight.dtype)
        conv.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        conv.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(), module.bias.requires_grad)
        return conv

    return _replace(model, make)
