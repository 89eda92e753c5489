"""Compiled mode (issue 13, goal 3): ``torch.compile`` of a converted model against the compiled plain one.

On the CPU workload of ``test_train_step.py`` (vresnet-feat, 32 channels, batch 4, 7 frames, 32x32),
in one process: the eager and compiled step times of plain and SRN-C (alpha 2, beta 0.1, and
beta 1), the first compiled step of each (compilation included, Inductor's caches off), and Dynamo's frame compilations
over a train -> eval -> train -> eval switch. The goals: compiled SRN-C / compiled plain at most the
eager ratio; at most two recompilations for the switch; the first compiled step at most 2x plain's.
``test_compiled_table`` writes ``benchmarks/results/compiled_step_cpu.md``.
"""
import copy
import platform
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from workloads import available_srnc_kinds, build, make_step

RESULTS = Path(__file__).parent / "results"
CPU = dict(width=32, batch=4, frames=7, size=32, device="cpu")


def _timed_steps(kind: str, compiled: bool, rounds: int):
    # Inductor's on-disk caches off: every kind compiles from scratch, as on a fresh machine (with
    # them on, a plain graph compiled by an earlier run loads in 1 s while the run-to-run cost of
    # Dynamo's tracing stays, which made the first-step ratio a measure of the cache)
    with torch._inductor.config.patch(force_disable_caches=True):
        return _timed_steps_uncached(kind, compiled, rounds)


def _timed_steps_uncached(kind: str, compiled: bool, rounds: int):
    torch._dynamo.reset()
    counters.clear()
    model = build(kind, CPU["width"], CPU["size"], CPU["device"])
    runner = torch.compile(model) if compiled else model
    step = make_step(runner, CPU["batch"], CPU["frames"], CPU["size"], CPU["device"])
    # make_step built its optimizer on runner.parameters(): the same Parameters as model's
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if not times:
        return first, None, None
    frames_before = counters["stats"]["unique_graphs"]
    clip = torch.rand(1, CPU["frames"], 3, CPU["size"], CPU["size"])
    for mode in ("eval", "train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            runner(clip)
    model.train()
    switches = counters["stats"]["unique_graphs"] - frames_before
    return first, statistics.median(times), switches


ROUNDS = 15  # interleaved rounds of the step-time phase


def _interleaved_ratios(kinds, rounds: int):
    """``{kind: (eager s, compiled s, eager ratio, compiled ratio)}``: every kind eager and compiled,
    built and warmed up side by side, then ``rounds`` rounds of one step each, in turn (drift
    affects every kind alike); times: medians, ratios: the median over rounds of the step over
    plain's in the same round and mode."""
    torch._dynamo.reset()
    steps = {}
    for kind in kinds:
        for compiled in (False, True):
            model = build(kind, CPU["width"], CPU["size"], CPU["device"])
            steps[(kind, compiled)] = make_step(torch.compile(model) if compiled else model, CPU["batch"],
                                                CPU["frames"], CPU["size"], CPU["device"])
            for _ in range(2):  # compilation, then the first refresh-carrying steps
                steps[(kind, compiled)]()
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    result = {}
    for kind in kinds:
        ratios = [statistics.median(a / b for a, b in zip(times[(kind, c)], times[("plain", c)])) for c in (False, True)]
        result[kind] = (statistics.median(times[(kind, False)]), statistics.median(times[(kind, True)]), *ratios)
    return result


def test_compiled_table():
    srnc = available_srnc_kinds("cpu")[0]
    kinds = ["plain", srnc, srnc + "-beta1"]
    rows = {}
    _timed_steps("plain", True, rounds=0)  # the process's one-time compiler start-up, counted for no kind
    for kind in kinds:  # each compiled from scratch on its own: first step and the mode switches
        compiled_first, _, switches = _timed_steps(kind, True, rounds=1)
        rows[kind] = dict(compiled_first=compiled_first, switches=switches)
    for kind, (eager, compiled, eager_ratio, compiled_ratio) in _interleaved_ratios(kinds, ROUNDS).items():
        rows[kind].update(eager=eager, compiled=compiled, eager_ratio=eager_ratio, compiled_ratio=compiled_ratio)
    plain = rows["plain"]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Workload: {CPU}. Step times: every kind eager and compiled built "
        f"side by side, then {ROUNDS} interleaved rounds of one step each; times are medians, ratios the median "
        "over rounds of the step over plain's in the same round and mode. First compiled step: each kind compiled "
        "alone from scratch, Inductor's on-disk caches off (a fresh machine).",
        "",
        "| kind | eager step (ms) | eager ratio | compiled step (ms) | compiled ratio | first compiled step (s) | "
        "first-step ratio | graphs compiled by train->eval->train->eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {1e3 * r['eager']:.1f} | {r['eager_ratio']:.3f} | {1e3 * r['compiled']:.1f} | "
                     f"{r['compiled_ratio']:.3f} | {r['compiled_first']:.1f} | "
                     f"{r['compiled_first'] / plain['compiled_first']:.2f} | {r['switches']} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compiled_step_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert all(r["compiled"] > 0 for r in rows.values())


def test_compiled_srnc_step_runs():
    """The benchmark body once (what ``tests/test_benchmarks_run.py`` checks runs)."""
    srnc = available_srnc_kinds("cpu")[0]
    model = build(srnc, 8, 16, "cpu")
    step = make_step(torch.compile(copy.deepcopy(model)), 1, 2, 16, "cpu")
    assert torch.isfinite(step())
