"""Atomic checkpoints: a crash or Ctrl-C during a save leaves the previous checkpoint intact.

Loading never unpickles code (``weights_only=True``) and refuses a foreign or damaged file with a
one-line ``CheckpointError`` naming the file and what is wrong; ``check_against`` compares what
a checkpoint would load with the model and optimizer it is meant for, before anything is loaded
or allocated.
"""
from __future__ import annotations

import os
import pickle
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

# what a checkpoint of training.train holds: key -> (type, in words)
TRAINING_KEYS = {"model": (dict, "a dict of tensors"), "optimizer": (dict, "a dict (an optimizer state_dict)"),
                 "scheduler": (dict, "a dict (a scheduler state_dict)"), "step": (int, "an integer >= 0"),
                 "method": (str, "a string"), "config": (dict, "a dict")}
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message (one line) names the file and what is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at that path (also a FileNotFoundError, as before)."""


def save_checkpoint(path, state: Dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _refusal(err: BaseException) -> Optional[str]:
    """What weights-only loading refused (None when ``err`` is not such a refusal): the pickled
    global ("GLOBAL module.name") or torch's one-line reason."""
    text = str(err)
    if not (isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"GLOBAL {found.group(1)}"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return lines[0][:200] if lines else "an unsupported pickle"


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def load_checkpoint(path, map_location="cpu", *, training: bool = True) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (never unpickles code).

    ``training``: also check that it is a checkpoint of ``training.train``: a dict holding
    ``model`` (a dict of tensors), ``optimizer``, ``scheduler`` and ``config`` (dicts, the
    optimizer's with ``state`` and ``param_groups``), ``step`` (an int >= 0), ``method`` (a str)
    and, when present, ``log`` (a list of dicts). Other keys are kept as they are.

    Raises ``CheckpointError`` (a ValueError; ``CheckpointNotFoundError``, also a
    FileNotFoundError, when there is no file), one line naming the file: missing, a directory,
    unreadable, empty, truncated or not a PyTorch file, a pickle that weights-only loading refuses
    (refused as unsafe, not executed), not a dict, a missing or ill-typed key.
    """
    path = Path(path)
    where = f"checkpoint {path}"
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{where} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"{where} cannot be read: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{where} is a directory, not a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{where} is not a regular file")
    if info.st_size == 0:
        raise CheckpointError(f"{where} is empty (0 bytes): not a checkpoint (an interrupted copy?)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except PermissionError:
        raise CheckpointError(f"{where} cannot be read: permission denied") from None
    except OSError as err:
        raise CheckpointError(f"{where} cannot be read: {err.strerror or err}") from None
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises RuntimeError, UnpicklingError, EOFError, KeyError...
        refused = _refusal(err)
        if refused is not None and refused.startswith("GLOBAL "):
            raise CheckpointError(f"{where} was refused as unsafe: it pickles {refused}, which weights-only "
                                  "loading does not allow (nothing in it was executed)") from None
        if refused is not None and head == _ZIP_MAGIC:
            raise CheckpointError(f"{where} was refused by weights-only loading ({refused}); nothing in it was "
                                  "executed") from None
        if refused is not None:
            raise CheckpointError(f"{where} is not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                                  f"legacy torch.save file: {refused})") from None
        if head == _ZIP_MAGIC:
            raise CheckpointError(f"{where} is truncated or corrupt ({info.st_size} bytes; "
                                  f"{_first_line(err)[:200]})") from None
        raise CheckpointError(f"{where} is not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                              f"legacy torch.save file; {_first_line(err)[:200]})") from None
    if training:
        _check_training(saved, where)
    return saved


def _check_training(saved: Any, where: str) -> None:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} holds {_kind(saved)}, not a training checkpoint (a dict with keys "
                              f"{', '.join(TRAINING_KEYS)})")
    missing = [key for key in TRAINING_KEYS if key not in saved]
    if missing:
        raise CheckpointError(f"{where} is not a training checkpoint: it lacks the key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(map(repr, missing))} (it has {', '.join(map(repr, map(str, saved))) or 'none'})")
    for key, (kind, words) in TRAINING_KEYS.items():
        value = saved[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{where}: {key} must be {words}, got {_kind(value)}")
    if saved["step"] < 0:
        raise CheckpointError(f"{where}: step must be an integer >= 0, got {saved['step']}")
    for name, value in saved["model"].items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: model must be a dict of tensors, got {_kind(value)} at {name!r}")
    optimizer = saved["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise CheckpointError(f"{where}: optimizer must be an optimizer state_dict (with a dict 'state' and a list "
                              f"'param_groups'), got the keys {sorted(map(str, optimizer))}")
    for i, group in enumerate(optimizer["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"{where}: optimizer param_groups[{i}] must be a dict with a list 'params', "
                                  f"got {_kind(group)}")
    if "log" in saved:
        log = saved["log"]
        if not isinstance(log, list):
            raise CheckpointError(f"{where}: log must be a list of dicts, got {_kind(log)}")
        for i, record in enumerate(log):
            if not isinstance(record, dict):
                raise CheckpointError(f"{where}: log must be a list of dicts, got {_kind(record)} at log[{i}]")


def _dtype_kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.is_complex():
        return "complex"
    return "floating point" if tensor.is_floating_point() else "integer"


def storage_shortfall(tensor: torch.Tensor) -> Optional[str]:
    """Why ``tensor`` is not dense enough to load, or None: not a strided tensor, or a storage that
    holds fewer elements than its shape has (a stride-0 expanded tensor claiming a huge shape: a
    tiny file that would make the loader allocate the whole shape)."""
    if tensor.layout != torch.strided:
        return f"a {tensor.layout} tensor, not a dense one"
    try:
        held = tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor without an accessible storage: nothing to judge
        return None
    needed = tensor.numel() * tensor.element_size()
    if held < needed:
        return (f"its storage holds {held // max(tensor.element_size(), 1)} element(s) but its shape "
                f"{tuple(tensor.shape)} needs {tensor.numel()} (an expanded or crafted tensor)")
    return None


def check_against(saved: Dict[str, Any], model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                  path) -> None:
    """Raise ``CheckpointError`` (one line naming ``path``) unless ``saved`` (from ``load_checkpoint``)
    fits ``model`` and ``optimizer`` exactly; nothing is loaded or allocated.

    The model: the same state_dict keys (the first missing or unexpected one named), every tensor
    of the model's shape and kind of dtype (floating point, integer, bool, complex) and dense
    (``storage_shortfall``). The optimizer (skipped when None): as many param groups and params per
    group, every state entry for one of those params, its tensors dense and of its parameter's
    shape (a scalar such as Adam's ``step`` allowed).
    """
    where = f"checkpoint {path}"
    own = model.state_dict()
    incoming = saved["model"]
    missing = [key for key in own if key not in incoming]
    if missing:
        raise CheckpointError(f"{where} does not fit the model: it lacks the model key {missing[0]!r}"
                              + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
    unexpected = [key for key in incoming if key not in own]
    if unexpected:
        raise CheckpointError(f"{where} does not fit the model: unexpected model key {unexpected[0]!r}"
                              + (f" ({len(unexpected)} unexpected)" if len(unexpected) > 1 else ""))
    for key, expected in own.items():
        tensor = incoming[key]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{where}: model key {key!r} holds {_kind(tensor)}, not a tensor")
        if tuple(tensor.shape) != tuple(expected.shape):
            raise CheckpointError(f"{where} does not fit the model: {key!r} has shape {tuple(tensor.shape)} there, "
                                  f"{tuple(expected.shape)} in the model")
        if _dtype_kind(tensor) != _dtype_kind(expected):
            raise CheckpointError(f"{where} does not fit the model: {key!r} is {_dtype_kind(tensor)} ({tensor.dtype}) "
                                  f"there, {_dtype_kind(expected)} ({expected.dtype}) in the model")
        short = storage_shortfall(tensor)
        if short:
            raise CheckpointError(f"{where}: model key {key!r} is refused: {short}")
    if optimizer is not None:
        _check_optimizer(saved["optimizer"], optimizer, where)


def _check_optimizer(state: Dict[str, Any], optimizer: torch.optim.Optimizer, where: str) -> None:
    groups, own_groups = state["param_groups"], optimizer.param_groups
    if len(groups) != len(own_groups):
        raise CheckpointError(f"{where} does not fit the optimizer: {len(groups)} param group(s) there, "
                              f"{len(own_groups)} here")
    params = {}  # saved parameter id -> this optimizer's parameter (the order load_state_dict maps them in)
    for g, (group, own_group) in enumerate(zip(groups, own_groups)):
        if len(group["params"]) != len(own_group["params"]):
            raise CheckpointError(f"{where} does not fit the optimizer: param group {g} has "
                                  f"{len(group['params'])} params there, {len(own_group['params'])} here")
        for index, param in zip(group["params"], own_group["params"]):
            if not isinstance(index, int) or isinstance(index, bool) or index in params:
                raise CheckpointError(f"{where}: optimizer param group {g} lists an invalid or repeated "
                                      f"param id {index!r}")
            params[index] = param
    for index, entry in state["state"].items():
        if index not in params:
            raise CheckpointError(f"{where}: optimizer state for param id {index!r}, which no param group lists")
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: optimizer state of param {index} must be a dict, got {_kind(entry)}")
        param = params[index]
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() != 0 and tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{where} does not fit the optimizer: state {name!r} of param {index} has shape "
                                      f"{tuple(value.shape)} there, the parameter has {tuple(param.shape)}")
            short = storage_shortfall(value)
            if short:
                raise CheckpointError(f"{where}: optimizer state {name!r} of param {index} is refused: {short}")
