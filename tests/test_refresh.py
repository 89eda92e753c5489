"""Batched multi-layer refresh: equal to the per-layer path, automatic once per optimizer step."""
import copy

import pytest
import torch
from torch import nn

import srnc_ext
from srnc_ext import SRNCConv2d
from srnc_ext import batched_refresh as refresh_module


class Stack(nn.Module):
    """12 same-signature layers plus two of other signatures, feature-recurrent."""

    def __init__(self, beta, variant, dtype=torch.float64):
        super().__init__()
        kw = dict(beta=beta, variant=variant, input_size=8, dtype=dtype)
        self.inp = SRNCConv2d(5, 5, 3, padding=1, **kw)
        self.body = nn.ModuleList(SRNCConv2d(5, 5, 3, padding=1, alpha=1.2, **kw) for _ in range(12))
        self.out = SRNCConv2d(5, 3, 1, **kw)

    def forward(self, x):
        h = torch.zeros_like(x)
        for t in range(3):
            h = torch.tanh(self.inp(x + h))
            for layer in self.body:
                h = h + 0.1 * torch.relu(layer(h))
        return self.out(h)


def _train(model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(2, 5, 8, 8, generator=gen, dtype=model.out.weight.dtype)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("variant,beta", [("projected", 0.3), ("projected", 1.0), ("paper", 0.3)])
def test_batched_refresh_equals_per_layer_after_20_steps(variant, beta, monkeypatch):
    torch.manual_seed(0)
    batched = Stack(beta, variant)
    per_layer = copy.deepcopy(batched)
    _train(batched, 20)
    monkeypatch.setattr(refresh_module, "BATCHED", False)
    _train(per_layer, 20)
    for (name, a), b in zip(batched.state_dict().items(), per_layer.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_refresh_runs_once_per_optimizer_step_batched(monkeypatch):
    torch.manual_seed(0)
    model = Stack(0.5, "projected", torch.float32)
    calls = []
    original = refresh_module._refresh_group
    monkeypatch.setattr(refresh_module, "_refresh_group", lambda layers, *a: calls.append(len(layers)) or original(layers, *a))
    _train(model, 2)
    # per step: inp and the 12 body layers share a signature (alpha is not part of it), out is alone
    assert calls == [13, 1, 13, 1], calls


def test_large_groups_are_refreshed_in_chunks_equal_to_per_layer(monkeypatch):
    """A signature group beyond the device's vector bound runs as consecutive chunks; the result is
    the per-layer path's."""
    torch.manual_seed(0)
    chunked = Stack(0.3, "projected")
    per_layer = copy.deepcopy(chunked)
    per_layer_bytes = 2 * 5 * 8 * 8 * 8  # u and v of one 5-channel layer at 8x8, float64
    monkeypatch.setitem(refresh_module.MAX_GROUP_VECTOR_BYTES, "cpu", 3 * per_layer_bytes + 1)
    calls = []
    original = refresh_module._refresh_group
    monkeypatch.setattr(refresh_module, "_refresh_group", lambda layers, *a: calls.append(len(layers)) or original(layers, *a))
    _train(chunked, 20)
    assert calls[:6] == [3, 3, 3, 3, 1, 1], calls  # 13 same-signature layers, then `out`
    monkeypatch.setattr(refresh_module, "BATCHED", False)
    _train(per_layer, 20)
    for (name, a), b in zip(chunked.state_dict().items(), per_layer.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_explicit_refresh_entry_point_and_eval_model_is_left_alone():
    torch.manual_seed(0)
    model = Stack(0.5, "projected", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert srnc_ext.refresh(model, n_iterations=3) == 14
    assert not torch.equal(model.body[0].u, before["body.0.u"])
    model.eval()
    frozen = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(1, 5, 8, 8)).sum().backward()
    opt.step()  # the hook refreshes training-mode layers only
    for name in ("body.0.u", "inp.v_out"):
        torch.testing.assert_close(model.state_dict()[name], frozen[name], rtol=0, atol=0)


def test_mark_fresh_after_an_in_place_copy_of_the_same_values():
    torch.manual_seed(0)
    model = Stack(0.5, "projected", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p)  # as DistributedDataParallel's initial broadcast does
    assert all(m.is_stale() for m in model.modules() if isinstance(m, SRNCConv2d))
    assert srnc_ext.mark_fresh(model) == 14
    assert not any(m.is_stale() for m in model.modules() if isinstance(m, SRNCConv2d))


class Wide(nn.Module):
    """Layers with >= 8 output channels: on channels-last vectors the adjoint takes conv_transpose2d."""

    def __init__(self):
        super().__init__()
        kw = dict(beta=0.3, input_size=7, dtype=torch.float64)
        self.body = nn.ModuleList(SRNCConv2d(9, 9, 3, padding=1, **kw) for _ in range(3))
        self.out = SRNCConv2d(9, 2, 3, padding=1, **kw)  # 2 output channels: the flipped-kernel conv

    def forward(self, x):
        for layer in self.body:
            x = x + torch.relu(layer(x))
        return self.out(x)


def test_vector_layout_changes_speed_not_results(monkeypatch):
    """CPU vectors are channels-last; NCHW vectors (forced) train to the same state."""
    torch.manual_seed(0)
    channels_last = Wide()
    assert all(m.u.is_contiguous(memory_format=torch.channels_last) and not m.u.is_contiguous()
               for m in channels_last.modules() if isinstance(m, SRNCConv2d))
    monkeypatch.setattr(refresh_module, "vector_format", lambda device, spatial_dims=2: torch.contiguous_format)
    nchw = copy.deepcopy(channels_last)
    for m in nchw.modules():
        if isinstance(m, SRNCConv2d):
            for name in ("u", "v", "u_out", "v_out"):
                setattr(m, name, getattr(m, name).contiguous())
    monkeypatch.undo()

    def train(model, gen):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(10):
            loss = model(torch.randn(2, 9, 7, 7, generator=gen, dtype=torch.float64)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    train(channels_last, torch.Generator().manual_seed(1))
    monkeypatch.setattr(refresh_module, "vector_format", lambda device, spatial_dims=2: torch.contiguous_format)
    train(nchw, torch.Generator().manual_seed(1))
    assert nchw.body[0].u.is_contiguous() and channels_last.body[0].u.is_contiguous(memory_format=torch.channels_last)
    for (name, a), b in zip(channels_last.state_dict().items(), nchw.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("change", ["copy_", "replace", "load_state_dict"])
def test_reused_stack_follows_external_changes_of_the_vectors(change):
    """A group reuses its stacked vectors only while the layers' buffers still hold them."""
    torch.manual_seed(0)
    model = Wide()
    _ = [srnc_ext.refresh(model) for _ in range(2)]  # the second refresh reuses the first's stacks
    layer = model.body[1]
    new = torch.randn_like(layer.u)  # u: each power-iteration step starts from it (v only as fallback)
    new /= new.norm()
    if change == "copy_":
        layer.u.copy_(new)
    elif change == "replace":
        layer.u = new.contiguous(memory_format=torch.channels_last)
    else:
        state = model.state_dict()
        state["body.1.u"] = new
        model.load_state_dict(state)
    fresh = copy.deepcopy(model)  # no reusable stacks
    srnc_ext.refresh(model)
    srnc_ext.refresh(fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_vectors_follow_the_memory_format_of_their_device(monkeypatch):
    layer = SRNCConv2d(4, 4, 3, padding=1, input_size=6)
    assert layer.u.is_contiguous(memory_format=torch.channels_last) and not layer.u.is_contiguous()
    # what .to(cuda) does to them, without a GPU: the device's format is applied on every _apply
    monkeypatch.setattr(refresh_module, "vector_format", lambda device, spatial_dims=2: torch.contiguous_format)
    before = layer.u.clone()
    layer.double()
    assert layer.u.is_contiguous() and layer.v.is_contiguous()
    torch.testing.assert_close(layer.u, before.double(), rtol=0, atol=0)
