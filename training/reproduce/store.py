"""The reproduce folder's cache: atomic JSON files and the folder's configuration check.

Nothing is ever half-written: every file goes through a temporary file in the same folder, then
``os.replace``. A folder remembers the configuration it was made with (``reproduce.json``); a
rerun with another configuration is refused with the first differing key named, so cached models
and measurements are never mixed across configurations. Files are read as JSON (data only).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

from ..run_folder import LOCK_NAME, write_text_atomic


def _clean(value):
    """JSON has no inf/nan: store them as strings ("inf", "-inf", "nan")."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value


def _restore(value):
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def write_json(path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    return write_text(path, json.dumps(_clean(data), indent=1))


def write_text(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)


def read_json(path) -> Optional[Any]:
    """The JSON content of ``path`` (inf/nan strings restored), or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    return _restore(json.loads(path.read_text()))


def first_difference(saved: Dict, current: Dict, prefix: str = "") -> Optional[str]:
    """The first key (dotted for nested dicts) whose value differs, or None."""
    for key in list(current) + [k for k in saved if k not in current]:
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif _clean(a) != _clean(b):
            return f"{prefix}{key}"
    return None


def _lookup(data: Dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part, "<absent>") if isinstance(data, dict) else "<absent>"
    return data


def claim_folder(folder, identity: Dict) -> Path:
    """Make ``folder`` a reproduce folder for ``identity`` (the configuration), or check that it is
    one already; raise ``ValueError`` naming the first differing key otherwise."""
    folder = Path(folder)
    path = folder / "reproduce.json"
    saved = read_json(path)
    if saved is None:
        if folder.is_dir() and any(item.name != LOCK_NAME for item in folder.iterdir()):
            raise ValueError(f"{folder} is not empty and is not a reproduce folder (no reproduce.json): "
                             "choose another --out")
        write_json(path, identity)
        return folder
    key = first_difference(saved, _restore(json.loads(json.dumps(_clean(identity)))))
    if key is not None:
        raise ValueError(f"{folder} was made with another configuration: {key}={_lookup(saved, key)!r} there, "
                         f"{_lookup(identity, key)!r} now; refusing to resume (use another --out)")
    return folder
