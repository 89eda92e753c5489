"""Swap a model's conv (and, on request, linear) layers for their SRN-C kinds and back.

``convert`` turns ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (lazy forms and subclasses
included; ``nn.Linear`` when ``types`` names it) into SRN-C layers sharing their parameters
(``layer_kinds.SRNC_KINDS``), ``remove`` is its inverse
(plain layers holding the raw weights, like ``remove_parametrizations(leave_parametrized=False)``)
and ``to_conv2d`` bakes the normalized weights into plain layers for deployment. ``convert`` and
``spectral.model_report`` warn once, listing the conv-like modules they leave alone.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import is_lazy

from .layer_kinds import CONV_KINDS, LAZY_TORCH, TORCH_KINDS, layer_config, srnc_kind, torch_kind
from .module import SRNCLayer, reset_power_iterations
from .weight_scope import share_effective_weights, unshare_effective_weights

# what convert replaces by default: every conv kind (their lazy forms and subclasses too); nn.Linear
# is supported and converted when types names it
SUPPORTED_TYPES = CONV_KINDS


def _is_uninitialized(module: nn.Module) -> bool:
    return any(is_lazy(p) for p in module._parameters.values() if p is not None)


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


def is_conv_like(module: nn.Module) -> bool:
    """Whether ``module`` is a layer SRN-C could apply to: a torch conv or linear kind (``_ConvNd``,
    ``nn.Linear``, their lazy and subclassed forms), or any module whose class name contains "Conv"
    and that holds parameters itself (deformable convs such as torchvision's ``DeformConv2d``; a
    container named ``ConvBlock`` holds none and is not one)."""
    if isinstance(module, (_ConvNd, nn.Linear)):
        return True
    return "Conv" in type(module).__name__ and any(p is not None for p in module._parameters.values())


def warn_left_alone(model: nn.Module, handled: Callable[[str, nn.Module], Optional[str]], what: str) -> List[str]:
    """Warn once, listing the conv-like modules of ``model`` (``named_modules`` order, shared ones under
    their first name) that ``handled(name, module)`` does not take: it returns None for those it takes,
    else the reason they were left alone. Returns the listed names."""
    left = []
    for name, module in model.named_modules():
        if isinstance(module, SRNCLayer) or not is_conv_like(module):
            continue
        reason = handled(name, module)
        if reason is not None:
            left.append((name or "<model>", reason))
    if left:
        items = "; ".join(f"{name!r} ({reason})" for name, reason in left)
        warnings.warn(f"{what} {len(left)} conv-like module{'s' if len(left) > 1 else ''}: {items}", UserWarning,
                      stacklevel=3)
    return [name for name, _ in left]


def _check_types(types) -> Tuple[type, ...]:
    if isinstance(types, type):
        types = (types,)
    try:
        types = tuple(types)
    except TypeError:
        raise TypeError(f"types must be a module class or a tuple of them, got {types!r}") from None
    for kind in types:
        if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
            raise TypeError(f"types must hold module classes, got {kind!r}")
        if not issubclass(kind, TORCH_KINDS):
            raise ValueError(f"types: convert replaces {', '.join(t.__name__ for t in TORCH_KINDS)} (their lazy forms "
                             f"and subclasses), got {kind.__name__}, which SRN-C does not support")
    return types


def _sizes_by_module(model: nn.Module, input_size, targets: Dict[int, Tuple[str, nn.Module]]) -> Dict[int, object]:
    """The ``input_size`` argument of each target layer (by module id): the one given, or from a
    ``{qualified name: size}`` dict (any name of a shared layer; layers not in it: None)."""
    if not isinstance(input_size, dict):
        return {key: input_size for key in targets}
    names: Dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
    unknown = sorted(name for name in input_size if id(names.get(name)) not in targets)
    if unknown:
        details = ", ".join(f"{name!r} ({'no such module' if name not in names else type(names[name]).__name__ + ', not converted'})"
                            for name in unknown)
        raise ValueError(f"input_size names modules that convert does not convert: {details}; converted layers: "
                         f"{', '.join(repr(name or '<model>') for name, _ in targets.values())}")
    sizes: Dict[int, object] = {key: None for key in targets}
    given: Dict[int, str] = {}
    for name, size in input_size.items():
        key = id(names[name])
        if key in given and input_size[given[key]] != size:
            raise ValueError(f"input_size gives the shared layer {given[key]!r} / {name!r} two sizes: "
                             f"{input_size[given[key]]!r} and {size!r}")
        given[key], sizes[key] = name, size
    return sizes


def _srnc_layer(name: str, module: nn.Module, input_size, alpha: float, beta: float, options: dict) -> SRNCLayer:
    """The SRN-C layer replacing ``module``, sharing its weight and bias ``Parameter`` objects."""
    dtype = module.weight.dtype
    config = layer_config(module)
    linear = isinstance(module, nn.Linear)
    if linear and input_size is not None:
        raise ValueError(f"input_size={input_size!r} given for a {type(module).__name__}: a Linear's operator is its "
                         "matrix and has no input size (leave it out of input_size)")
    lazy = _is_uninitialized(module)
    if "sigma_floor" not in options and not lazy and not module.weight.is_meta and not bool(module.weight.detach().any()):
        # a zero-initialized layer (EDVR/BasicVSR++ offset convs): scaled linearly until sigma_1 reaches
        # alpha, so it trains like the unconverted layer does (srnc_ext.ops.coefficients)
        options = dict(options, sigma_floor=1.0)
    if lazy and linear:
        raise ValueError(f"{type(module).__name__} before its first forward: SRN-C has no lazy Linear; run a forward "
                         "first (or build an srnc_ext.SRNCLinear)")
    if lazy:  # a torch lazy conv before its first forward
        del config["in_channels"]
        layer = srnc_kind(module, lazy=True)(**config, device=module.weight.device, dtype=dtype, alpha=alpha,
                                             beta=beta, input_size=input_size, **options)
    elif linear:
        layer = srnc_kind(module)(**config, device="meta", dtype=dtype, alpha=alpha, beta=beta, **options)
    else:
        layer = srnc_kind(module)(**config, device="meta", dtype=dtype, alpha=alpha, beta=beta,
                                  input_size="track" if input_size == "track" else None, **options)
    layer.weight = module.weight
    layer.bias = module.bias
    layer.srnc_name = name or None  # before the warm-up, whose warnings name the layer
    if linear:
        layer.reset_power_iteration()  # built on meta: now on the real weight
    elif input_size is not None and input_size != "track" and not lazy:
        layer._set_geometry(input_size)  # warmed up with the others: convert's reset_power_iterations
    return layer


def convert(
    model: nn.Module,
    *,
    alpha: float,
    beta: float = 1.0,
    predicate: Optional[Callable[[str], bool]] = None,
    types=SUPPORTED_TYPES,
    input_size=None,
    **kwargs,
) -> nn.Module:
    """Replace every layer of ``types`` (default: every conv kind, ``nn.Conv1d/2d/3d`` and
    ``nn.ConvTranspose1d/2d/3d``, lazy forms and subclasses included; add ``nn.Linear`` to convert
    linear layers too; layers already SRN-C are kept) by its SRN-C kind (``SRNCConv2d``,
    ``SRNCConvTranspose2d``, ``SRNCLinear``, ...) with the same configuration and the same weight and
    bias parameters; a lazy conv before its first forward becomes the lazy SRN-C kind that
    materializes on it.

    ``predicate(qualified_name) -> bool`` restricts which layers are converted. ``input_size``:
    None (each layer takes its size from its first input), an int or ``(h, w)`` for every layer,
    ``"track"`` (zero padding only: each layer re-normalizes for the largest size it sees), or a
    dict ``{qualified name: any of these}`` (names of layers that are not converted are refused;
    layers not in it take their size from their first input; a transposed conv's size is that of its
    input; Linear layers take none). ``kwargs`` go to the SRN-C layers
    (``n_power_iterations``, ``eps``, ``variant``, ``backend``, ``refresh_every``, ``sigma_floor``; without ``sigma_floor``,
    a layer whose weight is all zeros, a zero-initialized one, gets ``sigma_floor=1.0``: it trains like
    the unconverted layer until its sigma_1 reaches alpha). Layers with a known size start with
    a fresh warmed-up power iteration on their weight, all warmed up together
    (``module.reset_power_iterations``: one batched symbol search and one batched refresh per refresh
    signature). Every layer is built before any is replaced,
    so a refused argument leaves the model as it was. One ``UserWarning`` lists the conv-like
    modules left alone (``Linear`` unless in ``types``, deformable convs, layers not selected).
    Returns the model (or the new layer if ``model`` is itself a conv).
    """
    types = _check_types(types)
    targets: Dict[int, Tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():  # the first name of a shared layer, as _replace visits it
        if isinstance(module, types) and not isinstance(module, SRNCLayer) and (predicate is None or predicate(name)):
            targets[id(module)] = (name, module)
    sizes = _sizes_by_module(model, input_size, targets)
    new: Dict[int, nn.Module] = {}
    for key, (name, module) in targets.items():
        try:
            new[key] = _srnc_layer(name, module, sizes[key], alpha, beta, kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {name or '<model>'!r}: {err}") from err
    sized = [layer for layer in new.values() if layer._geometry is not None and not layer.power_iteration.allocated]
    for layer in sized:  # the refresh would name a bad layer by its index in a refresh group
        if not layer.weight.is_meta and not bool(torch.isfinite(layer.weight.detach()).all()):
            raise ValueError(f"layer {layer.srnc_name or '<model>'!r}: weight contains NaN or inf; "
                             "the power-iteration vectors were not updated")
    reset_power_iterations(sized)  # batched across layers: one symbol search and one refresh per signature

    inside = tuple(f"{name}." if name else "" for name, _ in targets.values())  # replaced along with their layer

    def reason(name: str, module: nn.Module) -> Optional[str]:
        if id(module) in targets or name.startswith(inside):
            return None
        kind = type(module).__name__
        if isinstance(module, TORCH_KINDS):
            return f"{kind}, {'not in types' if not isinstance(module, types) else 'rejected by predicate'}"
        return f"{kind}, not supported by SRN-C yet"

    warn_left_alone(model, reason, "srnc_ext.convert left alone")
    result = _replace(model, lambda name, module: new.get(id(module)))
    if new and result is model:  # a compiled forward of the model computes each layer's weight once
        share_effective_weights(model)
    return result


def remove(model: nn.Module) -> nn.Module:
    """Replace every SRN-C layer by its plain torch kind holding its RAW weight: the inverse of
    ``convert``, like ``torch.nn.utils.parametrize.remove_parametrizations(leave_parametrized=False)``.

    The new layers share the SRN-C layers' weight and bias ``Parameter`` objects (an optimizer built
    on the converted model still holds them), so the result computes what the model did before
    ``convert``. A lazy SRN-C layer not yet materialized becomes torch's lazy kind. Use
    ``to_conv2d`` to keep the normalized weights instead. Returns the model (or the new layer if
    ``model`` is itself an SRN-C layer).
    """

    def make(name: str, module: nn.Module) -> Optional[nn.Module]:
        if not isinstance(module, SRNCLayer):
            return None
        kind, config = torch_kind(module), layer_config(module)
        if _is_uninitialized(module):
            del config["in_channels"]
            plain = LAZY_TORCH[kind](**config, device=module.weight.device, dtype=module.weight.dtype)
        else:
            plain = kind(**config, device="meta", dtype=module.weight.dtype)
        plain.weight = module.weight
        plain.bias = module.bias
        return plain

    return _replace(unshare_effective_weights(model), make)


def to_conv2d(model: nn.Module) -> nn.Module:
    """Replace every SRN-C layer by its plain torch kind (``nn.Conv2d`` for an ``SRNCConv2d``,
    ``nn.ConvTranspose2d``, ``nn.Linear``, ...) holding its effective weight.

    For deployment: the result computes the same function with no normalization cost.
    Returns the model (or the new layer if ``model`` is itself an SRN-C layer).
    """

    def make(name: str, module: nn.Module) -> Optional[nn.Module]:
        if not isinstance(module, SRNCLayer):
            return None
        if not module.materialized:
            raise RuntimeError(f"layer {name or '<model>'!r} has no input_size yet: run a forward or pass input_size")
        with torch.no_grad():
            weight = module.effective_weight().detach().clone()
        plain = torch_kind(module)(**layer_config(module), device="meta", dtype=weight.dtype)
        plain.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        plain.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(), module.bias.requires_grad)
        return plain

    return _replace(unshare_effective_weights(model), make)
