"""(d) Spectra of full-size conv layers: Lanczos with bounds (``method="krylov"``) against ARPACK.

Issue 13, goal 1: sigma_1 of a 64->64 3x3 zero-padded conv on 64x64 maps (an operator of
262144 x 262144) to relative 1e-6 in at most 3 s, a ``model_report`` of the 64-channel 12-layer
VResNet-feat model (64x64, zero padding) in at most 60 s and one of a BasicVSR-size model in at
most 3 minutes.

* ``test_sigma1_krylov_cpu``: pytest-benchmark of ``spectrum(..., method="krylov", k=1, tol=1e-6)``
  on that layer (a few seconds; it runs once in ``tests/test_benchmarks_run.py``).
* ``test_sigma1_table_cpu`` (slow: ARPACK takes minutes): the same layer by both methods at the
  same ``tol`` (1e-6 and 1e-8), interleaved in one process, the products each needs counted.
* ``test_model_report_table_cpu`` (slow): ``model_report`` of both models at ``tol=1e-6`` and at
  its default ``tol=1e-8``, with the bounds of every layer.

The tables write their sections of ``results/spectral_cpu.md`` (run ``pytest benchmarks -k
spectral``; the times depend on what else the machine runs).
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from srnc_ext import spectral
from srnc_ext.conv_operator import ConvGeometry
from workloads import build

RESULTS = Path(__file__).parent / "results"
REPORT = RESULTS / "spectral_cpu.md"
VRESNET_BUDGET_S, BASICVSR_BUDGET_S, LAYER_BUDGET_S = 60.0, 180.0, 3.0


def _layer(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(64, 64, 3, padding=1, bias=False)  # PyTorch's default init


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class BasicVSRLike(nn.Module):
    """The convolutions of BasicVSR (Chan et al. 2021) at 64 channels: a SPyNet level (five 7x7
    convs), two propagation branches (an input conv from features + frame, then 15 residual blocks
    of two 3x3 convs each: 30 blocks in all), the 1x1 fusion and the upsampling convs. 72 convs;
    ``model_report`` is run with every map at 64x64 (BasicVSR runs the last ones at 2x and 4x)."""

    def __init__(self, width: int = 64, blocks: int = 15) -> None:
        super().__init__()
        spy = [(8, 32), (32, 64), (64, 32), (32, 16), (16, 2)]
        self.spynet = nn.Sequential(*[nn.Conv2d(i, o, 7, padding=3) for i, o in spy])
        for name in ("backward_trunk", "forward_trunk"):
            self.add_module(name, nn.Sequential(nn.Conv2d(width + 3, width, 3, padding=1),
                                                *[_ResidualBlock(width) for _ in range(blocks)]))
        self.fusion = nn.Conv2d(2 * width, width, 1)
        self.upconv1 = nn.Conv2d(width, 4 * width, 3, padding=1)
        self.upconv2 = nn.Conv2d(width, 4 * 64, 3, padding=1)
        self.conv_hr = nn.Conv2d(64, 64, 3, padding=1)
        self.conv_last = nn.Conv2d(64, 3, 3, padding=1)


def _basicvsr(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BasicVSRLike()


def _machine() -> str:
    return (f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"(default threads: {torch.get_num_threads()}).")


def _write_section(name: str, lines) -> None:
    """Replace the ``name`` section of REPORT (between its markers), keeping the others."""
    RESULTS.mkdir(exist_ok=True)
    text = REPORT.read_text() if REPORT.exists() else "# Spectra of full-size conv layers on the CPU\n"
    block = f"<!-- {name} -->\n" + "\n".join(lines) + f"\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    REPORT.write_text(text if text.endswith("\n") else text + "\n")


class _Counting:
    """A ConvGeometry whose ``apply``/``adjoint`` count the vectors they are given."""

    def __init__(self, geometry: ConvGeometry) -> None:
        self._geometry, self.count = geometry, 0

    def __getattr__(self, name):
        return getattr(self._geometry, name)

    def apply(self, kernel, x):
        self.count += x.shape[0]
        return self._geometry.apply(kernel, x)

    def adjoint(self, kernel, y):
        return self._geometry.adjoint(kernel, y)


def test_sigma1_krylov_cpu(benchmark):
    benchmark.group = "sigma1-64ch-64x64-cpu"
    conv = _layer()
    result = benchmark.pedantic(lambda: spectral.spectrum(conv, 64, method="krylov", k=1, tol=1e-6),
                                rounds=3, iterations=1, warmup_rounds=0)
    assert result.converged and float(result.upper[0] - result.lower[0]) <= 1e-6 * float(result.lower[0])


def _time(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@contextlib.contextmanager
def _threads(count):
    """torch's intra-op threads set to ``count`` (None: left as they are), restored after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


_SIGMA1_HEADER = [
    "## sigma_1 of one layer: Lanczos (`krylov`) against ARPACK, same `tol`",
    "",
    "`nn.Conv2d(64, 64, 3, padding=1)` (PyTorch's default init, seed 0) on 64x64 maps: an operator of "
    "262144 x 262144. krylov: median of 3 runs; ARPACK (`scipy.sparse.linalg.svds`, the same `tol`): one run "
    "between them, same threads. Products: of `W^T W`, one vector each (`apply` calls counted). Load: the "
    "1-minute load average when the row finished (other agents' jobs share the cores). " + _machine(),
    "",
    "| tol | threads | method | time (s) | products | sigma_1 | bounds | relative width | speed-up | load |",
    "|---|---|---|---:|---|---|---|---:|---:|---:|",
]
_SIGMA1_FOOTER = ["", f"Goal: sigma_1 to 1e-6 in at most {LAYER_BUDGET_S:g} s. Command: `.venv/bin/python -m pytest -q "
                  "-p no:cacheprovider benchmarks/test_spectral_speed.py -k sigma1_table -s` (torch's default "
                  "threads, then 1 thread)."]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [None, 1], ids=["default-threads", "1-thread"])
def test_sigma1_table_cpu(threads):
    from srnc_ext.spectral_iterative import top_singular_values

    conv = _layer()
    geometry = ConvGeometry.from_conv(conv, 64)
    kernel = conv.weight.detach().double()
    with _threads(threads) as count:
        for tol in (1e-6, 1e-8):
            krylov = []
            for round_ in range(3):  # interleaved: krylov, arpack (once: minutes), krylov, krylov
                counting = _Counting(geometry)
                seconds, found = _time(lambda: top_singular_values(counting, kernel, 1, tol))
                krylov.append((seconds, found, counting.count))
                if round_ == 0:
                    counting = _Counting(geometry)
                    a_time, values = _time(lambda: spectral.arpack_singular_values(counting, kernel, 1, tol))
                    a_value, a_products = float(values[0]), counting.count
            k_time = statistics.median(t for t, _, _ in krylov)
            _, found, k_products = krylov[0]
            lower, upper = float(found.lower[0]), float(found.upper[0])
            load = f"{os.getloadavg()[0]:.1f}"
            _write_row("sigma1", _SIGMA1_HEADER, _SIGMA1_FOOTER, 3, (
                f"| {tol:g} | {count} | krylov | {k_time:.2f} | {k_products} ({found.float64_products} float64) | "
                f"{float(found.values[0]):.12f} | [{lower:.12f}, {upper:.12f}] | {(upper - lower) / lower:.1e} | "
                f"{a_time / k_time:.1f} | {load} |"))
            _write_row("sigma1", _SIGMA1_HEADER, _SIGMA1_FOOTER, 3, (
                f"| {tol:g} | {count} | arpack | {a_time:.2f} | {a_products} (float64) | {a_value:.12f} | "
                f"inside krylov's: {lower <= a_value <= upper} | | 1.0 | {load} |"))
            assert found.converged and lower <= a_value * (1 + 1e-12) and a_value <= upper * (1 + 1e-12)
    print(REPORT.read_text())


def _report_rows(model, tol):
    """``model_report`` timed, with the IterativeResult of every layer Lanczos ran on."""
    found = []
    original = spectral.top_singular_values

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        found.append(result)
        return result

    spectral.top_singular_values = recording
    try:
        seconds, rows = _time(lambda: spectral.model_report(model, 64, tol=tol))
    finally:
        spectral.top_singular_values = original
    return seconds, rows, found


MODELS = {"vresnet": ("VResNet-feat, 64 channels (12 convs)", lambda: build("plain", 64, 64), VRESNET_BUDGET_S),
          "basicvsr": ("BasicVSR-like, 64 channels (72 convs)", _basicvsr, BASICVSR_BUDGET_S)}
_MODEL_HEADER = [
    "## `model_report` of whole models (every map 64x64, zero padding)",
    "",
    "One run per row, `method='auto'` (Lanczos for every layer beyond the dense-SVD budget). Products: of "
    "`W^T W`, all layers. Widest bounds: the largest `(upper - lower) / lower` over the layers. Load: the "
    "1-minute load average when the row finished (other agents' jobs share the cores). " + _machine(),
    "",
    "| model | tol | threads | time (s) | budget (s) | within | methods | products | widest bounds | slowest layer (s) | load |",
    "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|",
]
_MODEL_FOOTER = ["", "Command (one row each): `.venv/bin/python -m pytest -q -p no:cacheprovider "
                 "benchmarks/test_spectral_speed.py -k 'model_report_table and vresnet and 1e-06 and 1-thread' -s`."]


def _write_row(name: str, header, footer, key_cells: int, row: str) -> None:
    """Put ``row`` into the table of section ``name``, replacing the row with the same first ``key_cells`` cells."""
    old = REPORT.read_text() if REPORT.exists() else ""
    found = re.search(rf"<!-- {re.escape(name)} -->\n(.*?)\n<!-- /{re.escape(name)} -->", old, re.S)
    rows = [line for line in (found.group(1).splitlines() if found else [])
            if line.startswith("| ") and line not in header]
    keyed = {"|".join(line.split("|")[1:1 + key_cells]): line for line in rows}
    keyed["|".join(row.split("|")[1:1 + key_cells])] = row
    _write_section(name, header + list(keyed.values()) + footer)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [None, 1], ids=["default-threads", "1-thread"])
@pytest.mark.parametrize("tol", [1e-6, 1e-8])
@pytest.mark.parametrize("which", list(MODELS))
def test_model_report_table_cpu(which, tol, threads):
    name, make, budget = MODELS[which]
    model = make()
    per_layer = []
    original = spectral.spectrum

    def timed(*args, **kwargs):
        seconds, result = _time(lambda: original(*args, **kwargs))
        per_layer.append(seconds)
        return result

    spectral.spectrum = timed
    try:
        with _threads(threads) as count:
            seconds, rows, found = _report_rows(model, tol)
    finally:
        spectral.spectrum = original
    methods = sorted({r.method for r in rows})
    widest = max(r.relative_gap for r in found)
    row = (f"| {name} | {tol:g} | {count} | {seconds:.1f} | {budget:g} | {seconds <= budget} | {', '.join(methods)} "
           f"| {sum(r.products for r in found)} | {widest:.1e} | {max(per_layer):.2f} | {os.getloadavg()[0]:.1f} |")
    _write_row("model_report", _MODEL_HEADER, _MODEL_FOOTER, 3, row)
    print(row)
    assert len(found) == sum(r.method == "krylov" for r in rows) and all(r.converged for r in found)
    assert widest <= tol
