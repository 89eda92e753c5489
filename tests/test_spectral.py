"""Exact spectra of conv operators (srnc_ext.spectral) against independent ground truth.

Ground truth is the explicit matrix of torch's own ``nn.Conv2d`` applied to the identity basis
(independent of ``ConvGeometry``), plus the closed forms of srnc-notes section 3.
"""
import math

import pytest
import torch
from torch import nn

from srnc_ext import spectral
from srnc_ext.spectral import (
    LayerSpectrum, format_report, model_report, singular_values, spectral_norm, spectrum, stable_rank,
)

DT = torch.float64
MODES = ("zeros", "circular", "reflect", "replicate")


def kernel(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def make_conv(weight, groups=1, **cfg):
    c_out, c_in_g, kh, kw = weight.shape
    conv = nn.Conv2d(c_in_g * groups, c_out, (kh, kw), groups=groups, bias=False, dtype=DT, **cfg)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


def conv_matrix(weight, size, **cfg):
    """Explicit (dim_out, dim_in) matrix of nn.Conv2d on `size` inputs, by the identity basis."""
    conv = make_conv(weight, **cfg)
    h, w = (size, size) if isinstance(size, int) else size
    n_in = conv.in_channels * h * w
    with torch.no_grad():
        return conv(torch.eye(n_in, dtype=DT).reshape(n_in, conv.in_channels, h, w)).flatten(1).T


def true_svdvals(weight, size, **cfg):
    return torch.linalg.svdvals(conv_matrix(weight, size, **cfg))


# --------------------------------------------------------------------------- oracle 1: FFT = explicit SVD
CIRCULANT = {
    "3x2x3x3-n8": (kernel(3, 2, 3, 3), 8, dict(padding=1)),
    "groups2": (kernel(4, 2, 3, 3, seed=1), 6, dict(padding=1, groups=2)),
    "depthwise-groups3": (kernel(3, 1, 3, 3, seed=2), 5, dict(padding=1, groups=3)),
    # n even: at odd n, dilation 2 only permutes the frequencies and leaves the spectrum unchanged
    "dilation2": (kernel(2, 2, 3, 3, seed=3), 8, dict(padding=2, dilation=2)),
    "dilation-2x1-input-6x8": (kernel(2, 2, 3, 3, seed=9), (6, 8), dict(padding=(2, 1), dilation=(2, 1))),
    "cout5-cin2": (kernel(5, 2, 3, 3, seed=4), 5, dict(padding=1)),
    "cout2-cin5": (kernel(2, 5, 3, 3, seed=5), 5, dict(padding=1)),
    "input-8x6": (kernel(2, 3, 3, 3, seed=6), (8, 6), dict(padding=1)),
    "even-2x2-same": (kernel(2, 2, 2, 2, seed=7), 5, dict(padding="same")),
    "5x3-kernel-asym": (kernel(2, 2, 5, 3, seed=8), (7, 5), dict(padding=(2, 1))),
    # maps smaller than the kernel: taps wrap around the period and add up
    "kernel3-map1": (kernel(3, 2, 3, 3, seed=10), 1, dict(padding=1)),
    "kernel3-map2": (kernel(3, 2, 3, 3, seed=11), 2, dict(padding=1)),
    "kernel5-map2x3": (kernel(2, 3, 5, 5, seed=12), (2, 3), dict(padding=2)),
    "dilation2-map3x2": (kernel(2, 2, 3, 3, seed=13), (3, 2), dict(padding=2, dilation=2)),
}


@pytest.mark.parametrize("weight,size,cfg", CIRCULANT.values(), ids=CIRCULANT.keys())
def test_fft_equals_explicit_svd(weight, size, cfg):
    expected = true_svdvals(weight, size, padding_mode="circular", **cfg)
    result = spectrum(weight, size, padding_mode="circular", method="fft", **cfg)
    assert result.method == "fft" and result.exact and result.tol is None
    assert result.values.dtype == DT and len(result.values) == result.full_rank == len(expected)
    assert torch.allclose(result.values, expected, rtol=0, atol=1e-12 * expected[0])
    matrix = spectrum(weight, size, padding_mode="circular", method="matrix", **cfg).values
    assert torch.allclose(matrix, expected, rtol=0, atol=1e-12 * expected[0])
    assert result.sigma_max == pytest.approx(expected[0].item(), rel=1e-13)


# --------------------------------------------------------------------------- oracle 2: Frobenius
@pytest.mark.parametrize("n", [4, 7])
def test_frobenius_circular(n):
    weight = kernel(3, 2, 3, 3, seed=n)
    result = spectrum(weight, n, padding=1, padding_mode="circular")
    assert result.frobenius_sq == pytest.approx(n * n * weight.square().sum().item(), rel=1e-13)
    assert result.frobenius_sq == pytest.approx(result.values.square().sum().item(), rel=1e-12)


@pytest.mark.parametrize("k,n", [(3, 5), (5, 6)], ids=["k3-n5", "k5-n6"])
def test_frobenius_zero_same_padding(k, n):
    weight = kernel(2, 3, k, k, seed=k)
    c = (k - 1) // 2
    offsets = (n - (torch.arange(k, dtype=DT) - c).abs())
    formula = (weight.square() * offsets[:, None] * offsets[None, :]).sum().item()
    result = spectrum(weight, n, padding="same", method="matrix")
    assert result.frobenius_sq == pytest.approx(formula, rel=1e-13)
    assert conv_matrix(weight, n, padding="same").square().sum().item() == pytest.approx(formula, rel=1e-13)
    assert result.values.square().sum().item() == pytest.approx(formula, rel=1e-12)
    assert result.stable_rank == pytest.approx(formula / result.sigma_max**2, rel=1e-14)
    assert result.stable_rank_fraction == pytest.approx(result.stable_rank / (2 * n * n), rel=1e-14)


# --------------------------------------------------------------------------- oracle 3: zero vs circular
def test_zero_padding_sigma_grows_and_is_bounded_by_circulant():
    weight = kernel(2, 2, 3, 3, seed=11)
    sizes = [3, 4, 6, 8, 10]
    zero = [spectral_norm(weight, n, padding=1) for n in sizes]
    assert all(a <= b + 1e-12 for a, b in zip(zero, zero[1:]))
    sup = spectral_norm(weight, 256, padding=1, padding_mode="circular")  # fine frequency grid
    for n, s in zip(sizes, zero):
        for m in (n + 2, n + 5):
            assert s <= spectral_norm(weight, m, padding=1, padding_mode="circular") + 1e-12
        assert s <= sup + 1e-12
    assert zero[-1] > 0.8 * sup


# --------------------------------------------------------------------------- oracle 4: closed forms
@pytest.mark.parametrize("n,expected", [(4, 6.8541), (7, 8.1097), (3, None), (9, None)])
def test_all_ones_zero_same_padding(n, expected):
    sigma = spectral_norm(torch.ones(1, 1, 3, 3, dtype=DT), n, padding="same")
    assert sigma == pytest.approx((1 + 2 * math.cos(math.pi / (n + 1))) ** 2, rel=1e-12)
    if expected is not None:
        assert sigma == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize("n", [3, 4, 7])
def test_all_ones_circular_is_nine(n):
    result = spectrum(torch.ones(1, 1, 3, 3, dtype=DT), n, padding=1, padding_mode="circular")
    assert result.method == "fft" and result.sigma_max == pytest.approx(9.0, rel=1e-14)


# --------------------------------------------------------------------------- oracle 5: stride, 1x1, groups
@pytest.mark.parametrize("mode", MODES)
def test_strided_sigma_at_most_stride1(mode):
    weight = kernel(3, 2, 3, 3, seed=12)
    base = spectral_norm(weight, 8, padding=1, padding_mode=mode)
    for stride in (2, 3):
        strided = spectrum(weight, 8, stride=stride, padding=1, padding_mode=mode)
        assert strided.method == "matrix" and strided.sigma_max <= base + 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [2, 5, (3, 6)], ids=["n2", "n5", "3x6"])
def test_1x1_conv_sigma_is_matrix_norm(mode, size):
    weight = kernel(4, 3, 1, 1, seed=13)
    expected = torch.linalg.matrix_norm(weight[:, :, 0, 0], ord=2).item()
    assert spectral_norm(weight, size, padding="same", padding_mode=mode) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_grouped_sigma_is_max_over_groups(mode):
    weight = kernel(4, 2, 3, 3, seed=14)
    weight[2:] *= 3.0  # make the second group dominate
    per_group = [spectral_norm(w, 6, padding=1, padding_mode=mode) for w in weight.split(2)]
    grouped = spectral_norm(weight, 6, padding=1, padding_mode=mode, groups=2)
    assert grouped == pytest.approx(max(per_group), rel=1e-12)
    assert grouped < per_group[0] * per_group[1]


# --------------------------------------------------------------------------- oracle 6: explicit ground truth
NON_CIRCULANT = {
    "reflect-same": ("reflect", dict(padding=1), 6),
    "reflect-stride2": ("reflect", dict(padding=1, stride=2), 7),
    "replicate-pad2": ("replicate", dict(padding=2), 5),
    "replicate-dilation2": ("replicate", dict(padding=2, dilation=2), 6),
    "zeros-stride2-valid": ("zeros", dict(stride=2), (7, 6)),
    "circular-stride2": ("circular", dict(padding=1, stride=2), 6),
    "circular-pad2": ("circular", dict(padding=2), 5),
}


@pytest.mark.parametrize("mode,cfg,size", NON_CIRCULANT.values(), ids=NON_CIRCULANT.keys())
def test_matrix_equals_explicit_svd(mode, cfg, size):
    weight = kernel(3, 2, 3, 3, seed=15)
    expected = true_svdvals(weight, size, padding_mode=mode, **cfg)
    result = spectrum(weight, size, padding_mode=mode, **cfg)
    assert result.method == "matrix" and result.exact
    assert len(result.values) == result.full_rank == len(expected)
    assert torch.allclose(result.values, expected, rtol=0, atol=1e-12 * expected[0])
    assert result.frobenius_sq == pytest.approx(expected.square().sum().item(), rel=1e-12)


# --------------------------------------------------------------------------- arpack and auto
@pytest.mark.parametrize("k", [1, 3])
def test_arpack_matches_matrix(k):
    weight, tol = kernel(3, 3, 3, 3, seed=16), 1e-10
    cfg = dict(padding=1, padding_mode="reflect")
    exact = singular_values(weight, 7, method="matrix", **cfg)
    result = spectrum(weight, 7, method="arpack", k=k, tol=tol, **cfg)
    assert result.method == "arpack" and not result.exact and result.tol == tol
    assert len(result.values) == k and bool((result.values.diff() <= 0).all())
    assert torch.allclose(result.values, exact[:k], rtol=10 * tol, atol=0)
    again = singular_values(weight, 7, method="arpack", k=k, tol=tol, **cfg)
    assert torch.equal(result.values, again)


def test_arpack_k_out_of_range():
    with pytest.raises(ValueError, match="k="):
        spectrum(kernel(1, 1, 3, 3), 3, padding=1, method="arpack", k=9)


def test_auto_picks_fft_matrix_arpack(monkeypatch):
    weight = kernel(2, 2, 3, 3, seed=17)
    assert spectrum(weight, 6, padding=1, padding_mode="circular").method == "fft"
    small = spectrum(weight, 6, padding=1)
    assert small.method == "matrix"
    monkeypatch.setattr(spectral, "MAX_MATRIX_ENTRIES", 100)
    large = spectrum(weight, 6, padding=1, k=2)
    assert large.method == "krylov" and len(large.values) == 2  # Lanczos: far faster than ARPACK at size
    assert spectrum(weight, 6, padding=1, k=2, ncv=5).method == "arpack"  # ARPACK's ncv asks for ARPACK
    assert torch.allclose(large.values, small.values[:2], rtol=1e-7)
    assert spectrum(weight, 6, padding=1, padding_mode="circular").method == "fft"
    with pytest.raises(ValueError, match="MAX_MATRIX_ENTRIES"):
        spectrum(weight, 6, padding=1, method="matrix")


# --------------------------------------------------------------------------- modules and errors
def test_module_equals_tensor_path():
    weight = kernel(3, 2, 3, 3, seed=18).requires_grad_()
    conv = make_conv(weight.detach(), padding="same", padding_mode="reflect")
    from_module = spectrum(conv, (6, 5))
    from_tensor = spectrum(weight, (6, 5), padding="same", padding_mode="reflect")
    assert from_module.method == from_tensor.method == "matrix"
    assert torch.equal(from_module.values, from_tensor.values)
    assert from_module.frobenius_sq == from_tensor.frobenius_sq
    assert stable_rank(conv, (6, 5)) == pytest.approx(from_tensor.stable_rank, rel=1e-15)


def test_module_effective_weight_and_input_size_attribute():
    class Scaled(nn.Conv2d):
        input_size = (5, 5)

        def effective_weight(self):
            return 0.5 * self.weight

    weight = kernel(2, 2, 3, 3, seed=19)
    conv = Scaled(2, 2, 3, padding=1, padding_mode="circular", bias=False, dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_(weight)
    expected = spectral_norm(0.5 * conv.weight.detach().double(), 5, padding=1, padding_mode="circular")
    assert spectral_norm(conv) == pytest.approx(expected, rel=1e-14)
    assert spectrum(conv, 7).full_rank == 2 * 49  # explicit input_size wins over the attribute


@pytest.mark.parametrize("arg", ["stride", "padding", "dilation", "groups", "padding_mode"])
def test_module_rejects_explicit_config(arg):
    conv = make_conv(kernel(2, 2, 3, 3), padding=1)
    value = {"padding_mode": "zeros", "padding": 1}.get(arg, 1)
    with pytest.raises(ValueError, match=arg):
        spectrum(conv, 5, **{arg: value})


def test_missing_input_size():
    with pytest.raises(ValueError, match="input_size"):
        spectrum(kernel(2, 2, 3, 3))
    with pytest.raises(ValueError, match="input_size"):
        spectrum(make_conv(kernel(2, 2, 3, 3)))


def test_unknown_method_lists_allowed():
    with pytest.raises(ValueError, match="auto.*fft.*matrix.*arpack"):
        spectrum(kernel(2, 2, 3, 3), 5, method="lanczos")


@pytest.mark.parametrize("cfg", [dict(padding=1), dict(padding=1, padding_mode="circular", stride=2),
                                 dict(padding=0, padding_mode="circular")], ids=["zeros", "strided", "valid"])
def test_fft_refuses_non_circulant(cfg):
    with pytest.raises(ValueError, match="circulant.*matrix.*arpack"):
        spectrum(kernel(2, 2, 3, 3), 6, method="fft", **cfg)


# --------------------------------------------------------------------------- model report
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size,cfg", [
    (2, dict(padding=3)), (1, dict(padding=3)), (2, dict(padding=3, stride=2)), ((2, 3), dict(padding=2, dilation=2)),
], ids=["map2", "map1", "map2-stride2", "map2x3-dilation2"])
def test_maps_smaller_than_the_kernel_equal_explicit_svd(mode, size, cfg):
    """A 64->32 7x7 layer (a SPyNet level) on maps smaller than its kernel, wherever nn.Conv2d runs it."""
    weight = kernel(32, 64, 7, 7, seed=14) if cfg.get("dilation", 1) == 1 else kernel(32, 64, 3, 3, seed=15)
    try:
        expected = true_svdvals(weight, size, padding_mode=mode, **cfg)
    except RuntimeError:  # F.pad refuses reflect/circular padding this large: so does srnc_ext
        with pytest.raises(ValueError, match=mode):
            spectrum(weight, size, padding_mode=mode, **cfg)
        return
    result = spectrum(weight, size, padding_mode=mode, **cfg)
    assert result.exact and len(result.values) == len(expected)
    assert torch.allclose(result.values, expected, rtol=0, atol=1e-12 * expected[0])
    assert result.frobenius_sq == pytest.approx(conv_matrix(weight, size, padding_mode=mode, **cfg).pow(2).sum().item(),
                                                rel=1e-12)


def test_model_report():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular", bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
        nn.Sequential(nn.Conv2d(4, 3, 1, bias=False), nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode="reflect")),
    ).double()
    model[3][1].input_size = (3, 3)  # used because the dict lacks "3.1"
    sizes = {"0": 8, "2": (8, 8), "3.0": 4}
    rows = model_report(model, sizes)
    assert [r.name for r in rows] == ["0", "2", "3.0", "3.1"]
    assert [r.method for r in rows] == ["fft", "matrix", "matrix", "matrix"]
    assert [r.input_size for r in rows] == [(8, 8), (8, 8), (4, 4), (3, 3)]
    assert rows[1].weight_shape == (4, 4, 3, 3)
    for row, conv, size in zip(rows, [model[0], model[2], model[3][0], model[3][1]], [8, 8, 4, 3]):
        result = spectrum(conv, size)
        assert isinstance(row, LayerSpectrum)
        assert row.sigma_max == pytest.approx(result.sigma_max, rel=1e-14)
        assert row.stable_rank_fraction == pytest.approx(result.stable_rank_fraction, rel=1e-14)
    table = format_report(rows)
    assert table.count("\n") == len(rows) + 1 and "sigma_1" in table
    assert all(f"| {r.name} |" in table for r in rows)
    with pytest.raises(ValueError, match="'2'"):
        model_report(model, {"0": 8})


def test_model_report_warns_once_listing_the_conv_like_layers_it_does_not_report():
    class DeformConv2d(nn.Module):  # stands for torchvision.ops.DeformConv2d: holds its own weight
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2, 2, 3, 3))

    class ConvBlock(nn.Sequential):  # a container named "Conv...": its convs are reported, it is not one
        pass

    model = nn.Sequential(ConvBlock(nn.Conv2d(2, 2, 3, padding=1)), nn.ConvTranspose2d(2, 2, 4, stride=2), nn.Conv1d(2, 2, 3),
                          nn.Conv3d(2, 2, 3), DeformConv2d(), nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="does not report 1 conv-like module") as record:
        rows = model_report(model, 6)
    assert [r.name for r in rows] == ["0.0", "1", "2", "3", "5"]  # every kind SRN-C covers
    assert [r.input_size for r in rows] == [(6, 6), (6, 6), (6,), (6, 6, 6), ()]
    assert len(record) == 1
    message = str(record[0].message)
    assert "'4' (DeformConv2d" in message
    assert all(f"'{name}'" not in message for name in "01235") and "ConvBlock" not in message


def test_top_k_queries_skip_a_slow_dense_svd(monkeypatch):
    """sigma_1-only queries (spectral_norm, stable_rank, model_report) use ARPACK where a dense SVD
    would be slow; asking for every value still gets the exact dense SVD."""
    weight = kernel(3, 3, 3, 3, seed=21)
    exact = spectrum(weight, 7, padding=1)
    assert exact.method == "matrix"  # below the cost bound: dense, exact
    assert spectral_norm(weight, 7, padding=1) == exact.sigma_max
    monkeypatch.setattr(spectral, "MAX_DENSE_TOP_K_FLOPS", 1000)
    top = spectrum(weight, 7, padding=1, k=1, tol=1e-12)
    assert top.method == "krylov" and top.tol == 1e-12
    assert top.sigma_max == pytest.approx(exact.sigma_max, rel=1e-10)
    assert spectral_norm(weight, 7, padding=1) == pytest.approx(exact.sigma_max, rel=1e-7)
    assert stable_rank(weight, 7, padding=1) == pytest.approx(exact.stable_rank, rel=1e-7)
    assert spectrum(weight, 7, padding=1).method == "matrix"  # all values: still exact
    conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(weight)
    row = model_report(torch.nn.Sequential(conv), 7, tol=1e-12, ncv=8)[0]
    assert row.method == "arpack" and row.sigma_max == pytest.approx(exact.sigma_max, rel=1e-10)


@pytest.mark.parametrize("kwargs,match", [(dict(k=0), "k must"), (dict(k=True), "k must"), (dict(tol=-1.0), "tol must"),
                                          (dict(method="arpack", ncv=1), "ncv must"),
                                          (dict(method="arpack", maxiter=0), "maxiter must")])
def test_iteration_controls_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectrum(kernel(2, 2, 3, 3, seed=22), 6, padding=1, **kwargs)
