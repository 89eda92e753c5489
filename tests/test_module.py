"""SRNCConv2d: once-per-step updates, gradients against the reference, modes, state, precision."""
import copy
import io
import pickle
import warnings

import pytest
from memory_limits import address_space_headroom
import torch
import torch.nn.functional as F
from oracles import singular_values

import srnc_ext
from srnc_ext import LazySRNCConv2d, SRNCConv2d, reference
from srnc_ext.conv_operator import ConvGeometry


def _layer(**kwargs):
    torch.manual_seed(0)
    options = dict(alpha=1.5, beta=0.3, input_size=8)
    options.update(kwargs)
    return SRNCConv2d(4, 5, 3, padding=1, **options)


def _reference_weight(layer):
    """The effective weight, recomputed from the layer's buffers with the reference functions."""
    geometry = layer.geometry
    s1 = reference.rank_one_kernel(layer.u, layer.v, geometry)
    s1_out = None
    if reference.needs_second_iteration(layer.variant, layer.beta):
        s1_out = reference.rank_one_kernel(layer.u_out, layer.v_out, geometry)
    return reference.srnc_weight(layer.weight, s1, geometry, alpha=layer.alpha, beta=layer.beta, eps=layer.eps,
                                 variant=layer.variant, s1_out=s1_out, floor=layer.sigma_floor * layer.alpha)


def _buffers(layer):
    return {name: buf.clone() for name, buf in layer.named_buffers()}


@pytest.mark.parametrize("variant", ("projected", "paper"))
def test_recurrent_unroll_advances_once_and_matches_reference_gradient(variant):
    layer = _layer(variant=variant, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(1.01)  # as an optimizer step would: the next training forward refreshes
    twin = copy.deepcopy(layer)
    frames = torch.randn(7, 2, 4, 8, 8, dtype=torch.float64)
    h = torch.zeros(2, 5, 8, 8, dtype=torch.float64)
    for x in frames:  # T = 7 forwards, one backward
        h = torch.tanh(layer(x) + 0.5 * h)
    h.square().mean().backward()

    twin.refresh()  # exactly one refresh
    for name, buf in twin.named_buffers():
        torch.testing.assert_close(getattr(layer, name), buf, rtol=0, atol=0)
    weight = _reference_weight(twin)
    h = torch.zeros(2, 5, 8, 8, dtype=torch.float64)
    for x in frames:
        h = torch.tanh(F.conv2d(x, weight, twin.bias, padding=1) + 0.5 * h)
    h.square().mean().backward()
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad, rtol=1e-10, atol=1e-12)


def test_gradient_accumulation_matches_full_batch_and_refreshes_once_per_step():
    layer = _layer(dtype=torch.float64)
    twin = copy.deepcopy(layer)
    x = torch.randn(6, 4, 8, 8, dtype=torch.float64)
    for chunk in x.chunk(3):  # three micro-batches, backward after each
        layer(chunk).square().sum().backward()
    twin(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.u, twin.u, rtol=0, atol=0)
    u_before = layer.u.clone()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    layer(x[:1])
    assert not torch.equal(layer.u, u_before)  # the optimizer step triggered exactly one refresh
    u_after = layer.u.clone()
    layer(x[:1])
    torch.testing.assert_close(layer.u, u_after, rtol=0, atol=0)


def test_eval_never_updates_and_equals_last_training_output():
    layer = _layer()
    x = torch.randn(2, 4, 8, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    train_out = layer(x).detach()
    state = _buffers(layer)
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x)
        layer.weight.add_(0.01)  # a changed weight must not move the vectors in eval
        layer(x)
    torch.testing.assert_close(eval_out, train_out, rtol=0, atol=0)
    for name, buf in layer.named_buffers():
        torch.testing.assert_close(buf, state[name], rtol=0, atol=0)


def test_no_grad_forward_in_training_mode_refreshes():
    layer = _layer()
    u = layer.u.clone()
    with torch.no_grad():
        layer.weight.mul_(1.1)
        out = layer(torch.randn(1, 4, 8, 8))
    assert not out.requires_grad and not torch.equal(layer.u, u)


@pytest.mark.parametrize("variant", ("projected", "paper"))
def test_state_dict_round_trip_into_fresh_lazy_layer(variant):
    layer = _layer(variant=variant, input_size=None)
    x = torch.randn(2, 4, 9, 7)
    layer(x).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    layer(x)
    layer.eval()
    expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = SRNCConv2d(4, 5, 3, padding=1, alpha=1.5, beta=0.3, variant=variant)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert fresh.input_size == (9, 7)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_load_rejects_mismatched_vectors_without_touching_state():
    layer = _layer()
    other = _layer(input_size=6)
    before = _buffers(layer)
    state = other.state_dict()
    state["u"] = torch.randn(1, 5, 3, 3)
    with pytest.raises(RuntimeError, match="shape"):
        layer.load_state_dict(state)
    for name, buf in layer.named_buffers():
        torch.testing.assert_close(buf, before[name], rtol=0, atol=0)


def test_load_refuses_vectors_whose_storage_is_smaller_than_their_shape_without_allocating():
    """A crafted state_dict (stride-0 expanded vectors claiming a 100000x100000 input: 160 GB in a
    4-byte storage, a tiny file) is refused naming the key before any buffer of that size is made.
    With every vector crafted consistently the shape checks alone would accept it and allocate."""
    huge = (100_000, 100_000)
    crafted = {"v": {"v": (1, 4, *huge)},
               "u": {"u": (1, 5, *huge), "v": (1, 4, *huge), "u_out": (1, 5, *huge), "v_out": (1, 4, *huge)}}
    for refused, vectors in crafted.items():
        for input_size in (8, None):  # a materialized layer, and one that would take the size from v
            layer = _layer(input_size=input_size)
            before = _buffers(layer)
            state = _layer().state_dict()
            state.update({name: torch.zeros(1).expand(*shape) for name, shape in vectors.items()})
            buffer = io.BytesIO()
            torch.save(state, buffer)
            assert buffer.tell() < 100_000
            buffer.seek(0)
            shape = vectors[refused]
            with address_space_headroom(), pytest.raises(
                    RuntimeError, match=rf"<layer>\.{refused}: refused, shape \({', '.join(map(str, shape))}\) "
                                        rf"needs {shape[1] * 10**10} elements but its storage holds 1"):
                layer.load_state_dict(torch.load(buffer, weights_only=True))
            assert _buffers(layer).keys() == before.keys()
            for name, buf in _buffers(layer).items():
                torch.testing.assert_close(buf, before[name], rtol=0, atol=0)
    sparse = _layer().state_dict()
    sparse["u"] = torch.zeros(1, 5, 8, 8).to_sparse()
    with pytest.raises(RuntimeError, match=r"<layer>\.u: refused, a torch.sparse_coo tensor"):
        _layer().load_state_dict(sparse)


def test_deepcopy_and_pickle_give_identical_outputs():
    layer = _layer()
    x = torch.randn(1, 4, 8, 8)
    layer(x)
    layer.eval()
    expected = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        clone.eval()
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_lazy_input_size_from_first_input_and_other_sizes_allowed():
    layer = _layer(input_size=None)
    assert layer.input_size is None and layer.u is None
    layer(torch.randn(1, 4, 12, 10))
    assert layer.input_size == (12, 10) and layer.u.shape == (1, 5, 12, 10)
    with pytest.warns(RuntimeWarning, match=r"normalized for input size \(12, 10\) but got an input of size \(6, 6\)"):
        out = layer(torch.randn(3, 4, 6, 6))  # another size: same weight, documented
    assert out.shape == (3, 5, 6, 6)
    assert layer(torch.randn(4, 12, 10)).shape == (5, 12, 10)  # unbatched input


def test_one_iteration_per_step_training_keeps_sigma_within_two_percent():
    torch.manual_seed(0)
    layer = SRNCConv2d(6, 6, 3, padding=1, alpha=2.0, beta=0.1, input_size=10)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(50):
        x = torch.randn(4, 6, 10, 10)
        loss = (layer(x) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer(torch.randn(1, 6, 10, 10))  # refresh on the final weight, as the next step would
    sigma = singular_values(layer.geometry, layer.effective_weight())[0].item()
    assert sigma == pytest.approx(2.0, rel=0.02)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_parameters_normalize_in_float32(dtype):
    layer = _layer()
    reference_weight = layer.effective_weight().detach()
    layer.to(dtype)
    assert layer.weight.dtype == dtype and layer.u.dtype == torch.float32
    weight = layer.effective_weight()
    assert weight.dtype == dtype
    # only the rounding of the raw weight to dtype and of the result separate the two
    torch.testing.assert_close(weight.float(), reference_weight, rtol=2e-2, atol=2e-2)
    if dtype == torch.bfloat16:  # CPU convolutions support bfloat16
        out = layer(torch.randn(1, 4, 8, 8, dtype=dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_float64_layer_keeps_float64_vectors():
    layer = _layer(dtype=torch.float64)
    assert layer.u.dtype == torch.float64 and layer.effective_weight().dtype == torch.float64


def test_autocast_runs_refresh_and_normalization_in_float32():
    layer = _layer()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 4, 8, 8)
    twin(x)  # refresh without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)  # refresh under autocast
        weight = layer.effective_weight()
    assert out.dtype == torch.bfloat16 and weight.dtype == torch.float32
    torch.testing.assert_close(layer.u, twin.u, rtol=0, atol=0)
    torch.testing.assert_close(weight.detach(), twin.effective_weight().detach(), rtol=0, atol=0)


def test_all_zero_weight_gives_zero_effective_weight():
    layer = _layer()
    with torch.no_grad():
        layer.weight.zero_()
    out = layer(torch.randn(1, 4, 8, 8))
    weight = layer.effective_weight()
    assert torch.count_nonzero(weight) == 0 and torch.isfinite(out).all()
    assert torch.isfinite(layer.u).all() and torch.linalg.vector_norm(layer.u) > 0.99


@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_non_finite_weight_raises_before_vectors_move(bad):
    layer = _layer()
    before = _buffers(layer)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        layer(torch.randn(1, 4, 8, 8))
    for name, buf in layer.named_buffers():
        torch.testing.assert_close(buf, before[name], rtol=0, atol=0)


def test_huge_finite_weight_whose_sum_overflows_is_not_rejected():
    """The refresh checks finiteness by a sum first; an overflowing sum of finite entries is fine."""
    layer = SRNCConv2d(4, 4, 3, padding=1, input_size=8)
    with torch.no_grad():
        layer.weight.fill_(3e37)  # 144 entries: the float32 sum overflows to inf
    assert not torch.isfinite(layer.weight.sum())
    layer.refresh()
    assert torch.isfinite(layer.u).all() and torch.isfinite(layer.v).all()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(alpha=float("inf")), ValueError, "alpha"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(n_power_iterations=0), ValueError, "n_power_iterations"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(variant="literal"), ValueError, "variant"),
        (dict(input_size=0), ValueError, "input_size"),  # 2 (< the kernel) is valid: zero padding 1 fits it
        (dict(input_size="big"), ValueError, "input_size"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(dtype=torch.complex64), TypeError, "dtype"),
    ],
)
def test_bad_constructor_arguments_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        _layer(**kwargs)


def test_dilated_kernel_larger_than_input_size_raises():
    with pytest.raises(ValueError, match="input_size"):
        SRNCConv2d(2, 2, 3, dilation=3, input_size=(6, 8))


def test_channel_mismatch_raises_without_materializing():
    layer = _layer(input_size=None)
    with pytest.raises(ValueError, match="in_channels=4"):
        layer(torch.randn(1, 3, 8, 8))
    assert layer.u is None and layer.input_size is None


def test_refresh_takes_an_iteration_count():
    layer = _layer()
    with pytest.raises(ValueError, match="n_iterations"):
        layer.refresh(0)
    many, few = copy.deepcopy(layer), copy.deepcopy(layer)
    many.refresh(5)
    for _ in range(5):
        few.refresh()
    torch.testing.assert_close(many.u, few.u, rtol=1e-6, atol=1e-7)


def test_effective_weight_needs_input_size():
    with pytest.raises(RuntimeError, match="input_size"):
        _layer(input_size=None).effective_weight()


def test_recurrent_model_compiles_fullgraph_and_matches_eager_across_steps():
    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = SRNCConv2d(7, 4, 3, padding=1, beta=0.5, input_size=8)
            self.b = SRNCConv2d(4, 4, 3, padding=1, padding_mode="circular", alpha=0.9, input_size=8)

        def forward(self, x):
            h, outs = x.new_zeros(x.shape[0], 4, 8, 8), []
            for t in range(x.shape[1]):
                h = torch.relu(self.b(torch.relu(self.a(torch.cat([x[:, t], h], 1)))))
                outs.append(h)
            return torch.stack(outs, 1)

    torch.manual_seed(0)
    model = Recurrent()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 3, 8, 8)
    opt, opt_eager = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(eager.parameters(), lr=0.1)
    for _ in range(3):  # the optimizer hook refreshes between compiled steps
        out, expected = compiled(x), eager(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        out.square().mean().backward()
        expected.square().mean().backward()
        torch.testing.assert_close(model.a.weight.grad, eager.a.weight.grad, rtol=1e-4, atol=1e-6)
        for o in (opt, opt_eager):
            o.step()
            o.zero_grad()
        torch.testing.assert_close(model.a.u, eager.a.u, rtol=1e-5, atol=1e-6)
    model.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


def test_models_with_other_hyperparameters_compile_fullgraph_in_one_process():
    """A second compiled model whose layers have another alpha, beta, eps or sigma_floor recompiles the
    shared forward with those floats symbolic (Dynamo's automatic dynamic): no graph break there
    (math.isfinite of a symbolic alpha broke the graph, and every later model ran eager code frame by frame)."""
    torch._dynamo.reset()
    settings = [dict(alpha=2.0, beta=0.1), dict(alpha=1.0, beta=1.0), dict(alpha=0.7, beta=0.3, eps=1e-10),
                dict(alpha=1.5, beta=0.3, sigma_floor=0.5)]
    x = torch.randn(2, 3, 8, 8)
    for options in settings:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a beta below the reachable floor is not the point
            model = torch.nn.Sequential(SRNCConv2d(3, 4, 3, padding=1, input_size=8, **options), torch.nn.ReLU(),
                                        SRNCConv2d(4, 4, 3, padding=1, input_size=8, **options))
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, fullgraph=True)  # a graph break raises here
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
        compiled(x).square().mean().backward()
        eager(x).square().mean().backward()
        torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-6)
    # other input sizes and geometries: the ints that differ become symbolic too
    for size, options in ((10, {}), (12, dict(padding_mode="circular")), (9, dict(stride=2)), (11, dict(dilation=2))):
        torch.manual_seed(0)
        model = torch.nn.Sequential(SRNCConv2d(3, 4, 3, padding=options.get("dilation", 1), input_size=size, **options))
        eager = copy.deepcopy(model)
        x = torch.randn(2, 3, size, size)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


class _Unroll(torch.nn.Module):
    """Two SRN-C layers applied to every frame; the first ``warmup`` frames under no_grad (truncated BPTT)."""

    def __init__(self, warmup: int = 0):
        super().__init__()
        self.warmup = warmup
        self.a = SRNCConv2d(7, 4, 3, padding=1, beta=0.5, input_size=8)
        self.b = SRNCConv2d(4, 4, 3, padding=1, alpha=0.9, input_size=8)

    def forward(self, x):
        h, outs = x.new_zeros(x.shape[0], 4, 8, 8), []
        for t in range(x.shape[1]):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= self.warmup):
                h = torch.relu(self.b(torch.relu(self.a(torch.cat([x[:, t], h], 1)))))
            outs.append(h)
        return torch.stack(outs, 1)


@pytest.mark.parametrize("warmup", (0, 2))
def test_shared_effective_weights_give_one_reweight_backward_per_layer_under_compile(warmup):
    """With share_effective_weights (convert registers it) a compiled 4-frame unroll runs each layer's
    reweight backward once per step, not once per frame, and still matches eager mode, also when
    the first frames run under no_grad (they get their own, gradient-free weight)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    counts = []

    def count(graph):
        counts.append(sum(1 for n in graph.nodes if n.op == "call_function" and "reweight_backward" in str(n.target)))

    torch.manual_seed(0)
    model = srnc_ext.share_effective_weights(_Unroll(warmup))
    eager = copy.deepcopy(model)
    assert srnc_ext.share_effective_weights(model) is model  # once
    opt, opt_eager = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(eager.parameters(), lr=0.1)
    x = torch.randn(2, 4, 3, 8, 8)
    with inductor_config.patch(post_grad_custom_post_pass=count, force_disable_caches=True):
        compiled = torch.compile(model)
        for _ in range(2):
            out, expected = compiled(x), eager(x)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            out.square().mean().backward()
            expected.square().mean().backward()
            for name in ("a", "b"):
                torch.testing.assert_close(getattr(model, name).weight.grad, getattr(eager, name).weight.grad,
                                           rtol=1e-4, atol=1e-6)
            for o in (opt, opt_eager):
                o.step()
                o.zero_grad()
    assert 2 in counts and max(counts) == 2  # the backward graph: one per layer (without sharing: 4 frames x 2)
    assert model.a._scoped_weights is None and not model.a._weight_scope  # nothing outlives the forward
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


def test_convert_shares_effective_weights_and_remove_takes_the_hooks_away():
    from srnc_ext import weight_scope

    torch.manual_seed(0)
    model = srnc_ext.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1)), alpha=1.0, input_size=8)
    assert weight_scope._enter in model._forward_pre_hooks.values()
    twin = copy.deepcopy(model)  # the hooks take the module they run on: a copy scopes its own layers
    assert weight_scope._enter in twin._forward_pre_hooks.values()
    srnc_ext.remove(model)
    assert weight_scope._enter not in model._forward_pre_hooks.values()
    assert weight_scope._leave not in model._forward_hooks.values() and not model._forward_hooks_always_called
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        srnc_ext.share_effective_weights("model")


@pytest.mark.parametrize("strict", (False, True))
def test_a_converted_model_exports_without_warnings_and_matches_eager(strict):
    """torch.export of a converted model in eval mode: the weight-sharing hooks stay out of it (strict
    export warned about the module attributes they write), and the exported program is the model."""
    torch.manual_seed(0)
    model = srnc_ext.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                                 torch.nn.Conv2d(4, 4, 3, padding=1)), alpha=1.0, beta=0.5, input_size=8)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        program = torch.export.export(model, (x,), strict=strict)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- any map size (issue 12)
TINY_LAYERS = {  # (c_in, c_out, kernel, layer options, input size): maps smaller than the (dilated) kernel
    "64to32-7x7-map2": (64, 32, 7, dict(padding=3), 2),  # SPyNet's coarsest level in BasicVSR++ / TOFlow
    "64to32-7x7-map1": (64, 32, 7, dict(padding=3), 1),
    "7x7-stride2-map2x3": (8, 6, 7, dict(padding=3, stride=2), (2, 3)),
    "3x3-dilation2-map2": (8, 6, 3, dict(padding=2, dilation=2), 2),
    "3x3-dilation2-stride2-map1": (8, 6, 3, dict(padding=2, dilation=2, stride=2), 1),
    "replicate-7x7-map2": (8, 6, 7, dict(padding=3, padding_mode="replicate"), 2),
    "circular-3x3-map1": (8, 6, 3, dict(padding=1, padding_mode="circular"), 1),
}


@pytest.mark.parametrize("beta", (1.0, 0.5))
@pytest.mark.parametrize("c_in,c_out,k,options,size", TINY_LAYERS.values(), ids=TINY_LAYERS.keys())
def test_sigma_equals_alpha_on_maps_smaller_than_the_kernel(c_in, c_out, k, options, size, beta):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # beta = 0.5 can be below the stable-rank floor on such small maps
        layer = SRNCConv2d(c_in, c_out, k, alpha=2.0, beta=beta, input_size=size, dtype=torch.float64, **options)
        layer.refresh(5000, tol=1e-10)
    sigma = singular_values(layer.geometry, layer.effective_weight())[0].item()  # the explicit matrix's
    assert sigma == pytest.approx(2.0, rel=1e-8) and abs(sigma / 2.0 - 1) <= layer.residual + 1e-12


def test_first_forward_on_a_map_smaller_than_the_kernel_materializes():
    torch.manual_seed(0)
    layer = SRNCConv2d(64, 32, 7, padding=3)
    x = torch.randn(2, 64, 2, 2)
    out = layer(x)
    assert layer.input_size == (2, 2) and out.shape == (2, 32, 2, 2)
    torch.testing.assert_close(out, F.conv2d(x, layer.effective_weight(), layer.bias, padding=3))


def test_another_input_size_warns_once_naming_the_layer_and_both_sizes():
    layer, other = _layer(input_size=8), _layer(input_size=8)
    layer.srnc_name = "spynet.basic_module.0"
    x = torch.randn(1, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # its own size: silent
    with pytest.warns(RuntimeWarning) as record:
        small = layer(torch.randn(1, 4, 2, 3))
    assert len(record) == 1
    message = str(record[0].message)
    assert "spynet.basic_module.0" in message and "(8, 8)" in message and "(2, 3)" in message
    assert "input_size='track'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(1, 4, 16, 16))  # once per layer
            layer(torch.randn(1, 4, 2, 3))
    assert small.shape == (1, 5, 2, 3) and layer.input_size == (8, 8)  # the weight stays normalized for 8x8
    with pytest.warns(RuntimeWarning, match=r"SRNCConv2d\(4, 5, kernel_size=\(3, 3\)\).*\(8, 8\).*\(5, 5\)"):
        other(torch.randn(1, 4, 5, 5))  # every layer warns for itself; unnamed ones by their shape


@pytest.mark.parametrize("stride,dilation,padding", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_track_renormalizes_for_the_largest_size_and_bounds_every_smaller_one(stride, dilation, padding):
    """input_size='track': after each larger input the layer is normalized for the elementwise largest size
    seen; once converged sigma_1 = alpha there and sigma_1 <= alpha at every smaller size (explicit matrices)."""
    torch.manual_seed(0)
    layer = SRNCConv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation, alpha=1.5, beta=0.5,
                       input_size="track", dtype=torch.float64)
    assert layer.input_size is None and layer.track_input_size
    steps = [(3, 3, (3, 3)), (5, 5, (5, 5)), (4, 7, (5, 7)), (2, 2, (5, 7)), (1, 1, (5, 7)), (6, 6, (6, 7))]
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tracking never warns about sizes
        for h, w, normalized in steps:
            x = torch.randn(2, 3, h, w, dtype=torch.float64)
            out = layer(x)
            assert layer.input_size == normalized and layer.u.shape[-2:] == layer.geometry.output_size
            torch.testing.assert_close(out, F.conv2d(x, layer.effective_weight(), layer.bias, stride, padding, dilation))
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
        layer.refresh(5000, tol=1e-10)
    weight = layer.effective_weight().detach()
    assert singular_values(layer.geometry, weight)[0].item() == pytest.approx(1.5, rel=1e-8)
    for h in range(1, 7):
        for w in range(1, 8):
            try:
                geometry = ConvGeometry.from_conv(layer, (h, w))
            except ValueError:  # no operator at this size
                continue
            assert singular_values(geometry, weight)[0].item() <= 1.5 * (1 + 1e-8), (h, w)


@pytest.mark.parametrize("mode", ("reflect", "replicate", "circular"))
def test_track_is_refused_for_padding_modes_where_sigma_can_fall_with_the_size(mode):
    with pytest.raises(ValueError, match=f"input_size='track' needs padding_mode='zeros', got padding_mode={mode!r}"):
        SRNCConv2d(2, 2, 3, padding=1, padding_mode=mode, input_size="track")
    with pytest.raises(ValueError, match="'track'"):
        LazySRNCConv2d(2, 3, padding=1, padding_mode=mode, input_size="track")


def test_lazy_layer_infers_in_channels_and_becomes_an_srnc_layer():
    torch.manual_seed(0)
    layer = LazySRNCConv2d(5, 3, padding=1, alpha=1.3, beta=0.5, input_size=6)
    assert layer.has_uninitialized_params() and not layer.materialized
    x = torch.randn(2, 4, 6, 6)
    out = layer(x)
    assert type(layer) is SRNCConv2d and layer.in_channels == 4 and layer.weight.shape == (5, 4, 3, 3)
    assert layer.input_size == (6, 6) and out.shape == (2, 5, 6, 6)
    torch.testing.assert_close(out, F.conv2d(x, layer.effective_weight(), layer.bias, padding=1))
    tracking = LazySRNCConv2d(5, 3, padding=1, input_size="track")
    tracking(x)
    tracking(torch.randn(1, 4, 9, 7))
    assert type(tracking) is SRNCConv2d and tracking.input_size == (9, 7)
    with pytest.raises(ValueError, match="input_size"):  # a bad size is refused at construction, not at the forward
        LazySRNCConv2d(5, 3, input_size=2)
