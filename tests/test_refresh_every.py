"""``refresh_every``: the amortized refresh (an option; the default refreshes after every step)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import srnc_ext
from srnc_ext import batched_refresh


def _model(refresh_every: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 3, 3, padding=1))
    return srnc_ext.convert(plain, alpha=1.0, beta=0.5, input_size=12, refresh_every=refresh_every)


def _steps(model, opt, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(2, 3, 12, 12, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("every", (1, 3))
def test_the_refresh_runs_after_every_kth_optimizer_step(monkeypatch, every):
    model = _model(every)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = []
    original = batched_refresh._refresh_group
    monkeypatch.setattr(batched_refresh, "_refresh_group",
                        lambda layers, *args, **kwargs: (calls.append(len(layers)), original(layers, *args, **kwargs))[1])
    _steps(model, opt, 7)
    # three signatures (3->8, 8->8, 8->3): one group each per refresh
    assert len(calls) == 3 * (7 // every)
    assert all(not layer.is_stale() for layer in model.modules() if isinstance(layer, srnc_ext.SRNCLayer))


def test_a_resumed_run_keeps_the_schedule_and_equals_the_uninterrupted_one():
    straight = _model(3)
    opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    _steps(straight, opt, 7)

    first = _model(3)
    opt_first = torch.optim.Adam(first.parameters(), lr=1e-2)
    _steps(first, opt_first, 4)
    saved, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt_first.state_dict())
    assert int(saved["0._lagged_steps"]) == 1  # 4 = 3 + 1: one step since the last refresh
    resumed = _model(3, seed=5)  # other initial weights: everything must come from the state_dict
    resumed.load_state_dict(saved)
    opt_resumed = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt_resumed.load_state_dict(saved_opt)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # the same batches as steps 1-4 of the uninterrupted run, then 5-7
        torch.randn(2, 3, 12, 12, generator=gen)
    for _ in range(3):
        x = torch.randn(2, 3, 12, 12, generator=gen)
        loss = resumed(x).square().mean()
        opt_resumed.zero_grad()
        loss.backward()
        opt_resumed.step()
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_refresh_every_is_checked():
    with pytest.raises(ValueError, match="refresh_every must be an int >= 1"):
        srnc_ext.SRNCConv2d(2, 2, 3, refresh_every=0)
    with pytest.raises(ValueError, match="refresh_every"):
        srnc_ext.SRNCLinear(2, 2, refresh_every=1.5)
    assert "refresh_every=4" in repr(srnc_ext.SRNCConv1d(2, 2, 3, refresh_every=4))
