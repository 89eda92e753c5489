"""Zero-initialized layers (EDVR / BasicVSR++ offset convs) under SRN-C: ``sigma_floor``.

At an all-zero weight SRN-C divides by a sigma_1 estimate of 0: without a floor the gradient is
about alpha / eps (Adam's second moment overflows, SGD jumps to 1e17). With the floor the layer is
scaled linearly below ``tau = sigma_floor * alpha`` (the op math is tested in test_floor.py).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import srnc_ext
from srnc_ext import spectral


def _offset_model(seed: int = 0) -> nn.Sequential:
    """A feature conv and a zero-initialized offset conv, as EDVR's / BasicVSR++'s DCN packs have."""
    torch.manual_seed(seed)
    offset = nn.Conv2d(8, 18, 3, padding=1)
    nn.init.zeros_(offset.weight)
    nn.init.zeros_(offset.bias)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.LeakyReLU(0.1), offset)


def _train(model, optimizer, steps: int, seed: int = 1):
    torch.manual_seed(seed)
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 18, 8, 8)
    grads = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        grads.append(model[2].weight.grad.abs().max().item())
        optimizer.step()
    return grads


@pytest.mark.parametrize("variant, beta", (("projected", 0.1), ("projected", 1.0), ("paper", 0.1)))
@pytest.mark.parametrize("optimizer", ("adam", "sgd"))
def test_a_converted_zero_initialized_conv_trains_like_the_unconverted_one(variant, beta, optimizer):
    plain = _offset_model()
    converted = srnc_ext.convert(copy.deepcopy(plain), alpha=2.0, beta=beta, variant=variant, input_size=8)
    assert converted[2].sigma_floor == 1.0 and converted[0].sigma_floor == srnc_ext.module.DEFAULT_SIGMA_FLOOR
    make = (lambda p: torch.optim.Adam(p, lr=1e-3)) if optimizer == "adam" else (lambda p: torch.optim.SGD(p, lr=1e-2))
    opt = make(converted.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # beta=0.1 is below this small layer's reachable floor
        grads = _train(converted, opt, 5)
    state = opt.state[converted[2].weight]
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v))
    assert max(grads) < 1.0 and converted[2].weight.abs().max() > 0  # bounded, and the weight moved
    # while its sigma_1 is far below tau = alpha the layer is about the identity on its weight: the
    # effective weight is the raw one times 1 + O(s / tau) (lambda = (s / tau)^2 of the normalized part)
    x = spectral.spectral_norm(converted[2].weight.detach(), 8, padding=1) / 2.0
    assert x < 0.25
    ratio = (converted[2].effective_weight().detach().norm() / converted[2].weight.detach().norm()).item()
    assert abs(ratio - 1.0) <= 2 * x + 1e-3


def test_without_the_floor_the_gradient_at_a_zero_weight_is_about_alpha_over_eps():
    """sigma_floor=0 is Algorithm 2 exactly, the behaviour the floor removes."""
    layer = srnc_ext.SRNCConv2d(8, 18, 3, padding=1, alpha=2.0, beta=0.1, input_size=8, sigma_floor=0.0)
    with torch.no_grad():
        layer.weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer(torch.randn(2, 8, 8, 8)).square().mean().backward()
    assert not bool(torch.isfinite(layer.weight.grad).all()) or layer.weight.grad.abs().max() > 1e8


def test_a_layer_zeroed_after_construction_keeps_a_bounded_gradient_with_the_default_floor():
    torch.manual_seed(0)
    layer = srnc_ext.SRNCConv2d(8, 18, 3, padding=1, alpha=2.0, beta=0.1, input_size=8)
    with torch.no_grad():
        layer.weight.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    x, y = torch.randn(2, 8, 8, 8), torch.randn(2, 18, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            loss = (layer(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            g = layer.weight.grad
            # bounded by about (alpha / tau) |dL/dW_eff| = 1e3 |dL/dW_eff|; dL/dW_eff is O(1) here
            assert bool(torch.isfinite(g).all()) and g.abs().max() < 1e4
            opt.step()
    assert all(bool(torch.isfinite(v).all()) for v in opt.state[layer.weight].values() if torch.is_tensor(v))


@pytest.mark.parametrize("scale", (0.0, 1e-3, 0.05, 0.3))
def test_sigma_1_stays_at_most_alpha_below_the_floor(scale):
    torch.manual_seed(2)
    layer = srnc_ext.SRNCConv2d(3, 4, 3, padding=1, alpha=1.5, beta=0.4, input_size=5, sigma_floor=1.0,
                                dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(scale / spectral.spectral_norm(layer.weight.detach(), 5, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer.refresh(2000, tol=1e-12)
    sigma = spectral.spectral_norm(layer, method="matrix")
    assert sigma <= 1.5 * (1 + 1e-9)
    if scale == 0.0:
        assert sigma == 0.0  # a zero weight stays a zero layer: a zero-initialized output is kept
    else:
        assert sigma >= 1.5 * scale / 1.5 * 0.99  # at least the linear part (alpha / tau) K


def test_sigma_floor_is_checked_and_shown():
    with pytest.raises(ValueError, match=r"sigma_floor must be a number in \[0, 1\]"):
        srnc_ext.SRNCConv2d(2, 2, 3, sigma_floor=1.5)
    with pytest.raises(ValueError, match="sigma_floor"):
        srnc_ext.SRNCLinear(2, 2, sigma_floor=-0.1)
    assert "sigma_floor=0.25" in repr(srnc_ext.SRNCConv3d(2, 2, 3, sigma_floor=0.25))
    model = srnc_ext.convert(_offset_model(), alpha=1.0, sigma_floor=0.5)  # an explicit floor wins
    assert model[0].sigma_floor == model[2].sigma_floor == 0.5
