"""(a) training-step time and (d) memory of the recurrent model, as ratios to plain nn.Conv2d.

CPU: 32 channels, batch 4, 7 frames, 32x32 (srnc-notes 4). GPU (``gpu`` marker, skipped
without one): the paper's scale, 64 channels, batch 32, 7 frames, 64x64. Each kind is timed
with pytest-benchmark; ``test_ratio_table`` re-times all kinds interleaved in one process
(median of rounds) and writes the table to ``benchmarks/results/``. Its ratio is the median over
rounds of each round's step time over plain's in the same round: on a shared machine, load
bursts then hit both sides of a ratio alike.
"""
import json
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

from workloads import available_srnc_kinds, build, make_step, saved_activation_bytes

RESULTS = Path(__file__).parent / "results"
CPU = dict(width=32, batch=4, frames=7, size=32, device="cpu")
GPU = dict(width=64, batch=32, frames=7, size=64, device="cuda")
# issue 13: video restoration trains at small batches of large crops; a BasicVSR-like 30-block trunk
CPU_BATCH1 = dict(width=64, batch=1, frames=5, size=64, device="cpu", depth=30)
BASE_KINDS = ["plain", "torch_sn", "per_call"]


def _kinds(device):
    return BASE_KINDS + available_srnc_kinds(device)


def _step(kind, config):
    model = build(kind, config["width"], config["size"], config["device"], depth=config.get("depth"))
    step = make_step(model, config["batch"], config["frames"], config["size"], config["device"])
    step()  # warm up (materialization, allocator, first refresh)
    return step


@pytest.mark.parametrize("kind", _kinds("cpu"))
def test_train_step_cpu(benchmark, kind):
    benchmark.group = "train-step-cpu"
    benchmark.pedantic(_step(kind, CPU), rounds=5, iterations=1)


def _ratio_table(config, rounds, name, kinds=None):
    kinds = kinds or _kinds(config["device"])
    steps = {kind: _step(kind, config) for kind in kinds}
    times = {kind: [] for kind in kinds}
    optimizer_times = {kind: [] for kind in kinds}
    for _ in range(rounds):  # interleaved, so drift affects every kind alike
        for kind, step in steps.items():
            start = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - start)
            optimizer_times[kind].append(step.optimizer_s)
    memory = {}
    for kind, step in steps.items():
        if config["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            memory[kind] = torch.cuda.max_memory_allocated()
        else:
            memory[kind] = saved_activation_bytes(step)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(t / p for t, p in zip(v, times["plain"])) for k, v in times.items()}
    # the amortized refresh (refresh_every = k) costs its refresh on one step in k: the mean over whole
    # cycles (rounds a multiple of k) is its cost per step, the median that of the steps without one
    mean_ratio = {k: sum(v) / sum(times["plain"]) for k, v in times.items()}
    optimizer = {k: statistics.median(v) for k, v in optimizer_times.items()}
    device = torch.cuda.get_device_name() if config["device"] == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"Machine: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads. Workload: {config}, "
        f"median of {rounds} interleaved steps; ratio: median of the per-round ratios to plain; mean ratio: total "
        "time over plain's (the cost per step of an amortized refresh).",
        "",
        "| kind | step time (ms) | ratio to plain | mean ratio | optimizer step incl. refresh (ms) | memory (MiB) | "
        "memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        lines.append(f"| {kind} | {1e3 * median[kind]:.1f} | {ratio[kind]:.3f} | {mean_ratio[kind]:.3f} | "
                     f"{1e3 * optimizer[kind]:.1f} | {memory[kind] / 2**20:.1f} | {memory[kind] / memory['plain']:.3f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"config": config, "device": device, "median_s": median, "ratio": ratio,
                                                      "mean_ratio": mean_ratio,
                                                      "optimizer_median_s": optimizer, "memory_bytes": memory}, indent=1))
    print("\n".join(lines))
    return median


def test_ratio_table_cpu():
    srnc = available_srnc_kinds("cpu")[0]
    kinds = _kinds("cpu") + [srnc + "-every4", srnc + "-beta1-every4"]
    median = _ratio_table(CPU, rounds=16, name="train_step_cpu", kinds=kinds)  # whole refresh cycles of 4
    assert all(v > 0 for v in median.values())


def test_ratio_table_cpu_batch1():
    """Batch 1 x 5 frames at 64x64 through a 30-block 64-channel trunk: the refresh's fixed cost (a few
    batch-1 convolutions per layer) against the smallest step; with the amortized refresh."""
    srnc = available_srnc_kinds("cpu")[0]
    kinds = ["plain", srnc + "-beta1", srnc + "-beta1-every4", srnc + "-beta1-every8", srnc, srnc + "-every4",
             srnc + "-every8"]
    median = _ratio_table(CPU_BATCH1, rounds=8, name="train_step_cpu_batch1", kinds=kinds)  # whole refresh cycles of 4 and 8
    assert all(v > 0 for v in median.values())


@pytest.mark.gpu
def test_ratio_table_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _ratio_table(GPU, rounds=20, name="train_step_gpu")
