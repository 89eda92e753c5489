"""The symbol start of the power iteration (srnc_ext/warm_start.py), against explicit operator matrices."""
import copy
import warnings

import pytest
import torch
from torch import nn

import srnc_ext
from srnc_ext import batched_refresh, module, spectral, warm_start
from srnc_ext.conv_operator import ConvGeometry


def _dense_sigma(geometry, kernel):
    """Exact sigma_1: the explicit matrix (``geometry.apply`` on the identity basis), SVD."""
    return torch.linalg.svdvals(spectral.operator_matrix(geometry, kernel.double()))[0].item()


def _rayleigh(geometry, kernel, u, v):
    return (u.double() * geometry.apply(kernel.double(), v.double())).sum().item()


@pytest.mark.parametrize("shape, size, options", [
    ((5, 4, 3, 3), (8, 8), dict(padding=1)),
    ((6, 3, 3), (12,), dict(padding=1)),
    ((4, 4, 3, 3), (8, 6), dict(padding=2, dilation=2)),
    ((6, 2, 3, 3), (8, 8), dict(padding=1, groups=2)),
    ((3, 2, 3, 3, 3), (4, 5, 4), dict(padding=1)),
])
def test_circular_start_is_the_exact_top_pair(shape, size, options):
    torch.manual_seed(0)
    kernel = torch.randn(shape, dtype=torch.float64)
    geometry = ConvGeometry.create(shape, size, padding_mode="circular", **options)
    exact = _dense_sigma(geometry, kernel)
    start = warm_start.symbol_start(geometry, kernel)
    assert start.sigma == pytest.approx(exact, rel=1e-6)
    u, v = warm_start.start_vectors(geometry, start, torch.float64, "cpu")
    assert u.norm().item() == pytest.approx(1.0, rel=1e-12) and v.norm().item() == pytest.approx(1.0, rel=1e-12)
    assert _rayleigh(geometry, kernel, u, v) == pytest.approx(exact, rel=1e-6)
    # a singular pair, not only its value: W v = sigma u
    torch.testing.assert_close(geometry.apply(kernel, v), exact * u, rtol=0, atol=1e-6 * exact)


@pytest.mark.parametrize("seed", (0, 1))
def test_zero_padding_start_beats_fifteen_random_iterations(seed):
    """Zero padding, 4->4 3x3 at 16x16: the start's Rayleigh quotient is within 2e-2 of sigma_1 (measured
    6.9e-3 and 1.2e-2 for these seeds; 5.6e-4 .. 1.1e-3 on 64x64 maps, see module.SYMBOL_WARMUP_ITERATIONS)
    and closer than 15 power iterations from a random start (1.2e-2, 1.8e-2); one iteration more: within
    5e-3 (measured 1.1e-3, 2.9e-3)."""
    torch.manual_seed(seed)
    kernel = nn.Conv2d(4, 4, 3).weight.detach().double()
    geometry = ConvGeometry.create(kernel.shape, (16, 16), padding=1)
    exact = _dense_sigma(geometry, kernel)
    start = warm_start.symbol_start(geometry, kernel)
    assert start.sigma >= exact * (1 - 1e-9)  # the zero-padded operator is a compression of a circulant one
    u, v = warm_start.start_vectors(geometry, start, torch.float64, "cpu")
    symbol_error = 1 - _rayleigh(geometry, kernel, u, v) / exact
    assert 0 <= symbol_error <= 2e-2
    x = geometry.adjoint(kernel, u)
    once = geometry.apply(kernel, x / x.norm()).norm().item()
    assert 0 <= 1 - once / exact <= 5e-3
    r = torch.randn(geometry.output_shape(), dtype=torch.float64)
    for _ in range(15):
        x = geometry.adjoint(kernel, r / r.norm())
        r = geometry.apply(kernel, x / x.norm())
    assert 1 - r.norm().item() / exact > symbol_error


def test_unsupported_geometries_fall_back():
    kernel = torch.randn(4, 3, 3, 3)
    strided = ConvGeometry.create(kernel.shape, (32, 32), stride=2, padding=1)
    assert warm_start.symbol_start(strided, kernel) is None and not warm_start.supported(strided)
    for geometry in (ConvGeometry.create(kernel.shape, (32, 32), padding=1, padding_mode="reflect"),
                     ConvGeometry.create(kernel.shape, (32, 32), padding=1, padding_mode="replicate"),
                     ConvGeometry.create(kernel.shape, (8, 32), padding=1),  # a side below MIN_SIDE
                     ConvGeometry.for_linear(5, 7)):
        assert not warm_start.supported(geometry)
    geometry = ConvGeometry.create(kernel.shape, (32, 32), padding=1)
    assert warm_start.symbol_start(geometry, torch.zeros_like(kernel)) is None
    assert warm_start.symbol_start(geometry, torch.full_like(kernel, float("nan"))) is None


KINDS = [
    (srnc_ext.SRNCConv1d, (96,)), (srnc_ext.SRNCConv2d, (16, 16)), (srnc_ext.SRNCConv3d, (16, 16, 16)),
    (srnc_ext.SRNCConvTranspose1d, (96,)), (srnc_ext.SRNCConvTranspose2d, (16, 16)),
    (srnc_ext.SRNCConvTranspose3d, (16, 16, 16)),
]


def _warmed(cls, size, beta, mode, symbol, budget=False):
    """The layer after its warm-up: the symbol start or the random one, with the fixed iteration
    counts (``budget``: the small-operator iterations to WARMUP_TOL as well)."""
    torch.manual_seed(0)
    options = {} if mode == "zeros" else dict(padding_mode=mode)
    original, counts = warm_start.layer_starts, module.warmup_iterations
    try:
        if not symbol:
            warm_start.layer_starts = lambda layers: [None] * len(layers)
        if not budget:
            fixed = module.SYMBOL_WARMUP_ITERATIONS if symbol else module.WARMUP_ITERATIONS
            module.warmup_iterations = lambda geometry, n, symbol_start: (max(fixed, n), None)
        return cls(3, 4, 3, padding=1, alpha=0.8, beta=beta, bias=False, dtype=torch.float64, input_size=size,
                   **options)
    finally:
        warm_start.layer_starts, module.warmup_iterations = original, counts


@pytest.mark.parametrize("cls, size", KINDS, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("beta", (1.0, 0.3))
@pytest.mark.parametrize("mode", ("zeros", "circular"))
def test_every_kind_ends_its_warm_up_at_alpha(cls, size, beta, mode):
    """sigma_1(W_eff) after the warm-up alone: exact for circular padding, within 2e-3 of alpha for zero
    padding at 16 pixels a side (measured 1.0e-3 .. 1.8e-3), closer than the random start's 15 iterations."""
    if mode == "circular" and cls.__name__.startswith("SRNCConvTranspose"):
        pytest.skip("transposed convs have zero padding only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a beta below the reachable floor is not the point here
        layer = _warmed(cls, size, beta, mode, symbol=True)
        old = _warmed(cls, size, beta, mode, symbol=False)
    assert warm_start.layer_start(layer) is not None  # the symbol path ran
    assert layer.residual is not None and not layer.is_stale()
    sigma = spectral.spectral_norm(layer, tol=1e-10)
    error = abs(sigma / 0.8 - 1)
    assert error <= (1e-8 if mode == "circular" else 2e-3)
    assert error < abs(spectral.spectral_norm(old, tol=1e-10) / 0.8 - 1)
    # by default these small operators iterate on (to WARMUP_TOL, or for WARMUP_WORK) from either
    # start: never further from alpha than the fixed count (the power iteration's Rayleigh quotient
    # only grows), within 1e-4 where the tolerance was reached
    for symbol, fixed in ((True, layer), (False, old)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            budgeted = _warmed(cls, size, beta, mode, symbol=symbol, budget=True)
        budgeted_error = abs(spectral.spectral_norm(budgeted, tol=1e-10) / 0.8 - 1)
        assert budgeted_error <= abs(spectral.spectral_norm(fixed, tol=1e-10) / 0.8 - 1) + 1e-9
        if budgeted.residual <= module.WARMUP_TOL:
            assert budgeted_error <= 1e-4


def test_linear_lazy_and_strided_layers_keep_the_random_start(monkeypatch):
    calls = []
    original = warm_start.start_vectors
    monkeypatch.setattr(warm_start, "start_vectors", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    srnc_ext.SRNCLinear(5, 7)
    srnc_ext.SRNCConv2d(3, 4, 3, stride=2, padding=1, input_size=32)
    srnc_ext.SRNCConv2d(3, 4, 3, padding=1, padding_mode="reflect", input_size=32)
    assert not calls
    lazy = nn.Sequential(nn.LazyConv2d(4, 3, padding=1))
    srnc_ext.convert(lazy, alpha=1.0)
    lazy(torch.randn(1, 3, 20, 20))
    assert calls and lazy[0].input_size == (20, 20)
    assert spectral.spectral_norm(lazy[0], tol=1e-8) == pytest.approx(1.0, rel=1e-2)


def test_the_start_is_stored_in_the_layers_layout_and_dtype():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        layer = srnc_ext.SRNCConv2d(4, 6, 3, padding=1, beta=0.3, dtype=dtype, input_size=20)
        start = warm_start.layer_start(layer)
        assert set(start) == {"u", "v", "u_out", "v_out"}
        for name, value in start.items():
            buffer = layer._buffers[name]
            assert value.dtype == buffer.dtype == dtype and value.shape == buffer.shape
            assert value.is_contiguous(memory_format=torch.channels_last)
            assert buffer.is_contiguous(memory_format=torch.channels_last)
            assert value.norm().item() == pytest.approx(1.0, rel=1e-5)
    # beta = 1: no second power iteration to start
    assert set(warm_start.layer_start(srnc_ext.SRNCConv2d(4, 6, 3, padding=1, input_size=20))) == {"u", "v"}


def test_meta_inference_mode_and_autocast():
    with torch.device("meta"):
        layer = srnc_ext.SRNCConv2d(4, 4, 3, padding=1, input_size=31)
    assert warm_start.layer_start(layer) is None and layer.u.is_meta
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = srnc_ext.SRNCConv2d(4, 4, 3, padding=1, input_size=32, beta=0.3)
    assert not any(layer._buffers[n].is_inference() for n in layer.power_iteration.vector_names)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.reset_power_iteration()
    assert layer.u.dtype == torch.float32
    layer.train()
    layer(torch.randn(1, 4, 32, 32)).sum().backward()  # the buffers are usable outside inference mode


def test_a_failing_start_writes_nothing(monkeypatch):
    torch.manual_seed(0)
    layer = srnc_ext.SRNCConv2d(4, 4, 3, padding=1, input_size=32)
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    version = layer.power_iteration.version

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(warm_start, "symbol_starts", fail)
    with pytest.raises(RuntimeError, match="boom"):
        layer.reset_power_iteration()
    assert layer.power_iteration.version == version and not layer.is_stale()
    for name, buffer in layer.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0)


def test_symbol_warm_up_iteration_count_and_explicit_count():
    torch.manual_seed(0)
    layer = srnc_ext.SRNCConv2d(4, 4, 3, padding=1, input_size=32, n_power_iterations=1)
    calls = []
    original = module._refresh.refresh_layers
    try:
        module._refresh.refresh_layers = lambda layers, n=None, *a, **k: calls.append(n) or original(layers, n, *a, **k)
        layer.reset_power_iteration()
        layer.reset_power_iteration(4)
        layer.padding_mode = "reflect"  # not a symbol geometry any more: the random start's count
        layer.set_input_size(32)
    finally:
        module._refresh.refresh_layers = original
    # a small operator iterates on (to WARMUP_TOL) within WARMUP_WORK, from either start
    assert module.warmup_iterations(layer.geometry, 1, True) == module.warmup_iterations(layer.geometry, 1, False)
    small, tol = module.warmup_iterations(layer.geometry, 1, False)
    assert small > module.WARMUP_ITERATIONS and tol == module.WARMUP_TOL
    assert calls == [small, 4, small]


def test_warm_up_budget_by_operator_size():
    big = srnc_ext.SRNCConv2d(64, 64, 3, padding=1, padding_mode="reflect", input_size=64).geometry
    assert module.warmup_iterations(big, 1, False) == (module.WARMUP_ITERATIONS, None)
    assert module.warmup_iterations(big, 20, False) == (20, None)
    assert module.warmup_iterations(big, 1, True) == (module.SYMBOL_WARMUP_ITERATIONS, None)
    tiny = srnc_ext.SRNCConv2d(4, 5, 3, padding=1, input_size=8).geometry
    assert module.warmup_iterations(tiny, 1, False) == (module.MAX_WARMUP_ITERATIONS, module.WARMUP_TOL)


@pytest.mark.parametrize("seed", range(12))
def test_small_layers_start_at_alpha_whatever_the_init(seed):
    """A small layer's random-start warm-up converges (15 iterations left some 8x8 layers 7% above alpha)."""
    torch.manual_seed(seed)
    layer = srnc_ext.SRNCConv2d(4, 5, 3, padding=1, alpha=1.5, input_size=8)
    sigma = _dense_sigma(layer.geometry, layer.effective_weight().detach())
    assert abs(sigma / 1.5 - 1) < 1e-3, sigma


def test_a_batched_search_gives_each_kernel_its_own_start():
    """symbol_starts searches kernels side by side: each gets the start of a search on its own (the
    same float32 steps, batched), and a zero or non-finite kernel gets None without disturbing the others."""
    torch.manual_seed(0)
    geometry = ConvGeometry.create((6, 4, 3, 3), (16, 20), padding=2, dilation=2)
    kernels = torch.randn(5, 6, 4, 3, 3, dtype=torch.float64)
    kernels[1] = 0
    kernels[3, 0, 0, 0, 0] = float("inf")
    batched = warm_start.symbol_starts(geometry, kernels)
    assert batched[1] is None and batched[3] is None
    for i in (0, 2, 4):
        alone = warm_start.symbol_start(geometry, kernels[i])
        assert batched[i].group == alone.group
        assert batched[i].sigma == pytest.approx(alone.sigma, rel=1e-9)
        assert batched[i].w == pytest.approx(alone.w, abs=1e-6)
    # a batch larger than one search takes is split
    small = warm_start.SEARCH_ELEMENTS
    try:
        warm_start.SEARCH_ELEMENTS = 1
        split = warm_start.symbol_starts(geometry, kernels)
    finally:
        warm_start.SEARCH_ELEMENTS = small
    assert [s is None for s in split] == [s is None for s in batched]
    assert all(a is None or a.sigma == pytest.approx(b.sigma, rel=1e-9) for a, b in zip(split, batched))


def test_convert_warms_every_layer_up_in_one_batch_per_signature(monkeypatch):
    """convert searches once per refresh signature and warms up as many layers at once as the refresh
    batches; the result is that of each layer's own reset_power_iteration."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)],
                             nn.Conv2d(8, 8, 3, stride=2, padding=1))

    calls = []
    original = warm_start.symbol_starts
    monkeypatch.setattr(warm_start, "symbol_starts", lambda g, k: calls.append(len(k)) or original(g, k))
    for beta in (1.0, 0.3):
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model = srnc_ext.convert(build(), alpha=1.0, beta=beta, input_size=24)
        # the 3->8 layer and the four 8->8 ones (the strided one keeps the random start); beta < 1 adds
        # the second power iteration's start of each
        assert sorted(calls) == ([1, 4] if beta == 1 else [1, 1, 4, 4])
        for layer in model:
            alone = copy.deepcopy(layer)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                alone.reset_power_iteration()
            assert layer.residual is not None and not layer.is_stale()
            if warm_start.supported(layer.geometry):
                torch.testing.assert_close(layer.effective_weight(), alone.effective_weight(), rtol=1e-4, atol=1e-6)


def test_convert_names_a_layer_with_a_non_finite_weight_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '1': weight contains NaN or inf"):
        srnc_ext.convert(model, alpha=1.0, input_size=20)
    assert all(type(m) is nn.Conv2d for m in model)


def test_random_start_vectors_are_unit_and_in_the_vectors_layout():
    torch.manual_seed(0)
    for cls, size in ((srnc_ext.SRNCConv2d, 12), (srnc_ext.SRNCConv3d, (4, 5, 6)), (srnc_ext.SRNCConv1d, 30)):
        layer = cls(3, 5, 3, stride=2, padding=1, beta=0.5, input_size=size)  # strided: the random start
        fmt = batched_refresh.vector_format("cpu", layer.geometry.ndim)
        for name in layer.power_iteration.vector_names:
            buffer = layer._buffers[name]
            assert buffer.is_contiguous(memory_format=fmt)
            assert buffer.norm().item() == pytest.approx(1.0, rel=1e-5)
    from srnc_ext.power_iteration import _random_unit
    for shape, fmt in (((1, 3, 4, 5), torch.channels_last), ((1, 3, 4, 5, 6), torch.channels_last_3d)):
        value = _random_unit(shape, torch.float32, "cpu", fmt, 1e-12)
        assert value.shape == shape and value.is_contiguous(memory_format=fmt)
        assert value.norm().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="vector 'u': expected"):
        layer._allocate(layer.geometry, {"u": torch.zeros(3)})


def test_reset_power_iterations_of_a_model_starts_every_materialized_layer_anew():
    torch.manual_seed(0)
    model = nn.Sequential(srnc_ext.SRNCConv2d(3, 4, 3, padding=1, input_size=20), nn.ReLU(),
                          srnc_ext.SRNCConv2d(4, 4, 3, padding=1), srnc_ext.SRNCLinear(4, 2))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # replaced wholesale: the old vectors belong to another weight
    versions = [layer.power_iteration.version for layer in (model[0], model[3])]
    assert srnc_ext.reset_power_iterations(model) == 2  # model[2] has no input size yet
    assert [layer.power_iteration.version for layer in (model[0], model[3])] > versions
    assert not model[2].materialized and not model[0].is_stale()
    assert spectral.spectral_norm(model[0], tol=1e-8) == pytest.approx(1.0, rel=2e-3)
    with pytest.raises(RuntimeError, match="input_size is unknown"):
        srnc_ext.reset_power_iterations([model[2]])
    with pytest.raises(ValueError, match="n_iterations must be an int >= 1"):
        srnc_ext.reset_power_iterations(model, 0)
