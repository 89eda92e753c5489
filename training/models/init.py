"""Weight initialization schemes for the conv layers of a model (a lever of the recipe search).

- "default": PyTorch's own (``nn.Conv2d.reset_parameters``: Kaiming uniform with a = sqrt(5),
  i.e. weights of variance 1/(3 fan_in), and small uniform biases): contractive at init.
- "he": Kaiming normal with the ReLU gain (variance 2/fan_in), zero biases (figure 2b's init).
- "glorot": Glorot (Xavier) uniform (variance 2/(fan_in + fan_out)), zero biases: TensorFlow's
  default, which the paper's TensorFlow models started from.
- "normal": N(0, 0.1^2) weights, zero biases: the paper's figure 2b ("initialized with a Gaussian
  distribution (sigma = 0.1)").
"""
from __future__ import annotations

import torch
from torch import nn

INITS = ("default", "he", "glorot", "normal")


@torch.no_grad()
def initialize(model: nn.Module, scheme: str = "default") -> nn.Module:
    """Re-initialize every ``nn.Conv2d`` of ``model`` with ``scheme`` (one of ``INITS``) in place,
    drawing from torch's global RNG; returns the model. Call before any constraint is applied."""
    if scheme not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {scheme!r}")
    if scheme == "default":
        return model
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d):
            if scheme == "he":
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            elif scheme == "glorot":
                nn.init.xavier_uniform_(conv.weight)
            else:
                nn.init.normal_(conv.weight, std=0.1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
    return model
