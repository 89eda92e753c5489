"""One effective weight per layer and forward of a model under ``torch.compile``.

A recurrent model calls each SRN-C layer once per frame. In eager mode the layer computes its
effective weight once and reuses it for every frame (``SRNCLayer.effective_weight``: a value
check that a compiled graph cannot run). Under ``torch.compile`` Dynamo traces every frame's
weight as its own node: Inductor's common-subexpression elimination merges the forward reweights
(84 -> 12 in a 12-layer, 7-frame unroll) but not their backwards, which run once per frame (84
calls against eager mode's 12).

``share_effective_weights(model)`` registers two hooks on ``model``: while a *compiled* forward of
``model`` is traced, each SRN-C layer inside it computes its effective weight at its first call
and every later call of that forward reuses it, so the graph holds one reweight node per layer
(and grad mode: frames run under ``torch.no_grad()`` get their own) and autograd sums the frames'
gradients before the one backward. The hooks act only under ``torch.compile``; eager forwards
are untouched. ``convert`` registers them on the model it converts; ``remove`` removes them.

What this assumes: a model's weights do not change during one of its forwards (the reweight runs
on the weight at the layer's first call).
"""
from __future__ import annotations

import torch
from torch import nn

# layer attributes: whether a compiled forward of an enclosing model is being traced, and the
# effective weight of its first call (one per grad mode)
SCOPE = "_weight_scope"
WEIGHTS = "_scoped_weights"


def _layers(module: nn.Module):
    from .module import SRNCLayer  # (module imports this file)

    return [m for m in module.modules() if isinstance(m, SRNCLayer)]


def _active() -> bool:
    """Tracing for ``torch.compile``; not ``torch.export`` (which warns about module attributes written
    in the forward, and gets one reweight per call either way)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() and not (exporting is not None and exporting())


def _enter(module: nn.Module, args) -> None:
    if _active():
        for layer in _layers(module):
            setattr(layer, SCOPE, True)
            setattr(layer, WEIGHTS, {})


def _leave(module: nn.Module, args, output) -> None:
    if _active():
        for layer in _layers(module):
            setattr(layer, SCOPE, False)
            setattr(layer, WEIGHTS, None)  # nothing outlives the graph


def share_effective_weights(model: nn.Module) -> nn.Module:
    """Register the hooks on ``model`` (once; a no-op if they are there). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if _enter not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_enter)
        model.register_forward_hook(_leave, always_call=True)
    return model


def unshare_effective_weights(model: nn.Module) -> nn.Module:
    """Remove the hooks of ``share_effective_weights`` from ``model`` and its submodules."""
    for module in model.modules():
        for hooks, function in ((module._forward_pre_hooks, _enter), (module._forward_hooks, _leave)):
            for key in [key for key, hook in hooks.items() if hook is function]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
    return model


def lookup(layer):
    """The effective weight this compiled forward already computed for ``layer`` in this grad mode,
    or None (also outside a scope)."""
    if not getattr(layer, SCOPE, False):
        return None
    return getattr(layer, WEIGHTS).get(torch.is_grad_enabled())


def store(layer, weight: torch.Tensor) -> None:
    if getattr(layer, SCOPE, False):
        getattr(layer, WEIGHTS)[torch.is_grad_enabled()] = weight
