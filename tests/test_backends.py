"""Backend choice, and SRNCConv2d giving the same results with every available backend."""
import copy

import pytest
import torch

import srnc_ext
from srnc_ext import SRNCConv2d, backends

AVAILABLE = ["reference"] + [b for b, ok in (("cpu", backends.compiled_available("cpu")),
                                             ("triton", backends.triton_available("cpu"))) if ok]


def test_names_and_precedence(monkeypatch):
    monkeypatch.setattr(backends, "_selected", None)
    monkeypatch.setenv("SRNC_BACKEND", "reference")
    assert backends.get_backend() == "reference"
    srnc_ext.set_backend("auto")
    assert backends.get_backend() == "auto"
    srnc_ext.set_backend(None)
    assert backends.get_backend() == "reference"
    layer = SRNCConv2d(2, 2, 3, input_size=6, backend="reference")
    assert layer._op_impl.name == "reference"
    monkeypatch.setenv("SRNC_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SRNC_BACKEND"):
        backends.get_backend()
    with pytest.raises(ValueError, match="backend"):
        srnc_ext.set_backend("fast")
    with pytest.raises(ValueError, match="backend"):
        SRNCConv2d(2, 2, 3, backend="fast")


def test_explicit_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        SRNCConv2d(2, 2, 3, input_size=6, backend="cuda")


@pytest.mark.skipif(not backends.compiled_available("cpu"), reason="srnc_ext._C not built")
def test_auto_picks_the_compiled_op_on_cpu():
    assert backends.resolve("auto", torch.device("cpu")) == "compiled"


def _train(model, backend, dtype, steps=3):
    for m in model.modules():
        if isinstance(m, SRNCConv2d):
            m.backend = backend
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(2, 3, 9, 9, generator=gen, dtype=dtype)
        h = torch.zeros(2, 5, 9, 9, dtype=dtype)
        for _ in range(3):
            h = torch.tanh(model[1](torch.relu(model[0](x))) + 0.5 * h)
        opt.zero_grad()
        h.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return grads


@pytest.mark.parametrize("backend", AVAILABLE[1:] or ["reference"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("float32", "float64"))
@pytest.mark.parametrize("variant,beta", [("projected", 0.2), ("paper", 0.2), ("projected", 1.0)])
def test_every_backend_matches_reference_in_training(backend, dtype, variant, beta):
    torch.manual_seed(0)
    kw = dict(beta=beta, variant=variant, input_size=9, dtype=dtype)
    model = torch.nn.Sequential(SRNCConv2d(3, 5, (3, 5), padding=(1, 2), **kw),
                                SRNCConv2d(5, 5, 3, padding=1, padding_mode="reflect", alpha=1.5, **kw))
    twin = copy.deepcopy(model)
    grads, expected = _train(model, backend, dtype), _train(twin, "reference", dtype)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, **tol)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, msg=name, **tol)


def test_backends_are_objects_and_auto_takes_the_best_one_meant_for_the_device():
    registry = backends.REGISTRY
    assert sorted(registry, key=lambda n: -registry[n].priority) == ["compiled", "triton", "reference"]
    assert registry["reference"].runs_on("cpu") and registry["reference"].auto_on("cpu")
    assert not registry["triton"].auto_on("cpu")  # the interpreter is a test vehicle, not a CPU backend
    expected = "compiled" if registry["compiled"].runs_on("cpu") else "reference"
    assert backends.resolve("auto", torch.device("cpu")) == expected
    assert backends.op_set("reference", torch.device("cpu")).name == "reference"
