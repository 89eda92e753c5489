"""The first eager training step of a converted model against a plain one (issue 13, goal 4).

``convert(model, input_size=...)`` warms every layer's power iteration up on the spot; that cost
belongs to the first step. Timed in one process: the plain model's first step, and for SRN-C at
beta = 1 and beta = 0.1 ``convert`` + the first step, then the second step; "symbol" is the warm-up of
``srnc_ext.warm_start`` (symbol start + ``SYMBOL_WARMUP_ITERATIONS`` full-map iterations), "random"
the previous one (random start + ``WARMUP_ITERATIONS``), forced by turning the symbol start off.
Tracking: ``sigma_1(W_eff) / alpha`` right after ``convert``, exact (``srnc_ext.spectral``, tol 1e-8),
the largest over the layers measured. ``test_first_step_table`` writes
``benchmarks/results/first_step_cpu.md``.
"""
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

import srnc_ext
from srnc_ext import spectral, warm_start
from workloads import build, make_step

RESULTS = Path(__file__).parent / "results"
# issue 13's BasicVSR-like trunk (62 convs of 64 channels) and the small workload of train_step_cpu.md
BIG = dict(width=64, batch=1, frames=5, size=64, depth=30)
SMALL = dict(width=32, batch=4, frames=7, size=32, depth=None)
SETTINGS = {"beta=1": (1.0, 1.0), "beta=0.1": (2.0, 0.1)}  # (alpha, beta), as workloads.py's srnc kinds


def _srnc_layers(model):
    return [m for m in model.modules() if isinstance(m, srnc_ext.SRNCLayer)]


def _run(config, setting=None, start="symbol", track_every=None):
    """``(convert s, first step s, second step s, max sigma_1(W_eff)/alpha or None)`` for one fresh model."""
    model = build("plain", config["width"], config["size"], depth=config["depth"])
    convert_s, tracking = 0.0, None
    if setting is not None:
        alpha, beta = SETTINGS[setting]
        original = warm_start.layer_starts
        if start == "random":
            warm_start.layer_starts = lambda layers: [None] * len(layers)
        try:
            began = time.perf_counter()
            srnc_ext.convert(model, alpha=alpha, beta=beta, input_size=config["size"])
            convert_s = time.perf_counter() - began
        finally:
            warm_start.layer_starts = original
        if track_every:
            layers = _srnc_layers(model)[::track_every]
            tracking = max(spectral.spectral_norm(layer, tol=1e-8) / layer.alpha for layer in layers)
    step = make_step(model, config["batch"], config["frames"], config["size"])
    times = []
    for _ in range(2):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return convert_s, times[0], times[1], tracking


def test_first_step_smoke():
    """One tiny case end to end, and the symbol start is the one used."""
    config = dict(width=8, batch=1, frames=2, size=16, depth=1)
    convert_s, first, second, tracking = _run(config, "beta=0.1", track_every=1)
    assert convert_s > 0 and first > 0 and second > 0
    assert tracking == pytest.approx(1.0, abs=2e-2)
    model = build("plain", 8, 16, depth=1)
    srnc_ext.convert(model, alpha=1.0, input_size=16)
    assert all(warm_start.layer_start(layer) is not None for layer in _srnc_layers(model))


ROUNDS = 3  # interleaved rounds of every row; medians over them


def _table(config, name, track_every):
    samples = {"plain": []}
    for round_ in range(ROUNDS):  # interleaved, so drift affects every row alike
        samples["plain"].append(_run(config))
        for setting in SETTINGS:
            for start in ("symbol", "random"):
                samples.setdefault((setting, start), []).append(_run(config, setting, start, track_every if round_ == 0 else None))
    plain = samples.pop("plain")
    plain_first = statistics.median(p[1] for p in plain)
    plain_second = statistics.median(p[2] for p in plain)
    lines = [
        f"### {name}: {config}",
        "",
        f"plain: first step {plain_first:.2f} s, second {plain_second:.2f} s (median of {ROUNDS}; first steps: "
        f"{', '.join(f'{p[1]:.2f}' for p in plain)} s).",
        "",
        "| setting | warm-up | convert (s) | first step (s) | convert + first step / plain first | "
        "second step / plain second | max sigma_1(W_eff)/alpha after convert |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = {}
    for (setting, start), runs in samples.items():
        # per round: this row's convert + first step over the plain first step of the same round
        ratio = statistics.median((r[0] + r[1]) / p[1] for r, p in zip(runs, plain))
        second = statistics.median(r[2] / p[2] for r, p in zip(runs, plain))
        convert_s, first = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        tracking = runs[0][3]
        rows[(setting, start)] = (convert_s, first, ratio, tracking)
        lines.append(f"| {setting} | {start} | {convert_s:.2f} | {first:.2f} | {ratio:.2f} | {second:.2f} | "
                     f"{tracking:.5f} |")
    return lines, rows


def test_first_step_table():
    from srnc_ext.module import SYMBOL_WARMUP_ITERATIONS, WARMUP_ITERATIONS

    device = platform.processor() or platform.machine()
    lines = [
        "# First eager step of a converted model (CPU)",
        "",
        f"Machine: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads. One process, {ROUNDS} "
        "interleaved rounds of every row (a fresh model each run): medians of the times, ratios the median of "
        "each round's ratio to that round's plain run. A run: convert with input_size, then two training steps (forward over the frames, "
        "backward, Adam step with the refresh). warm-up 'symbol': symbol start + "
        f"{SYMBOL_WARMUP_ITERATIONS} iteration(s); 'random': random start + {WARMUP_ITERATIONS} iterations (the "
        "previous warm-up). Tracking: exact sigma_1 (srnc_ext.spectral, tol 1e-8) of the effective weight right "
        "after convert, max over the layers measured (every layer of the small workload, every 10th of the big one).",
        "",
    ]
    all_rows = {}
    for config, name, every in ((BIG, "BasicVSR-like trunk", 10), (SMALL, "small workload", 1)):
        table, rows = _table(config, name, every)
        lines += table + [""]
        all_rows[name] = rows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first_step_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    for rows in all_rows.values():
        assert all(r[0] > 0 and r[1] > 0 for r in rows.values())
