"""Video restoration models: ``build_model(name, ...)`` for ``name`` in ``MODEL_NAMES``
(``f"{backbone}-{kind}"``). Every model follows the step/state protocol of ``base.py``."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .backbones import BACKBONES
from .base import TASKS, VideoModel
from .burst import Bursts, run_bursts
from .feedforward import FeatureShift, MultiFrame, SingleFrame
from .init import INITS, initialize
from .recurrent import FeatRecurrent, FrameRecurrent, RLSPRecurrent

_KINDS = {"feat": FeatRecurrent, "frame": FrameRecurrent, "rlsp": RLSPRecurrent,
          "single": SingleFrame, "multi": MultiFrame, "shift": FeatureShift}
KINDS = tuple(_KINDS)
MODEL_NAMES = tuple(f"{b}-{k}" for b in BACKBONES for k in KINDS)

__all__ = ["build_model", "MODEL_NAMES", "KINDS", "TASKS", "INITS", "VideoModel", "Bursts", "run_bursts", "initialize"]


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")


def build_model(name: str, *, task: str = "denoise", width: int = 64, channels: int = 3,
                dampening: float = 1.0, state_channels: Optional[int] = None, depth: Optional[int] = None,
                init: str = "default") -> nn.Module:
    """The model ``name`` (one of ``MODEL_NAMES``) for ``task`` ("denoise" or "sr2").

    ``width``: hidden channels (paper: 64); ``channels``: frame channels (3, or 1 for gray);
    ``dampening``: lambda in [0, 1]; ``state_channels``: RLSP latent channels (default ``width``;
    only for "-rlsp"); ``depth``: convs of VDnCNN (10) or residual blocks of VResNet (5), None for
    the paper's (``vdncnn-feat`` with ``depth=3`` is appendix G's tiny model: one internal conv);
    ``init``: one of ``INITS`` (see ``init.py``).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    _positive_int("width", width)
    _positive_int("channels", channels)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    backbone, kind = name.split("-")
    kwargs = dict(task=task, width=width, channels=channels, dampening=dampening, depth=depth)
    if kind == "rlsp":
        kwargs["state_channels"] = width if state_channels is None else state_channels
        _positive_int("state_channels", kwargs["state_channels"])
    elif state_channels is not None:
        raise ValueError(f"state_channels only applies to '-rlsp' models, got {state_channels!r} for {name!r}")
    return initialize(_KINDS[kind](backbone, **kwargs), init)
