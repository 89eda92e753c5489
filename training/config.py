"""Run configuration: one dataclass, presets, a JSON config file and ``--set key=value`` overrides.

Config files are JSON (data only: nothing in them is executed). Precedence: defaults < preset <
config file < ``--set``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

# training seeds torch.Generator with seed * 1_000_003 + step (training/train.py), which must fit in
# 64 unsigned bits; 2**44 leaves room for any step count
SEED_LIMIT = 2**44


@dataclass
class Config:
    # model and constraint
    model: str = "vresnet-feat"
    task: str = "denoise"
    width: int = 16
    # the pipeline trains one model per method spec (constraints.parse_method: "srnc" takes alpha and
    # beta below, "srnc-2-0.1" its own)
    methods: List[str] = field(default_factory=lambda: ["none", "srnc"])
    alpha: float = 1.0
    beta: float = 1.0
    variant: str = "projected"
    n_power_iterations: int = 1
    dampening: float = 1.0
    depth: Optional[int] = None  # convs of VDnCNN (10) / residual blocks of VResNet (5); None: the paper's
    init: str = "default"  # conv init: "default" (PyTorch), "he", "glorot" (training.models.INITS)
    # data
    channels: int = 3  # 3 (RGB) or 1 (gray, appendix G)
    static_clips: float = 0.0  # probability that a synthetic training clip is static
    data: str = "synthetic"  # "synthetic" or the root of a Vimeo-90k septuplet folder
    list_file: Optional[str] = None  # a BasicSR/mmagic meta_info file for Vimeo-90k
    crop: int = 32
    frames: int = 7
    batch: int = 4
    sigma: float = 30.0  # noise standard deviation on the 0-255 scale
    # optimization
    steps: int = 500
    lr: float = 1e-3
    schedule: str = "cosine"  # "constant", "cosine", "step"
    warmup: int = 0  # steps of linear learning-rate warm-up (multiplies the schedule)
    grad_clip: Optional[float] = None
    seed: int = 0
    deterministic: bool = False
    amp: bool = False  # mixed precision (CUDA only)
    device: str = "cpu"
    log_every: int = 10
    checkpoint_every: int = 50
    # evaluation
    eval_clips: int = 8
    long_frames: int = 1500
    long_video: Optional[str] = None  # a folder of frames; default: a synthetic long sequence
    burst: Optional[int] = None  # inference burst by burst (appendix E): reset the state every `burst` frames
    burst_overlap: bool = False  # ... with two overlapping states
    y_channel: bool = False  # PSNR on the Y channel (SR papers' convention)
    crop_border: int = 0  # PSNR without this many border pixels
    # temporal receptive field diagnostic (srnc_ext.diagnostics.trf)
    trf_frames: int = 41
    trf_size: int = 32
    trf_iters: int = 60

    def validate(self) -> "Config":
        """Raise ValueError, ``"<key> must be <allowed>, got <value>"``, for the first bad value.

        Types first (by the type hints, as ``coerce`` types a config file), then values. The
        device is checked to be a device string, not to be present (``check_device_available``).
        """
        from .constraints import METHODS
        from .models import INITS, MODEL_NAMES

        for name, (kind, optional) in _field_types().items():
            value = getattr(self, name)
            if not _matches(kind, optional, value):
                raise ValueError(f"{name} must be {_allowed(kind, optional, 'python')}, got {value!r} "
                                 f"(a {type(value).__name__})")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; valid models: {', '.join(MODEL_NAMES)}")
        from .constraints import parse_method

        if not self.methods:
            raise ValueError(f"methods must be a non-empty list of {METHODS} (e.g. srnc-2-0.1), got {self.methods!r}")
        for spec in self.methods:
            parse_method(spec)
        from srnc_ext import hyperparameters  # the layer's own checks, one home

        hyperparameters.check_alpha(self.alpha)
        hyperparameters.check_beta(self.beta)
        hyperparameters.check_variant(self.variant)
        hyperparameters.check_iterations("n_power_iterations", self.n_power_iterations)
        checks = [
            ("task", self.task in ("denoise", "sr2"), "one of ('denoise', 'sr2')"),
            ("width", self.width >= 1, ">= 1"),
            ("dampening", 0 <= self.dampening <= 1, "in [0, 1]"),
            ("depth", self.depth is None or self.depth >= (2 if self.model.startswith("vdncnn") else 1),
             "None or >= 2 (vdncnn convs) / >= 1 (vresnet blocks)"),
            ("init", self.init in INITS, f"one of {INITS}"),
            ("channels", self.channels in (1, 3), "1 or 3"),
            ("static_clips", 0 <= self.static_clips <= 1, "in [0, 1]"),
            ("warmup", self.warmup >= 0, ">= 0"),
            ("crop", self.crop >= 8, ">= 8"),
            ("frames", self.frames >= 1, ">= 1"),
            ("batch", self.batch >= 1, ">= 1"),
            ("sigma", self.sigma >= 0, ">= 0"),
            ("steps", self.steps >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"),
            ("schedule", self.schedule in ("constant", "cosine", "step"), "one of ('constant', 'cosine', 'step')"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "None or > 0"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("eval_clips", self.eval_clips >= 1, ">= 1"),
            ("burst", self.burst is None or self.burst >= 2, "None or >= 2"),
            ("crop_border", self.crop_border >= 0, ">= 0"),
            ("crop_border", 2 * self.crop_border < self.crop,
             f"< crop / 2 = {self.crop / 2:g} (PSNR is measured on crop - 2 * crop_border = "
             f"{self.crop - 2 * self.crop_border} pixels of a {self.crop}-pixel crop)"),
            ("seed", 0 <= self.seed < SEED_LIMIT, "in [0, 2**44)"),
            ("long_frames", self.long_frames >= 1, ">= 1"),
            ("trf_frames", self.trf_frames >= 3 and self.trf_frames % 2 == 1, "odd and >= 3"),
            ("trf_size", self.trf_size >= 8, ">= 8"),
            ("trf_iters", self.trf_iters >= 1, ">= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        _parse_device(self.device)
        return self

    @property
    def input_size(self) -> int:
        """The side of the maps the model's convs see in training: the crop, halved for ``sr2``
        (the model runs on the downsampled frames)."""
        return self.crop // 2 if self.task == "sr2" else self.crop

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: Dict[str, Dict[str, Any]] = {
    # the default `python -m training.run`: a few minutes on a 2-core CPU. Its training recipe (He
    # init, gradients clipped at norm 1) is the one the recipe search picked by measurement
    # (training/reproduce, docs/reproduction): the only affordable recipe found under which the
    # unconstrained model becomes unstable by both tests; the methods tell the paper's story.
    "default": dict(init="he", grad_clip=1.0, methods=["none", "sn-1", "srnc-2-0.1", "srnc-1-1"]),
    # seconds: for tests and a quick look
    "smoke": dict(width=8, crop=16, frames=3, batch=2, steps=6, log_every=2, checkpoint_every=3, eval_clips=2,
                  long_frames=40, trf_frames=9, trf_size=16, trf_iters=5),
    # the paper's setting (section 3.1, appendix C): a GPU job
    "paper": dict(width=64, crop=64, frames=7, batch=32, steps=300_000, lr=1e-4, schedule="step",
                  alpha=2.0, beta=0.1, eval_clips=256, long_frames=200_000, device="cuda", amp=True,
                  log_every=100, checkpoint_every=5000, trf_frames=81, trf_size=64, trf_iters=500),
}


# ---------------------------------------------------------------- typing of values (from the type hints)
SET_SOURCE = "--set"  # the ``source`` of a value typed on the command line (any other source is a config file)
MAX_CONFIG_BYTES = 1 << 20  # a config file is a small JSON object; anything larger is not one


@functools.lru_cache(maxsize=None)
def _field_types() -> Dict[str, Tuple[Any, bool]]:
    """Each key's (base type, optional) from Config's type hints: ``Optional[int]`` -> (int, True)."""
    types = {}
    for name, hint in typing.get_type_hints(Config).items():
        optional = False
        if typing.get_origin(hint) is Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"Config.{name}: unsupported type {hint} (only Optional[X] unions)")
            hint, optional = args[0], True
        if hint not in (int, float, bool, str) and not (typing.get_origin(hint) is list
                                                         and typing.get_args(hint) == (str,)):
            raise TypeError(f"Config.{name}: unsupported type {hint} (int, float, bool, str, List[str], Optional[...])")
        types[name] = (hint, optional)
    return types


def _allowed(kind: Any, optional: bool, style: str) -> str:
    """What a key accepts, in words, as ``--set`` text (style "text"), a JSON value ("json") or a
    Python value ("python")."""
    if kind is bool:
        words = {"text": "true or false (or 1/0)", "json": "true or false", "python": "a bool"}[style]
    elif kind is int:
        words = ("an integer (a JSON number without a decimal point; 16.0 is refused too)" if style == "json"
                 else "an integer")
    elif kind is float:
        words = "a number"
    elif kind is str:
        words = "a string"
    else:
        words = "a comma-separated list" if style == "text" else "a list of strings"
    return words + ({"text": " or none", "json": " or null", "python": " or None"}[style] if optional else "")


def _json_kind(value: Any) -> str:
    """The JSON type of a value, in words."""
    if value is None:
        return "null"
    for kind, words in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                        (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return words
    return f"a {type(value).__name__}"


def _shown(value: Any) -> str:
    """A value as its config file spells it (JSON), shortened, with its JSON type."""
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return shown if value is None else f"{shown} ({_json_kind(value)})"


def _matches(kind: Any, optional: bool, value: Any) -> bool:
    """Whether a Python value already has the key's type (float keys take ints; bools are no numbers)."""
    if value is None:
        return optional
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def coerce(name: str, value: Any, source: str = SET_SOURCE) -> Any:
    """The typed value of config key ``name``, from either source, by Config's type hints.

    ``source == "--set"``: ``value`` is the text after ``key=``: "none"/"null" for an Optional key,
    a comma-separated list for ``List[str]``, true/false/1/0 for a bool, ``int()``/``float()``
    parsing for numbers, any text for a string. Otherwise ``source`` is the config file the value
    was read from and ``value`` is a JSON value, typed strictly: an int key takes a JSON integer
    (not a boolean, not 16.5, not even 16.0), a float key an integer or a number (returned as a
    float), a bool key only true/false, a str key a string, a ``List[str]`` key a list of strings,
    an Optional key also null.

    Raises ValueError naming the source, the key, what it accepts and the value got, e.g.
    ``config file cfg.json: steps must be an integer ..., got "10" (a string)``.
    """
    text = source == SET_SOURCE
    where = SET_SOURCE if text else f"config file {source}"
    types = _field_types()
    if name not in types:
        raise ValueError(f"{where}: unknown config key {name!r}; valid keys: {sorted(types)}")
    kind, optional = types[name]
    if not text:
        if not _matches(kind, optional, value):
            raise ValueError(f"{where}: {name} must be {_allowed(kind, optional, 'json')}, got {_shown(value)}")
        if kind is float and value is not None:
            return float(value)
        return list(value) if isinstance(value, list) else value
    if not isinstance(value, str):
        raise TypeError(f"{SET_SOURCE} values are text, got {type(value).__name__} for {name}")
    if optional and value.lower() in ("none", "null"):
        return None
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{where}: {name} must be {_allowed(kind, optional, 'text')}, got {value!r}")
        return value.lower() in ("true", "1")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{where}: {name} must be {_allowed(kind, optional, 'text')}, got {value!r}") from None
    if kind is str:
        return value
    return [item.strip() for item in value.split(",") if item.strip()]


def _coerce(name: str, text: str) -> Any:
    """``coerce`` of ``--set`` text (kept for ``training.reproduce.job``)."""
    return coerce(name, text, SET_SOURCE)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def read_config_file(config_file) -> Dict[str, Any]:
    """The typed values of a JSON config file (an object of Config keys).

    Raises FileNotFoundError when the file does not exist, and ValueError, one line naming the
    file, when it is a directory or not a regular file, cannot be read (permission denied), is
    larger than ``MAX_CONFIG_BYTES``, is not UTF-8, is not valid JSON (with line and column),
    gives a key twice, is not a JSON object, has unknown keys or a value of the wrong JSON type
    (``coerce``).
    """
    path = Path(config_file)
    where = f"config file {path}"
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{where} is a directory, not a JSON file")
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{where} is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{where} is {info.st_size} bytes: not a config (a small JSON object, at most "
                             f"{MAX_CONFIG_BYTES} bytes)")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist") from None
    except PermissionError:
        raise ValueError(f"{where} cannot be read: permission denied") from None
    except OSError as err:
        raise ValueError(f"{where} cannot be read: {err.strerror or err}") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    content = content[1:] if content.startswith("\ufeff") else content  # a byte-order mark some editors write
    try:
        loaded = json.loads(content, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except _DuplicateKey as err:
        raise ValueError(f"{where} gives the key {err.args[0]!r} twice") from None
    except RecursionError:
        raise ValueError(f"{where} is not a config: JSON nested too deeply") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{where} must hold a JSON object ({{\"key\": value, ...}}), got {_json_kind(loaded)}")
    types = _field_types()
    unknown = sorted(set(loaded) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown config key{'s' if len(unknown) > 1 else ''} {unknown}; "
                         f"valid keys: {sorted(types)}")
    return {key: coerce(key, value, str(path)) for key, value in loaded.items()}


def parse_overrides(overrides: Optional[List[str]]) -> Dict[str, Any]:
    """The typed values of ``--set key=value`` items (``coerce`` of each text); ValueError naming the item."""
    values = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        values[key.strip()] = coerce(key.strip(), text.strip(), SET_SOURCE)
    return values


def _parse_device(device: Any):
    import torch

    if isinstance(device, str):
        try:
            return torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            pass
    raise ValueError(f"device must be a torch device like 'cpu', 'cuda' or 'cuda:0', got {device!r}")


def check_device_available(device: str) -> None:
    """Raise ValueError (one line) unless ``device`` can run here: CPU always, CUDA or MPS (and the
    device index) when this machine and this torch build have them. ``Config.validate`` checks
    only that the string is a device (a config is valid on a machine without the GPU it names)."""
    import torch

    parsed = _parse_device(device)
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"{built}); use --set device=cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                             f"(cuda:0 to cuda:{count - 1})")
        return
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available on this machine; use --set device=cpu")
        if parsed.index not in (None, 0):
            raise ValueError(f"device {device!r}: MPS has one device (mps or mps:0)")
        return
    backend = getattr(torch, parsed.type, None) if parsed.type == "xpu" else None
    if backend is not None and backend.is_available():
        count = backend.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} {parsed.type} device(s)")
        return
    raise ValueError(f"device {device!r} cannot run training here (available types: cpu, cuda, mps, xpu, "
                     "where the machine has them)")


def make_config(preset: str = "default", config_file: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults, then the preset, then a JSON file, then ``key=value`` overrides; validated.

    Every value is typed by Config's type hints (``coerce``); the file is read by
    ``read_config_file``. Raises ValueError (FileNotFoundError for a missing config file), one line.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    if config_file:
        values.update(read_config_file(config_file))
    values.update(parse_overrides(overrides))
    return Config(**values).validate()
