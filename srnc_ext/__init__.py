"""srnc_ext: Stable Rank Normalization for Convolutional layers (SRN-C).

``SRNCConv2d`` is a drop-in ``nn.Conv2d`` whose true convolution operator (padding, stride,
dilation and groups included) has spectral norm ``alpha`` and a stable rank controlled by
``beta`` (``LazySRNCConv2d``: its ``nn.LazyConv2d`` form). The same holds for ``SRNCConv1d``,
``SRNCConv3d``, ``SRNCConvTranspose1d/2d/3d`` (the adjoint of a conv on their output size), their
lazy forms, and ``SRNCLinear`` (the weight matrix: Sanyal et al.'s SRN); ``convert`` swaps a model's convs for
SRN-C layers, ``remove`` swaps them back (raw weights), ``to_conv2d`` bakes the normalized
weights into plain convs; ``refresh`` advances the power iterations of a whole model in batched
groups (it also runs by itself once per optimizer step), ``reset_power_iterations`` starts them
anew (batched, as ``convert`` does), ``share_effective_weights`` makes a compiled forward compute
each layer's weight once (``convert`` registers it); ``srnc_ext.spectral`` computes exact
spectra of conv operators.
"""
from . import diagnostics, reference, spectral
from .backends import BACKENDS, get_backend, set_backend
from .convert import convert, remove, to_conv2d
from .module import (LazySRNCConv1d, LazySRNCConv2d, LazySRNCConv3d, LazySRNCConvTranspose1d, LazySRNCConvTranspose2d,
                     LazySRNCConvTranspose3d, SRNCConv1d, SRNCConv2d, SRNCConv3d, SRNCConvTranspose1d,
                     SRNCConvTranspose2d, SRNCConvTranspose3d, SRNCLayer, SRNCLinear, reset_power_iterations)
from .conv_operator import ConvGeometry
from .batched_refresh import mark_fresh, refresh
from .weight_scope import share_effective_weights

__version__ = "0.1.0"

__all__ = [
    "SRNCConv2d", "LazySRNCConv2d", "SRNCConv1d", "SRNCConv3d", "SRNCConvTranspose1d", "SRNCConvTranspose2d",
    "SRNCConvTranspose3d", "SRNCLinear", "LazySRNCConv1d", "LazySRNCConv3d", "LazySRNCConvTranspose1d",
    "LazySRNCConvTranspose2d", "LazySRNCConvTranspose3d", "SRNCLayer", "convert", "remove", "to_conv2d", "refresh", "mark_fresh", "reset_power_iterations", "share_effective_weights", "spectral", "diagnostics",
    "reference", "ConvGeometry",
    "BACKENDS", "get_backend", "set_backend", "__version__",
]
