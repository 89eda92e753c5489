"""(b) The refresh phase alone for 12 layers: batched + fused ops against the per-layer reference."""
import pytest
import torch

import srnc_ext
from srnc_ext import batched_refresh
from workloads import available_srnc_kinds, build


def _layers(kind, device="cpu", width=32, size=32):
    """The 12 SRN-C layers of the benchmark model (two signatures: 11 + the output conv)."""
    return [m for m in build(kind, width, size, device).modules() if isinstance(m, srnc_ext.SRNCConv2d)]


@pytest.mark.parametrize("kind", available_srnc_kinds("cpu"))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-layer"])
def test_refresh_phase_cpu(benchmark, kind, batched, monkeypatch):
    benchmark.group = "refresh-12-layers-cpu"
    monkeypatch.setattr(batched_refresh, "BATCHED", batched)
    layers = _layers(kind)
    benchmark.pedantic(lambda: batched_refresh.refresh_layers(layers), rounds=20, iterations=1, warmup_rounds=2)


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
