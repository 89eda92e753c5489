"""(b) The refresh phase alone for 12 layers: batched + fused ops against the per-layer reference.

``test_refresh_table_cpu`` times, interleaved in one process, the batched refresh with the
compiled ops, the per-layer refresh with the same ops (what batching alone gains) and the
per-layer refresh with the reference ops, at beta = 0.1 and beta = 1, twice:

* alone: ``refresh_layers`` called back to back, with the minor page faults per refresh (in a
  process that does nothing else, glibc maps and unmaps the refresh's megabyte-sized blocks
  afresh every time, and faulting them in costs milliseconds);
* in training: the refresh that the optimizer step runs, in the training loop of
  ``workloads.make_step`` (batch 4, 7 frames), where the allocator has been warmed by the step.

It writes ``results/refresh_cpu.md``.
"""
import platform
import resource
import statistics
import time
from pathlib import Path

import pytest
import torch

import srnc_ext
from srnc_ext import batched_refresh, reference
from workloads import available_srnc_kinds, build, make_step

RESULTS = Path(__file__).parent / "results"


def _layers(kind, device="cpu", width=32, size=32):
    """The 12 SRN-C layers of the benchmark model (signatures: input conv, 10 body convs, output conv)."""
    return [m for m in build(kind, width, size, device).modules() if isinstance(m, srnc_ext.SRNCConv2d)]


@pytest.mark.parametrize("kind", [k for k in available_srnc_kinds("cpu") if not k.endswith("-nocache")])  # same refresh
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-layer"])
def test_refresh_phase_cpu(benchmark, kind, batched, monkeypatch):
    benchmark.group = "refresh-12-layers-cpu"
    monkeypatch.setattr(batched_refresh, "BATCHED", batched)
    layers = _layers(kind)
    benchmark.pedantic(lambda: batched_refresh.refresh_layers(layers), rounds=20, iterations=1, warmup_rounds=2)


def _time_alone(rows, monkeypatch, rounds=20, warmup=3):
    layers = {key: _layers(kind) for key, (kind, _) in rows.items()}
    times, faults = {key: [] for key in rows}, {key: [] for key in rows}
    for round_ in range(warmup + rounds):  # interleaved
        for key, (_, batched) in rows.items():
            monkeypatch.setattr(batched_refresh, "BATCHED", batched)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            batched_refresh.refresh_layers(layers[key])
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[key].append(elapsed)
                faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return ({key: statistics.median(v) for key, v in times.items()},
            {key: statistics.median(v) for key, v in faults.items()})


class _LiteralReference:
    """The per-layer refresh written with ``srnc_ext.reference`` alone: NCHW vectors, one layer at
    a time, power iteration, rank-one kernel and (beta < 1) the projected variant's second power
    iteration. It computes the vectors and rank-one kernels but does not store them in the layers."""

    def __init__(self, layers):
        self.layers = layers
        self.vectors = [{name: getattr(m, name).contiguous().clone() for name in m.power_iteration.vector_names} for m in layers]

    @torch.no_grad()
    def __call__(self):
        for layer, vec in zip(self.layers, self.vectors):
            g, eps, n = layer.geometry, layer.eps, layer.n_power_iterations
            kernel = layer.weight.detach()
            vec["u"], vec["v"] = reference.power_iteration(kernel, vec["u"], vec["v"], g, n, eps)
            s1 = reference.rank_one_kernel(vec["u"], vec["v"], g)
            if reference.needs_second_iteration(layer.variant, layer.beta):
                rw = reference.reweighted_kernel(kernel, s1, g, beta=layer.beta, eps=eps, variant=layer.variant)
                vec["u_out"], vec["v_out"] = reference.power_iteration(rw, vec["u_out"], vec["v_out"], g, n, eps)
                reference.rank_one_kernel(vec["u_out"], vec["v_out"], g)


def _time_literal_reference(kinds, rounds=20, warmup=3):
    runs = {beta: _LiteralReference(_layers(kind)) for beta, kind in kinds.items()}
    times = {beta: [] for beta in kinds}
    for round_ in range(warmup + rounds):
        for beta, run in runs.items():
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[beta].append(time.perf_counter() - start)
    return {beta: statistics.median(v) for beta, v in times.items()}


def _time_in_training(rows, monkeypatch, rounds=15, warmup=2):
    steps = {key: make_step(build(kind, 32, 32), batch=4, frames=7, size=32) for key, (kind, _) in rows.items()}
    spent = [0.0]
    original = batched_refresh._refresh_group

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    monkeypatch.setattr(batched_refresh, "_refresh_group", timed)
    times = {key: [] for key in rows}
    for round_ in range(warmup + rounds):
        for key, (_, batched) in rows.items():
            monkeypatch.setattr(batched_refresh, "BATCHED", batched)
            spent[0] = 0.0
            steps[key]()
            if round_ >= warmup:
                times[key].append(spent[0])
    return {key: statistics.median(v) for key, v in times.items()}


def test_refresh_table_cpu(monkeypatch):
    compiled = available_srnc_kinds("cpu")[0]
    if compiled == "srnc-reference":
        pytest.skip("the compiled ops are not built")
    rows = {}  # (label, beta) -> (kind, batched)
    for suffix, beta in (("", "0.1"), ("-beta1", "1")):
        rows[("batched, compiled ops", beta)] = (compiled + suffix, True)
        rows[("per layer, compiled ops", beta)] = (compiled + suffix, False)
        rows[("per layer, reference ops", beta)] = ("srnc-reference" + suffix, False)
    alone, faults = _time_alone(rows, monkeypatch)
    literal = _time_literal_reference({"0.1": "srnc-reference", "1": "srnc-reference-beta1"})
    training = _time_in_training(rows, monkeypatch)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. The 12 SRN-C layers of the benchmark model (32 channels, 32x32). "
        "Alone: median of 20 interleaved back-to-back refreshes. In training: median of 15 interleaved training "
        "steps (batch 4, 7 frames), the refresh run by the optimizer step.",
        "",
        "| beta | refresh | alone (ms) | speed-up | page faults | in training (ms) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, beta), value in alone.items():
        base = ("per layer, reference ops", beta)
        lines.append(f"| {beta} | {label} | {1e3 * value:.2f} | {alone[base] / value:.2f} | "
                     f"{faults[(label, beta)]:.0f} | {1e3 * training[(label, beta)]:.2f} | "
                     f"{training[base] / training[(label, beta)]:.2f} |")
    lines += ["", "speed-up: over the per-layer refresh with the reference ops, same beta, same setting.", "",
              "The per-layer refresh written with `srnc_ext.reference` functions alone (NCHW vectors, results not "
              "stored in the layers), alone:", "",
              "| beta | time (ms) | batched, compiled ops: speed-up over it |", "|---|---|---|"]
    for beta, value in literal.items():
        lines.append(f"| {beta} | {1e3 * value:.2f} | {value / alone[('batched, compiled ops', beta)]:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "refresh_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert all(v > 0 for v in (*alone.values(), *training.values()))


@pytest.mark.gpu
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-layer"])
def test_refresh_phase_gpu(benchmark, batched, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    benchmark.group = "refresh-12-layers-gpu"
    monkeypatch.setattr(batched_refresh, "BATCHED", batched)
    layers = _layers(available_srnc_kinds("cuda")[0] if batched else "srnc-reference", "cuda", 64, 64)

    def run():
        batched_refresh.refresh_layers(layers)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=5)
