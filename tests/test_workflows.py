"""SRNCConv2d in the workflows users already run: EMA updates, functional calls, torch.func,
second-order gradients, inference mode, meta-device init, lazy conversion, exports.

The contract under test: the forward's weight is always the SRN-C reweighting of the *current*
weight with the *current* power-iteration state, whatever changed either of them. The expected
values are recomputed from the layer's tensors with the per-layer reference (``srnc_ext.reference``).
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import singular_values
from torch import nn
from torch.func import functional_call

import srnc_ext
from srnc_ext import SRNCConv2d, backends, convert, reference


def _layer(**kwargs):
    torch.manual_seed(0)
    options = dict(alpha=1.5, beta=0.3, input_size=8)
    options.update(kwargs)
    return SRNCConv2d(4, 5, 3, padding=1, **options)


def _reference_weight(layer, weight=None):
    """The effective weight from ``weight`` (default the layer's) and the layer's vectors."""
    geometry = layer.geometry
    s1 = reference.rank_one_kernel(layer.u, layer.v, geometry)
    s1_out = None
    if reference.needs_second_iteration(layer.variant, layer.beta):
        s1_out = reference.rank_one_kernel(layer.u_out, layer.v_out, geometry)
    weight = layer.weight if weight is None else weight
    return reference.srnc_weight(weight.to(layer.u.dtype), s1, geometry, alpha=layer.alpha, beta=layer.beta,
                                 eps=layer.eps, variant=layer.variant, s1_out=s1_out,
                                 floor=layer.sigma_floor * layer.alpha).to(weight.dtype)


def _expected(layer, x, weight=None):
    return F.conv2d(x, _reference_weight(layer, weight), layer.bias, layer.stride, layer.padding)


def _trained(steps=3, **kwargs):
    layer = _layer(**kwargs)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 4, 8, 8, generator=gen, dtype=layer.weight.dtype)
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    return layer


class Net(nn.Module):
    def __init__(self, beta=0.3):
        super().__init__()
        self.a = SRNCConv2d(3, 6, 3, padding=1, beta=beta, input_size=8)
        self.b = SRNCConv2d(6, 3, 3, padding=1, alpha=1.2, beta=beta, input_size=8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _train_step(model, opt, gen):
    x = torch.randn(2, 3, 8, 8, generator=gen)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _assert_current(model, x):
    """Every SRN-C layer's eval output equals the reference on its current weight and vectors."""
    for layer in model.modules():
        if isinstance(layer, SRNCConv2d):
            xi = torch.randn(2, layer.in_channels, 8, 8)
            torch.testing.assert_close(layer(xi), _expected(layer, xi), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- EMA and averaging
def test_basicsr_ema_update_through_data_changes_the_eval_output():
    """BasicSR's ``model_ema`` (basicsr/models/base_model.py): params only, through ``.data``,
    which does not move the version counter."""
    model = _trained()
    ema = copy.deepcopy(model).eval()
    x = torch.randn(2, 4, 8, 8)
    before = ema(x)  # the weight of this forward is cached
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(0.05 * torch.randn_like(model.weight))
        ema_params, params = dict(ema.named_parameters()), dict(model.named_parameters())
        for name in ema_params:
            ema_params[name].data.mul_(0.9).add_(params[name].data, alpha=1 - 0.9)
        out = ema(x)
        torch.testing.assert_close(out, _expected(ema, x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, before)


def test_gradcheck_with_respect_to_the_weight_in_eval():
    """gradcheck perturbs the weight in place: each perturbation must reach the output."""
    layer = _layer(dtype=torch.float64).eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: layer(x), (layer.weight,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("version", ("ModelEmaV2", "ModelEmaV3"))
def test_timm_model_ema(version):
    """timm's EMA zips ``state_dict().values()`` of two models and copies/lerps into each: the
    state_dict must hold tensors only, and the EMA copy's output follow its tensors."""
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    torch.manual_seed(0)
    model = Net()
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())
    ema = getattr(timm_ema, version)(model, decay=0.9)
    opt, gen = torch.optim.Adam(model.parameters(), lr=1e-2), torch.Generator().manual_seed(2)
    ema.module.eval()
    ema.module(torch.randn(1, 3, 8, 8))  # fills the caches before the updates
    for _ in range(3):
        _train_step(model, opt, gen)
        ema.update(model)
    x = torch.randn(2, 3, 8, 8)
    _assert_current(ema.module, x)
    assert srnc_ext.refresh(ema.module, n_iterations=300) == 2  # vectors for the averaged weights
    for layer in (ema.module.a, ema.module.b):
        sigma = singular_values(layer.geometry, layer.effective_weight())[0].item()
        assert sigma == pytest.approx(layer.alpha, rel=1e-3)


@pytest.mark.parametrize("use_buffers", (False, True))
def test_swa_averaged_model(use_buffers):
    torch.manual_seed(0)
    model = Net()
    swa = torch.optim.swa_utils.AveragedModel(model, use_buffers=use_buffers)
    opt, gen = torch.optim.Adam(model.parameters(), lr=1e-2), torch.Generator().manual_seed(3)
    swa.eval()
    swa(torch.randn(1, 3, 8, 8))
    for _ in range(3):
        _train_step(model, opt, gen)
        swa.update_parameters(model)
    _assert_current(swa.module, torch.randn(2, 3, 8, 8))


def test_written_vectors_are_followed_by_their_constants():
    """An external write of the buffers (an EMA of them, a manual copy) re-derives the rank-one
    kernels the reweighting uses."""
    layer = _trained(dtype=torch.float64).eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    layer(x)
    with torch.no_grad():  # random unit vectors: a badly conditioned estimate, hence float64
        for name in ("u", "v", "u_out", "v_out"):
            new = torch.randn_like(getattr(layer, name))
            getattr(layer, name).copy_(new / new.norm())
    torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- functional calls and torch.func
def test_functional_call_with_a_fresh_weight_per_call_in_a_loop():
    """Nothing keeps a call's weight alive: its id is free for the next call's."""
    layer = _layer(dtype=torch.float64).eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    outputs, expected = [], []
    with torch.no_grad():
        for seed in range(30):
            w = torch.randn(layer.weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            outputs.append(functional_call(layer, {"weight": w}, (x,)))
            expected.append(_expected(layer, x, w))
            del w
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ("eval", "train"))
def test_functional_call_with_a_new_weight_every_call(mode):
    layer = _layer(dtype=torch.float64)  # random weights against fixed vectors: badly conditioned in float32
    layer.train(mode == "train")
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for _ in range(30):  # freed weights' ids get reused: ids alone would return an old output
        w = torch.randn_like(layer.weight, requires_grad=True)
        out = functional_call(layer, {"weight": w}, (x,))
        torch.testing.assert_close(out, _expected(layer, x, w.detach()), rtol=1e-9, atol=1e-10)
        (grad,) = torch.autograd.grad(out.square().sum(), w)
        w_ref = w.detach().clone().requires_grad_()
        (expected,) = torch.autograd.grad(_expected(layer, x, w_ref).square().sum(), w_ref)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-10)


def test_torch_func_grad_and_vmap_over_functional_call():
    layer = _layer(dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    u = layer.u.clone()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    grads = torch.func.grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    torch.testing.assert_close(layer.u, u, rtol=0, atol=0)  # no refresh inside a transform
    w = layer.weight.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(_expected(layer, x, w).square().sum(), w)
    torch.testing.assert_close(grads["weight"], expected, rtol=1e-9, atol=1e-10)

    weights = torch.randn(3, *layer.weight.shape, dtype=torch.float64)
    outs = torch.func.vmap(lambda wi: functional_call(layer, {"weight": wi}, (x,)))(weights)
    for wi, out in zip(weights, outs):
        torch.testing.assert_close(out, _expected(layer, x, wi), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant,beta", [("projected", 0.3), ("projected", 1.0), ("paper", 0.3)])
def test_hessian_vector_product(variant, beta):
    layer = _layer(variant=variant, beta=beta, dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    direction = torch.randn_like(layer.weight)

    def hvp(forward, weight):
        (g,) = torch.autograd.grad(forward(weight).square().sum(), weight, create_graph=True)
        return torch.autograd.grad((g * direction).sum(), weight)[0]

    got = hvp(lambda w: layer(x), layer.weight)
    w = layer.weight.detach().clone().requires_grad_()
    expected = hvp(lambda w: _expected(layer, x, w), w)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------- inference mode and meta init
def test_inference_mode_construction_and_forward():
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        layer = _layer()
        out = layer(x)
        expected = _expected(layer, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_lazy_layer_materialized_in_inference_mode_then_trained():
    layer = _layer(input_size=None)
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        layer(x)  # a validation pass before training
    assert not layer.u.is_inference()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    u = layer.u.clone()
    layer(x).square().mean().backward()
    opt.step()
    layer(x)
    assert not torch.equal(layer.u, u)


@pytest.mark.parametrize("beta", (1.0, 0.1))
@pytest.mark.parametrize("how", ("constructor", "convert"))
def test_meta_init_to_empty_and_load_state_dict(beta, how):
    source = _trained(beta=beta).eval()
    x = torch.randn(2, 4, 8, 8)
    expected = source(x)
    with torch.device("meta"):
        if how == "constructor":
            layer = SRNCConv2d(4, 5, 3, padding=1, alpha=1.5, beta=beta, input_size=8)
        else:
            layer = convert(nn.Conv2d(4, 5, 3, padding=1), alpha=1.5, beta=beta, input_size=8)
    assert layer.u.is_meta
    layer.to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert not layer.is_stale()


def test_a_meta_layer_first_leaves_no_meta_constants_for_later_layers():
    """The geometry's cached constants (pad index, tap Gram) are made on the CPU even when the
    first layer of that geometry is built inside ``with torch.device("meta")``."""
    size = 23  # a geometry no other test builds first
    with torch.device("meta"):
        meta_layer = SRNCConv2d(3, 4, 3, padding=1, input_size=size)
    assert meta_layer.u.is_meta
    layer = SRNCConv2d(3, 4, 3, padding=1, alpha=1.5, input_size=size)
    assert layer._gram.device.type == "cpu" and layer._gram_pinv.device.type == "cpu"
    sigma = singular_values(layer.geometry, layer.effective_weight())[0].item()
    assert sigma == pytest.approx(1.5, rel=1e-2)


def test_to_empty_then_reset_parameters_gives_a_normalized_layer():
    with torch.device("meta"):
        layer = SRNCConv2d(4, 5, 3, padding=1, alpha=1.5, input_size=8)
    layer.to_empty(device="cpu")
    layer.reset_parameters()  # what FSDP's default param_init does
    sigma = singular_values(layer.geometry, layer.effective_weight())[0].item()
    assert sigma == pytest.approx(1.5, rel=1e-2)


@pytest.mark.skipif(not backends.compiled_available("cpu"), reason="srnc_ext._C not built")
def test_lazy_convert_then_load_keeps_the_compiled_backend():
    torch.manual_seed(0)
    saved = convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)), alpha=1.2, beta=0.3)
    x = torch.randn(2, 3, 8, 8)
    saved(x)
    saved.eval()
    expected = saved(x)
    model = convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)), alpha=1.2, beta=0.3)
    model.load_state_dict(saved.state_dict())
    model.eval()
    assert all(m.ops.name == "compiled" for m in model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- the state_dict format
def test_state_dict_holds_tensors_only_and_round_trips_freshness():
    layer = _trained()
    state = layer.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "_extra_state" not in state and bool(state["_fresh"])
    fresh = SRNCConv2d(4, 5, 3, padding=1, alpha=1.5, beta=0.3)
    fresh.load_state_dict(state)
    assert fresh.input_size == (8, 8) and not fresh.is_stale()


def test_checkpoint_of_the_earlier_format_loads():
    """srnc_ext 0.1.0 saved input size, variant and freshness as an ``_extra_state`` dict."""
    layer = _trained().eval()
    state = dict(layer.state_dict())
    state.pop("_fresh")
    state["_extra_state"] = {"input_size": (8, 8), "variant": "projected", "fresh": True}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = SRNCConv2d(4, 5, 3, padding=1, alpha=1.5, beta=0.3)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    loaded.eval()
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    assert not loaded.is_stale()
    state["_extra_state"]["variant"] = "paper"
    with pytest.raises(RuntimeError, match="variant"):
        SRNCConv2d(4, 5, 3, padding=1, beta=0.3).load_state_dict(state)


def test_vectors_of_another_variant_are_refused():
    state = _layer(variant="projected").state_dict()
    with pytest.raises(RuntimeError, match="variant"):
        SRNCConv2d(4, 5, 3, padding=1, beta=0.3, variant="paper").load_state_dict(state)


# ---------------------------------------------------------------- warm-up, floor, convergence
_CONFIGS = [
    dict(c_in=6, c_out=6, k=3, padding=1, size=10),
    dict(c_in=4, c_out=8, k=3, padding=1, size=12, stride=2),
    dict(c_in=8, c_out=4, k=5, padding=2, size=9),
    dict(c_in=3, c_out=5, k=3, padding=2, size=11, dilation=2),
    dict(c_in=6, c_out=6, k=3, padding=1, size=10, padding_mode="reflect"),
]


@pytest.mark.parametrize("index", range(len(_CONFIGS)))
def test_sigma_is_alpha_before_the_first_step_with_many_power_iterations(index):
    config = dict(_CONFIGS[index])
    size, c_in, c_out, k = (config.pop(key) for key in ("size", "c_in", "c_out", "k"))
    torch.manual_seed(index)
    layer = SRNCConv2d(c_in, c_out, k, alpha=2.0, input_size=size, n_power_iterations=400, dtype=torch.float64,
                       **config)
    sigma = singular_values(layer.geometry, layer.effective_weight())[0].item()
    assert sigma / 2.0 - 1 == pytest.approx(0, abs=5e-4)
    # the residual bounds the error it leaves (plus eps = 1e-12, added to the estimate before dividing)
    assert abs(sigma / 2.0 - 1) <= layer.residual + 1e-12


def test_floor_warning_names_the_layer_and_the_smallest_beta():
    """A 1x1 conv's operator is ``M (x) I_HW``: its rank-one component has stable rank H*W = 64, so
    on 8x8 maps a 5->3 layer (full rank 192) cannot go below beta = 1/3; 0.3 asks for 57.6."""
    with pytest.warns(RuntimeWarning, match=r"SRN-C layer 0: beta=0.3 .* smallest reachable beta") as record:
        model = convert(nn.Sequential(nn.Conv2d(5, 3, 1)), alpha=1.0, beta=0.3, input_size=8)
    smallest = float(str(record[0].message).rsplit(" ", 1)[-1].rstrip("."))
    assert smallest == pytest.approx(1 / 3, rel=0.02)
    layer = model[0]
    assert layer.srnc_name == "0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.refresh()  # once per layer
        _layer(beta=0.9).refresh()  # reachable: silent


def _close_spectrum_layer(n=32):
    """One channel, circular 3x3 kernel ``[[0,0,0],[0,1,1],[0,0,0]]``: |K^(w)| = 2|cos(w2/2)|, so the
    next singular value is 2cos(pi/n), within 0.5 % of the top one at n = 32: slow power iteration."""
    layer = SRNCConv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False, input_size=n, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, 1, 1:] = 1.0
    # the random start with the fixed count: the symbol start (srnc_ext.warm_start) is the exact top pair
    # of a circulant operator, and a small operator's default warm-up iterates on to WARMUP_TOL, either
    # leaving no slow convergence to watch
    original, srnc_ext.warm_start.layer_starts = srnc_ext.warm_start.layer_starts, lambda layers: [None] * len(layers)
    try:
        layer.reset_power_iteration(srnc_ext.module.WARMUP_ITERATIONS)
    finally:
        srnc_ext.warm_start.layer_starts = original
    return layer


def test_residual_flags_slow_convergence_and_tol_iterates_until_it_holds():
    layer = _close_spectrum_layer()
    layer.refresh(200)
    error = singular_values(layer.geometry, layer.effective_weight())[0].item() - 1.0
    assert error > 1e-5 and layer.residual > error  # 0.01 % above alpha, and the residual says so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        residual = layer.refresh(20_000, tol=1e-9)
    assert residual <= 1e-9
    assert singular_values(layer.geometry, layer.effective_weight())[0].item() == pytest.approx(1.0, abs=1e-9)
    with pytest.warns(RuntimeWarning, match="tol"):
        _close_spectrum_layer().refresh(10, tol=1e-12)
    with pytest.raises(ValueError, match="tol"):
        layer.refresh(tol=0.0)


def test_model_report_shows_the_residual():
    model = nn.Sequential(_layer(), nn.Conv2d(5, 2, 3, padding=1))
    rows = srnc_ext.spectral.model_report(model, 8)
    assert rows[0].residual == pytest.approx(model[0].residual) and rows[1].residual is None
    assert "residual" in srnc_ext.spectral.format_report(rows)


# ---------------------------------------------------------------- exports
def test_jit_script_says_to_use_to_conv2d():
    with pytest.raises(RuntimeError, match="to_conv2d"):
        torch.jit.script(nn.Sequential(_layer()))


def test_jit_trace_in_eval_matches_and_in_training_says_to_use_to_conv2d():
    model = nn.Sequential(_trained(), nn.ReLU()).eval()
    x = torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's deprecation and tracer warnings
        traced = torch.jit.trace(model, x)
        other = torch.randn(3, 4, 8, 8)
        torch.testing.assert_close(traced(other), model(other), rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="to_conv2d"):
            torch.jit.trace(model.train(), x)


@pytest.mark.parametrize("padding_mode,size,method", [("circular", 6, "fft"), ("zeros", 6, "matrix"), ("zeros", 6, "arpack")])
def test_model_report_of_an_all_zero_layer(padding_mode, size, method):
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    with torch.no_grad():
        conv.weight.zero_()
    (row,) = srnc_ext.spectral.model_report(nn.Sequential(conv), size, method=method)
    assert row.sigma_max == 0.0 and row.stable_rank == 0.0 and row.method == method


# ---------------------------------------------------------------- diagnostics leave the model as found
class _Branch(nn.Module):
    """A forward branch in the style of BasicVSR's: features propagated frame to frame."""

    def __init__(self):
        super().__init__()
        self.body = SRNCConv2d(6, 3, 3, padding=1, alpha=1.1, input_size=8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, h):
        h = torch.zeros_like(x) if h is None else h
        y = self.drop(self.body(torch.cat([x, h], 1)))
        return y, y


def test_trf_through_as_recurrent_with_module_leaves_no_trace():
    torch.manual_seed(0)
    branch = _Branch().train()
    branch.drop.eval()  # mixed modes must come back as they were
    flags = {name: p.requires_grad for name, p in branch.named_parameters()}
    before = copy.deepcopy(branch.state_dict())
    wrapped = srnc_ext.diagnostics.as_recurrent(lambda x, h: branch(x, h), module=branch)
    srnc_ext.diagnostics.trf(wrapped, frames=5, size=8, iters=2, progress=False)
    assert branch.training and not branch.drop.training and branch.body.training
    assert all(p.grad is None for p in branch.parameters())
    assert {name: p.requires_grad for name, p in branch.named_parameters()} == flags
    for name, value in branch.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    with pytest.raises(TypeError, match="module"):
        srnc_ext.diagnostics.as_recurrent(lambda x, h: (x, h), module="branch")


def test_instability_onsets_restores_the_modes():
    torch.manual_seed(0)
    branch = _Branch().train()
    wrapped = srnc_ext.diagnostics.as_recurrent(lambda x, h: branch(x, h), module=branch)
    frames = (torch.rand(3, 8, 8) for _ in range(4))
    result = srnc_ext.diagnostics.instability_onsets(wrapped, frames, lambda clean: (clean, clean))
    assert result["frames"] == 4 and branch.training and branch.body.training


def test_input_size_comes_from_the_saved_vectors_not_from_metadata():
    """A crafted checkpoint with a huge input size and no vectors allocates nothing."""
    state = {"weight": torch.randn(5, 4, 3, 3), "bias": torch.randn(5),
             "_extra_state": {"input_size": (100_000, 100_000), "variant": "projected", "fresh": True}}
    layer = SRNCConv2d(4, 5, 3, padding=1, beta=0.3)
    layer.load_state_dict(state)
    assert layer.input_size is None and layer.u is None


# ---------------------------------------------------------------- a basicsr-style video model (issue 12)
class _TinyVSR(nn.Module):
    """The layer mix of BasicVSR++ / EDVR-like models, small: a SPyNet-like pyramid of 7x7 convs whose
    coarsest level runs on 1x1 maps, a zero-initialized offset conv (as their DCN packs have), a Conv3d
    over time, pixel-shuffle upsamplers at 2x and 4x size and a ConvTranspose2d."""

    def __init__(self):
        super().__init__()
        level = lambda: nn.Sequential(nn.Conv2d(6, 8, 7, padding=3), nn.ReLU(), nn.Conv2d(8, 6, 7, padding=3))
        self.feat = nn.Conv2d(3, 6, 3, padding=1)
        self.spynet = nn.ModuleList([level() for _ in range(3)])  # 1x1, 2x2, 4x4 maps
        self.offset = nn.Conv2d(6, 6, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.temporal = nn.Conv3d(6, 6, 3, padding=1)
        self.up = nn.Sequential(nn.Conv2d(6, 24, 3, padding=1), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
                                nn.Conv2d(6, 24, 3, padding=1), nn.PixelShuffle(2), nn.LeakyReLU(0.1))
        self.deconv = nn.ConvTranspose2d(6, 3, 4, stride=2, padding=1)

    def forward(self, clip):  # (B, T, 3, 4, 4) -> (B, 3, 32, 32)
        frames = []
        for t in range(clip.shape[1]):
            f = self.feat(clip[:, t])
            for i, level in enumerate(self.spynet):
                coarse = F.adaptive_avg_pool2d(f, 2**i)
                f = f + F.interpolate(level(coarse), size=f.shape[-2:], mode="nearest")
            frames.append(f + self.offset(f))
        fused = self.temporal(torch.stack(frames, 2))[:, :, -1]
        return self.deconv(self.up(fused))


def test_a_video_model_with_every_conv_kind_converts_trains_reports_and_comes_back():
    torch.manual_seed(0)
    original = _TinyVSR()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every conv kind converted: nothing left alone, nothing to warn about
        model = convert(copy.deepcopy(original), alpha=1.0, beta=0.5)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))}
    assert len(convs) == 12 and all(isinstance(m, srnc_ext.SRNCLayer) for m in convs.values())
    assert model.offset.sigma_floor == 1.0  # zero-initialized: trains like the unconverted layer
    assert type(model.temporal) is srnc_ext.SRNCConv3d and type(model.deconv) is srnc_ext.SRNCConvTranspose2d
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    clip, target = torch.rand(2, 3, 3, 4, 4), torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer normalized for the size it runs at: no size warning
        for _ in range(3):
            loss = (model(clip) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.isfinite(loss)
    offset_grad_state = opt.state[model.offset.weight]
    assert all(bool(torch.isfinite(v).all()) for v in offset_grad_state.values()) and model.offset.weight.abs().max() > 0
    sizes = {name: m.input_size for name, m in convs.items()}
    assert sizes["spynet.0.0"] == (1, 1) and sizes["spynet.1.0"] == (2, 2) and sizes["up.3"] == (8, 8)
    assert sizes["temporal"] == (3, 4, 4) and sizes["deconv"] == (16, 16)
    srnc_ext.refresh(model, 600)  # the deconv converges slowest (close top singular values): 150 steps left 1.5e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = srnc_ext.spectral.model_report(model, None)
    assert {row.name for row in rows} == set(convs)
    for row in rows:  # sigma_1 at each layer's own size (explicit matrix, FFT, or iterative to tol 1e-8)
        if row.name == "offset":  # 3 steps from zero: still far below alpha, scaled linearly
            assert 0 < row.sigma_max < 0.5
        else:
            assert row.sigma_max == pytest.approx(1.0, rel=1e-3), row.name
    model.eval()
    expected = model(clip)
    baked = srnc_ext.to_conv2d(copy.deepcopy(model))
    torch.testing.assert_close(baked(clip), expected, rtol=1e-5, atol=1e-6)
    removed = srnc_ext.remove(copy.deepcopy(model))
    plain = copy.deepcopy(original)
    plain.load_state_dict(removed.state_dict())  # the architecture it was converted from, with the raw weights
    plain.eval()
    assert [type(m) for m in removed.modules()] == [type(m) for m in plain.modules()]
    torch.testing.assert_close(removed(clip), plain(clip), rtol=0, atol=0)
