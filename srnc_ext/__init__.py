"""srnc_ext: Stable Rank Normalization for Convolutional layers (SRN-C).

``SRNCConv2d`` is a drop-in ``nn.Conv2d`` whose true convolution operator (padding, stride,
dilation and groups included) has spectral norm ``alpha`` and a stable rank controlled by
``beta``; ``convert``/``to_conv2d`` swap layers of a model; ``refresh`` advances the power
iterations of a whole model in batched groups (it also runs by itself once per optimizer step);
``srnc_ext.spectral`` computes exact spectra of conv operators.
"""
from . import diagnostics, reference, spectral
from .backends import BACKENDS, get_backend, set_backend
from .convert import convert, to_conv2d
from .module import SRNCConv2d
from .conv_operator import ConvGeometry
from .batched_refresh import mark_fresh, refresh

__version__ = "0.1.0"

__all__ = [
    "SRNCConv2d", "convert", "to_conv2d", "refresh", "mark_fresh", "spectral", "diagnostics", "reference", "ConvGeometry",
    "BACKENDS", "get_backend", "set_backend", "__version__",
]
