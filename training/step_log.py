"""Step logs (``log.jsonl``, ``log.csv``, TensorBoard when installed) that never disagree with the
checkpoint.

The records live in the checkpoint (``"log"``) and reach the files only after the checkpoint that
holds them is on disk, each line in one write. On resume the files are rebuilt from the
checkpoint's records (atomically), so whatever moment a run was killed at, the logs of the
resumed run hold every step up to the checkpoint exactly once, the CSV with its header.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

from .run_folder import write_text_atomic

FIELDS = ("step", "loss", "lr", "seconds")
LOG_FILES = ("log.jsonl", "log.csv")


def _csv_line(record: Dict) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow([record["step"], record["loss"], record["lr"], round(record["seconds"], 3)])
    return buffer.getvalue()


def _csv_header() -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(FIELDS)
    return buffer.getvalue()


def _jsonl_line(record: Dict) -> str:
    return json.dumps({k: record[k] for k in FIELDS}) + "\n"


def records_from_files(folder: Path, up_to: int) -> List[Dict]:
    """The whole, parseable ``log.jsonl`` records with ``step <= up_to`` (checkpoints written
    before the records moved into them), each step once."""
    path = Path(folder) / "log.jsonl"
    if not path.is_file():
        return []
    records, seen = [], set()
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if (isinstance(record, dict) and set(FIELDS) <= set(record) and isinstance(record["step"], int)
                and record["step"] <= up_to and record["step"] not in seen):
            seen.add(record["step"])
            records.append({k: record[k] for k in FIELDS})
    return records


class StepLog:
    """The records of one training run and the files they are written to."""

    def __init__(self, folder, records: Optional[List[Dict]] = None, *, write: bool = True, resume: bool = False):
        """``records``: those of the checkpoint resumed from; with ``resume`` the files are rebuilt
        from them now, else they are made at the first ``flush`` (after the first checkpoint)."""
        self.folder = Path(folder)
        self.records: List[Dict] = list(records or [])
        self._written = 0
        self._write = write
        self._made = False
        self._tb = None
        if write and resume:
            self._rebuild()

    def add(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.records.append({"step": int(step), "loss": float(loss) if math.isfinite(loss) else str(loss),
                             "lr": float(lr), "seconds": float(seconds)})

    def _rebuild(self) -> None:
        """Write the files from the records (the state at the checkpoint), replacing what is there."""
        write_text_atomic(self.folder / "log.jsonl", "".join(_jsonl_line(r) for r in self.records))
        write_text_atomic(self.folder / "log.csv", _csv_header() + "".join(_csv_line(r) for r in self.records))
        self._written = len(self.records)
        self._made = True
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: JSONL/CSV only
            return
        # purge_step=0: TensorBoard drops what earlier sessions wrote for these steps; rewrite them all
        self._tb = SummaryWriter(str(self.folder / "tensorboard"), purge_step=0 if self.records else None)
        for record in self.records:
            self._tb_add(record)
        self._tb.flush()

    def _tb_add(self, record: Dict) -> None:
        if isinstance(record["loss"], float):
            self._tb.add_scalar("loss", record["loss"], record["step"])
        self._tb.add_scalar("lr", record["lr"], record["step"])

    def flush(self) -> None:
        """Append the records not yet in the files (call right after the checkpoint holding them)."""
        if not self._write or (self._made and self._written == len(self.records)):
            return
        if not self._made:
            return self._rebuild()
        new = self.records[self._written:]
        for name, line in (("log.jsonl", _jsonl_line), ("log.csv", _csv_line)):
            with open(self.folder / name, "a", newline="") as f:
                f.write("".join(line(r) for r in new))  # one write: lines land whole
                f.flush()
                os.fsync(f.fileno())
        if self._tb is not None:
            for record in new:
                self._tb_add(record)
            self._tb.flush()
        self._written = len(self.records)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
