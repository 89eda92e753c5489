"""Lanczos with bounds (srnc_ext.spectral_iterative) against the explicit matrix's SVD.

Ground truth: ``spectrum(..., method="matrix")``, the dense SVD of the operator applied to the
identity basis. Each case checks that the bounds contain the exact value (up to float64 rounding,
ROUNDING), that their width meets the requested tolerance, and that the value is inside them.
"""
import pytest
import torch
from torch import nn

import srnc_ext
from srnc_ext import spectral, spectral_iterative
from srnc_ext.conv_operator import ConvGeometry
from srnc_ext.spectral import spectral_norm, spectrum
from srnc_ext.spectral_iterative import IterativeResult, layer_start_vector, top_singular_values

DT = torch.float64
ROUNDING = 1e-12  # relative slack for float64 rounding of the products in the containment checks


def kernel(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def exact_values(weight, size, **cfg):
    return spectrum(weight, size, method="matrix", **cfg).values


def check(result: IterativeResult, exact: torch.Tensor, tol: float):
    k = len(result.values)
    top = exact[:k]
    assert result.converged
    assert bool((result.values.diff() <= 0).all())
    assert bool((result.lower <= top * (1 + ROUNDING)).all()), (result.lower, top)
    assert bool((top <= result.upper * (1 + ROUNDING)).all()), (result.upper, top)
    assert bool((result.upper - result.lower <= tol * result.lower).all())
    assert bool(((result.lower <= result.values) & (result.values <= result.upper)).all())
    assert torch.allclose(result.values, top, rtol=tol, atol=0)


CASES = {
    **{f"{mode}": ((4, 3, 3, 3), 7, dict(padding=1, padding_mode=mode))
       for mode in ("zeros", "circular", "reflect", "replicate")},
    "stride2": ((4, 4, 3, 3), 8, dict(padding=1, stride=2)),
    "reflect-stride2": ((3, 4, 3, 3), (8, 7), dict(padding=1, stride=2, padding_mode="reflect")),
    "dilation2": ((4, 4, 3, 3), 8, dict(padding=2, dilation=2)),
    "groups2": ((4, 2, 3, 3), 6, dict(padding=1, groups=2)),
    "cout6-cin2": ((6, 2, 3, 3), 6, dict(padding=1)),  # dim_out > dim_in: Lanczos on W^T W
    "cout2-cin6": ((2, 6, 3, 3), 6, dict(padding=1)),  # dim_out < dim_in: on W W^T
    "valid-5x5": ((3, 2, 5, 5), 9, dict(padding=0)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("k,tol", [(1, 1e-6), (1, 1e-10), (3, 1e-8)], ids=["k1-1e-6", "k1-1e-10", "k3-1e-8"])
def test_matches_explicit_svd(case, k, tol):
    shape, size, cfg = case
    weight = kernel(*shape, seed=len(CASES))
    geometry = ConvGeometry.create(weight.shape, size, **cfg)
    result = top_singular_values(geometry, weight, k=k, tol=tol)
    check(result, exact_values(weight, size, **cfg), tol)
    assert result.method == ("lanczos" if k == 1 else "block-lanczos")
    in_stages = sum(p for _, p in result.stages)
    assert in_stages < result.products <= in_stages + len(result.stages) * (k + 1)  # + the certifications
    if tol >= 1e-6:
        assert [d for d, _ in result.stages] == ["float32"]  # float32 iterations, float64 certification
    if tol <= 1e-10:  # beyond float32's reach: float64 stages, or float32 ones anchored at float64 vectors
        assert [d for d, _ in result.stages][-1] in ("float64", "float32-refine")


def test_every_value_of_a_tiny_operator():
    """k = full_rank: the Krylov space fills R^n (breakdown and the full-space stop)."""
    weight = kernel(2, 1, 3, 3, seed=1)
    geometry = ConvGeometry.create(weight.shape, 2, padding=1)
    exact = exact_values(weight, 2, padding=1)
    result = top_singular_values(geometry, weight, k=geometry.full_rank, tol=1e-9)
    check(result, exact, 1e-9)


def test_thick_restart(monkeypatch):
    """A basis too small for convergence: restarts keep the top Ritz vectors, the result is the same."""
    weight = kernel(6, 6, 3, 3, seed=2)
    geometry = ConvGeometry.create(weight.shape, 9, padding=1, padding_mode="reflect")
    exact = exact_values(weight, 9, padding=1, padding_mode="reflect")
    free = top_singular_values(geometry, weight, tol=1e-9)
    monkeypatch.setattr(spectral_iterative, "MAX_BASIS_BYTES", 0)
    monkeypatch.setattr(spectral_iterative, "MIN_BASIS", 12)
    monkeypatch.setattr(spectral_iterative, "FULL_REORTH_ENTRIES", 0)
    for k in (1, 2):
        restarted = top_singular_values(geometry, weight, k=k, tol=1e-9)
        check(restarted, exact, 1e-9)
    assert restarted.products > free.products


def test_float64_only_and_start_vectors():
    weight = kernel(4, 4, 3, 3, seed=3)
    geometry = ConvGeometry.create(weight.shape, 8, padding=1)
    exact = exact_values(weight, 8, padding=1)
    only64 = top_singular_values(geometry, weight, tol=1e-8, dtype_schedule=("float64",))
    check(only64, exact, 1e-8)
    assert only64.stages[0][0] == "float64" and only64.float64_products == only64.products
    # the exact top right singular vector as start: converges at once
    _, _, vh = torch.linalg.svd(spectral.operator_matrix(geometry, weight))
    warm = top_singular_values(geometry, weight, tol=1e-8, start=vh[0].reshape(geometry.input_shape(1)))
    check(warm, exact, 1e-8)
    assert warm.products < only64.products
    # a start orthogonal to it still finds sigma_1 (the mixed-in random part)
    orthogonal = top_singular_values(geometry, weight, tol=1e-8, start=vh[1])
    check(orthogonal, exact, 1e-8)
    # on the output side (dim_out < dim_in) the start is mapped through W
    wide = kernel(2, 5, 3, 3, seed=4)
    g_wide = ConvGeometry.create(wide.shape, 6, padding=1)
    _, _, vh = torch.linalg.svd(spectral.operator_matrix(g_wide, wide))
    check(top_singular_values(g_wide, wide, tol=1e-8, start=vh[0]), exact_values(wide, 6, padding=1), 1e-8)


def test_deterministic_and_zero_operator():
    weight = kernel(3, 3, 3, 3, seed=5)
    geometry = ConvGeometry.create(weight.shape, 7, padding=1)
    a, b = (top_singular_values(geometry, weight, k=2, tol=1e-7) for _ in range(2))
    assert torch.equal(a.values, b.values) and torch.equal(a.upper, b.upper)
    zero = top_singular_values(geometry, torch.zeros_like(weight), k=2)
    assert zero.converged and zero.products == 0 and not bool(zero.values.any()) and not bool(zero.upper.any())


def test_maxiter_stops_short_with_valid_bounds():
    weight = kernel(6, 6, 3, 3, seed=6)
    geometry = ConvGeometry.create(weight.shape, 9, padding=1)
    exact = exact_values(weight, 9, padding=1)
    result = top_singular_values(geometry, weight, tol=1e-12, maxiter=12)
    assert not result.converged and result.products <= 12
    assert float(result.lower[0]) <= float(exact[0]) * (1 + ROUNDING)
    assert result.relative_gap > 1e-12


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must"), (dict(k=True), "k must"), (dict(k=2.0), "k must"), (dict(k=10**6), "k must"),
    (dict(tol=-1e-3), "tol must"), (dict(tol=1.0), "tol must"), (dict(tol="1e-6"), "tol must"),
    (dict(maxiter=0), "maxiter must"), (dict(maxiter=1.5), "maxiter must"),
    (dict(dtype_schedule=()), "dtype_schedule must"), (dict(dtype_schedule=(torch.float16,)), "dtype_schedule must"),
    (dict(dtype_schedule="float32"), "dtype_schedule must"),
    (dict(start=torch.ones(7)), "start must"), (dict(block=0), "block must"), (dict(k=2, block=1), "block must"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    weight = kernel(2, 2, 3, 3, seed=7)
    geometry = ConvGeometry.create(weight.shape, 6, padding=1)
    with pytest.raises(ValueError, match=match):
        top_singular_values(geometry, weight, **kwargs)


# --------------------------------------------------------------------------- through spectral.spectrum
def test_spectrum_krylov_carries_bounds(monkeypatch):
    weight = kernel(3, 3, 3, 3, seed=8)
    exact = exact_values(weight, 7, padding=1, padding_mode="replicate")
    result = spectrum(weight, 7, padding=1, padding_mode="replicate", method="krylov", k=2, tol=1e-9)
    assert result.method == "krylov" and not result.exact and result.tol == 1e-9 and result.converged
    assert len(result.values) == len(result.lower) == len(result.upper) == 2
    assert bool((result.lower <= exact[:2] * (1 + ROUNDING)).all() and (exact[:2] <= result.upper * (1 + ROUNDING)).all())
    assert spectrum(weight, 7, padding=1).lower is None  # exact methods carry no bounds
    monkeypatch.setattr(spectral, "MAX_DENSE_TOP_K_FLOPS", 1000)
    auto = spectrum(weight, 7, padding=1, k=1, tol=1e-7)
    assert auto.method == "krylov" and auto.sigma_max == pytest.approx(float(exact_values(weight, 7, padding=1)[0]), rel=1e-7)
    zero = spectrum(torch.zeros_like(weight), 7, padding=1, method="krylov")
    assert zero.sigma_max == 0 and zero.converged and float(zero.upper[0]) == 0


def test_spectrum_krylov_warns_short_of_tol_and_refuses_ncv():
    weight = kernel(6, 6, 3, 3, seed=9)
    with pytest.warns(RuntimeWarning, match="maxiter=6"):
        result = spectrum(weight, 9, padding=1, method="krylov", tol=1e-12, maxiter=6)
    assert result.converged is False and float(result.lower[0]) < float(result.upper[0])
    with pytest.raises(ValueError, match="ncv"):
        spectrum(weight, 9, padding=1, method="krylov", ncv=8)
    with pytest.raises(ValueError, match="maxiter must"):
        spectrum(weight, 9, padding=1, method="krylov", maxiter=0)


def test_srnc_layer_starts_from_its_power_iteration_vector():
    torch.manual_seed(0)
    layer = srnc_ext.SRNCConv2d(4, 4, 3, padding=1, bias=False, alpha=1.5, beta=0.5, input_size=9, dtype=DT)
    for _ in range(30):
        srnc_ext.refresh(layer)
    geometry = ConvGeometry.from_conv(layer, 9)
    start = layer_start_vector(layer, geometry)
    assert start is not None and start.numel() == geometry.dim_in
    assert start.data_ptr() == layer.power_iteration.vector("v_out").data_ptr()  # projected, beta < 1
    assert layer_start_vector(nn.Conv2d(4, 4, 3), geometry) is None
    with torch.no_grad():
        expected = float(exact_values(layer.effective_weight().double(), 9, padding=1)[0])
    assert spectral_norm(layer, method="krylov", tol=1e-9) == pytest.approx(expected, rel=1e-9)
    hard = srnc_ext.SRNCConv2d(4, 4, 3, padding=1, bias=False, alpha=1.0, beta=1.0, input_size=9, dtype=DT)
    assert layer_start_vector(hard, geometry).data_ptr() == hard.power_iteration.vector("v").data_ptr()
