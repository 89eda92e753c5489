"""TRF diagnostic speed: the CPU smoke setting, and the paper's setting on a GPU (``gpu`` marker)."""
import pytest
import torch

from srnc_ext import diagnostics
from training.models import build_model


def _run(device, frames, size, width, iters):
    torch.manual_seed(0)
    model = build_model("vresnet-feat", width=width).to(device)
    result = diagnostics.trf(model, frames=frames, size=size, iters=iters, device=device, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return result


def test_trf_cpu_smoke(benchmark):
    benchmark.group = "trf"
    result = benchmark.pedantic(_run, args=("cpu", 21, 32, 16, 30), rounds=1, iterations=1)
    assert len(result.p_history) <= 30


@pytest.mark.gpu
def test_trf_gpu_paper_setting(benchmark):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    benchmark.group = "trf"
    benchmark.pedantic(_run, args=("cuda", 81, 64, 64, 500), rounds=1, iterations=1)
