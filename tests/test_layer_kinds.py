"""SRN-C on every layer kind: Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear.

The oracle is the explicit matrix of each layer's *own torch forward* (``F.conv1d``,
``F.conv_transpose3d``, ``F.linear``, ... applied to the identity basis), never the ConvGeometry
that the layers use, so a wrong operator (a transposed conv normalized as the wrong conv, a
dimension mixed up) fails here.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srnc_ext
from srnc_ext import spectral
from srnc_ext.conv_operator import ConvGeometry
from srnc_ext.layer_kinds import operator_of

KINDS = {
    "conv1d": (nn.Conv1d, srnc_ext.SRNCConv1d),
    "conv2d": (nn.Conv2d, srnc_ext.SRNCConv2d),
    "conv3d": (nn.Conv3d, srnc_ext.SRNCConv3d),
    "convT1d": (nn.ConvTranspose1d, srnc_ext.SRNCConvTranspose1d),
    "convT2d": (nn.ConvTranspose2d, srnc_ext.SRNCConvTranspose2d),
    "convT3d": (nn.ConvTranspose3d, srnc_ext.SRNCConvTranspose3d),
}
SIZES = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}
DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3, "convT1d": 1, "convT2d": 2, "convT3d": 3}

# (kind, constructor kwargs): every padding mode the kind supports, stride, dilation, groups, odd channels
CASES = []
for _kind in ("conv1d", "conv2d", "conv3d"):
    for _mode in ("zeros", "circular", "reflect", "replicate"):
        CASES.append((_kind, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode=_mode)))
    CASES.append((_kind, dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1)))
    CASES.append((_kind, dict(in_channels=2, out_channels=3, kernel_size=2, dilation=2, padding=1)))
    CASES.append((_kind, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding="same")))
    CASES.append((_kind, dict(in_channels=3, out_channels=2, kernel_size=5, padding=2)))  # kernel above some sizes
for _kind in ("convT1d", "convT2d", "convT3d"):
    CASES.append((_kind, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1)))
    CASES.append((_kind, dict(in_channels=4, out_channels=3, kernel_size=4, stride=2, padding=1)))  # the 2x upsampler
    CASES.append((_kind, dict(in_channels=3, out_channels=2, kernel_size=3, stride=2, padding=1, output_padding=1)))
    CASES.append((_kind, dict(in_channels=2, out_channels=3, kernel_size=2, dilation=2)))
    CASES.append((_kind, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1)))


def _case_id(case):
    kind, kwargs = case
    return kind + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("in_channels", "out_channels"))


def _explicit(layer: nn.Module, size) -> torch.Tensor:
    """The matrix of ``layer``'s forward (bias removed) on inputs of ``size``, column j = layer(e_j)."""
    if isinstance(layer, nn.Linear):
        n = layer.in_features
        basis = torch.eye(n, dtype=torch.float64)
        out = F.linear(basis, layer.effective_weight() if hasattr(layer, "effective_weight") else layer.weight)
        return out.detach().T
    channels = layer.in_channels
    n = channels * torch.Size(size).numel()
    basis = torch.eye(n, dtype=torch.float64).reshape(n, channels, *size)
    with torch.no_grad():
        out = layer(basis)
        if layer.bias is not None:
            out = out - layer.bias.reshape(1, -1, *(1,) * len(size))
    return out.reshape(n, -1).T


def _layer(kind, kwargs, **srnc):
    _, srnc_cls = KINDS[kind]
    torch.manual_seed(len(str(kwargs)))
    return srnc_cls(**kwargs, bias=False, dtype=torch.float64, **srnc)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("beta", (1.0, 0.3))
def test_sigma_1_of_the_layers_own_forward_is_alpha(case, beta):
    kind, kwargs = case
    size = SIZES[DIMS[kind]]
    layer = _layer(kind, kwargs, alpha=0.8, beta=beta, input_size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a beta below the reachable floor is not the point here
        residual = layer.refresh(3000, tol=1e-11)
    layer.eval()
    matrix = _explicit(layer, size)
    values = torch.linalg.svdvals(matrix)
    # 1e-3 (the tolerance) always; 1e-6 where the power iteration converged (some 1-D operators
    # have top singular values 1e-4 apart, e.g. 0.8048 and 0.8047: 3000 steps leave a residual of 3e-5)
    assert values[0].item() == pytest.approx(0.8, rel=1e-6 if residual <= 1e-9 else 1e-3)
    # the spectral tools see the same operator: the layer's own input size, all singular values
    result = spectral.spectrum(layer, method="matrix")
    torch.testing.assert_close(result.values, values, rtol=1e-9, atol=1e-12)
    assert spectral.spectral_norm(layer) == pytest.approx(values[0].item(), rel=1e-8)
    assert result.frobenius_sq == pytest.approx(values.square().sum().item(), rel=1e-9)


@pytest.mark.parametrize("case", [c for c in CASES if c[1].get("padding_mode", "zeros") == "zeros"][::2], ids=_case_id)
def test_beta_below_one_lowers_the_stable_rank(case):
    kind, kwargs = case
    size = SIZES[DIMS[kind]]
    ranks = []
    for beta in (1.0, 0.15):
        layer = _layer(kind, kwargs, beta=beta, input_size=size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            layer.refresh(2000, tol=1e-10)
        ranks.append(spectral.stable_rank(layer, method="matrix"))
    assert ranks[1] < ranks[0]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_the_operator_and_its_adjoint(case):
    """<W x, y> = <x, W^T y> for the layer's geometry, and W is the layer's forward (the adjoint of it for
    a transposed conv)."""
    kind, kwargs = case
    size = SIZES[DIMS[kind]]
    plain_cls, _ = KINDS[kind]
    torch.manual_seed(3)
    plain = plain_cls(**kwargs, bias=False, dtype=torch.float64)
    kernel, geometry = operator_of(plain, size)
    x, y = torch.randn(geometry.input_shape(2), dtype=torch.float64), torch.randn(geometry.output_shape(2), dtype=torch.float64)
    lhs, rhs = (geometry.apply(kernel, x) * y).sum(), (x * geometry.adjoint(kernel, y)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)
    explicit = _explicit(plain, size)
    matrix = spectral.operator_matrix(geometry, kernel)
    expected = matrix.T if plain.transposed else matrix
    torch.testing.assert_close(explicit, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", ((5, 7), (9, 3), (1, 4)))
@pytest.mark.parametrize("beta", (1.0, 0.3))
def test_linear_is_srn_of_the_weight_matrix(shape, beta):
    in_features, out_features = shape
    torch.manual_seed(1)
    layer = srnc_ext.SRNCLinear(in_features, out_features, alpha=1.5, beta=beta, dtype=torch.float64)
    assert layer.input_size is None and layer.materialized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer.refresh(2000, tol=1e-12)
    weight = layer.effective_weight().detach()
    values = torch.linalg.svdvals(weight)
    assert values[0].item() == pytest.approx(1.5, rel=1e-8)
    if beta < 1 and min(shape) > 1:
        raw = torch.linalg.svdvals(layer.weight.detach())
        assert (values.square().sum() / values[0] ** 2) < (raw.square().sum() / raw[0] ** 2)
    x = torch.randn(2, 3, in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias))
    assert spectral.spectral_norm(layer) == pytest.approx(values[0].item(), rel=1e-10)
    with pytest.raises(ValueError, match="in_features=5" if in_features == 5 else "in_features"):
        layer(torch.randn(2, in_features + 1, dtype=torch.float64))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_train_state_dict_and_eval_for_every_kind(kind):
    """Training steps refresh once per step; a fresh layer loading the state_dict gives the identical
    output; gradients reach the raw weight."""
    kwargs = dict(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    if kind.startswith("convT"):
        kwargs.update(stride=2, output_padding=1)
    size = SIZES[DIMS[kind]]
    _, cls = KINDS[kind]
    torch.manual_seed(0)
    layer = cls(**kwargs, beta=0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(2, 3, *size)
    for _ in range(3):
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
        opt.step()
    assert layer.input_size == size and not layer.is_stale()  # refreshed by the step hook
    layer.eval()
    expected = layer(x)
    fresh = cls(**kwargs, beta=0.5)
    fresh.load_state_dict(layer.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    plain = srnc_ext.to_conv2d(copy.deepcopy(layer))
    assert type(plain) is KINDS[kind][0]
    torch.testing.assert_close(plain(x), expected, rtol=1e-6, atol=1e-7)
    raw = srnc_ext.remove(copy.deepcopy(layer))
    assert type(raw) is KINDS[kind][0]
    torch.testing.assert_close(raw.weight, layer.weight, rtol=0, atol=0)


def test_a_state_dict_of_another_size_or_kind_is_refused_by_name():
    layer = srnc_ext.SRNCConvTranspose2d(3, 4, 4, stride=2, padding=1, input_size=6)
    other = srnc_ext.SRNCConvTranspose2d(3, 4, 4, stride=2, padding=1, input_size=8)
    other.load_state_dict(layer.state_dict())  # the vectors carry the size: it follows them
    assert other.input_size == (6, 6)
    conv3d = srnc_ext.SRNCConv3d(3, 4, 3, padding=1, input_size=(2, 3, 4))
    state = conv3d.state_dict()
    state["v"] = torch.randn(1, 3, 2, 3)
    with pytest.raises(RuntimeError, match=r"v: shape \(1, 3, 2, 3\) is not \(1, 3, D, H, W\)"):
        srnc_ext.SRNCConv3d(3, 4, 3, padding=1).load_state_dict(state)


@pytest.mark.parametrize("lazy, kind, size", [
    (nn.LazyConv1d, srnc_ext.SRNCConv1d, (9,)), (nn.LazyConv3d, srnc_ext.SRNCConv3d, (3, 4, 4)),
    (nn.LazyConvTranspose1d, srnc_ext.SRNCConvTranspose1d, (5,)),
    (nn.LazyConvTranspose2d, srnc_ext.SRNCConvTranspose2d, (4, 5)),
    (nn.LazyConvTranspose3d, srnc_ext.SRNCConvTranspose3d, (2, 3, 3)),
])
def test_lazy_kinds_convert_and_materialize_on_the_first_forward(lazy, kind, size):
    model = nn.Sequential(lazy(4, 3, padding=1))
    convert(model, alpha=1.0)
    assert type(model[0]).__name__ == "Lazy" + kind.__name__
    out = model(torch.randn(2, 5, *size))
    assert type(model[0]) is kind and model[0].in_channels == 5 and model[0].input_size == size
    plain = lazy(4, 3, padding=1)
    plain(torch.randn(2, 5, *size))
    assert out.shape == plain(torch.randn(2, 5, *size)).shape


def test_a_transposed_conv_with_output_padding_at_or_above_the_stride_is_refused():
    with pytest.raises(ValueError, match="output_padding=.* must be smaller than stride"):
        srnc_ext.SRNCConvTranspose2d(2, 2, 3, stride=1, dilation=2, output_padding=1, input_size=5)


def test_a_forward_output_size_with_other_output_padding_warns_once():
    layer = srnc_ext.SRNCConvTranspose2d(2, 3, 3, stride=2, padding=1, input_size=4)
    assert layer(torch.randn(1, 2, 4, 4)).shape[-2:] == (7, 7)
    with pytest.warns(RuntimeWarning, match=r"output_padding=\(0, 0\).*output_padding=\(1, 1\)"):
        assert layer(torch.randn(1, 2, 4, 4), output_size=(8, 8)).shape[-2:] == (8, 8)


def test_batched_refresh_of_1d_3d_and_transposed_layers_equals_the_per_layer_one(monkeypatch):
    def build():
        torch.manual_seed(0)
        return nn.ModuleList([
            srnc_ext.SRNCConv3d(3, 3, 3, padding=1, input_size=(2, 4, 4)),
            srnc_ext.SRNCConv3d(3, 3, 3, padding=1, input_size=(2, 4, 4)),
            srnc_ext.SRNCConv1d(3, 3, 3, padding=1, input_size=8),
            srnc_ext.SRNCConv1d(3, 3, 3, padding=1, input_size=8),
            srnc_ext.SRNCConvTranspose2d(3, 3, 4, stride=2, padding=1, input_size=4),
            srnc_ext.SRNCConvTranspose2d(3, 3, 4, stride=2, padding=1, input_size=4),
            srnc_ext.SRNCLinear(5, 4), srnc_ext.SRNCLinear(5, 4),
        ])

    batched = build()
    srnc_ext.refresh(batched, 7)
    from srnc_ext import batched_refresh
    monkeypatch.setattr(batched_refresh, "BATCHED", False)
    single = build()
    srnc_ext.refresh(single, 7)
    for a, b in zip(batched, single):
        torch.testing.assert_close(a.effective_weight(), b.effective_weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conv3d_ops_agree_across_backends(dtype):
    """The ops see (L, M, T) kernels whatever the dimensionality: a 3x3x3 kernel is T = 27 taps.

    float64 is compared element by element. In float32 the weight's gradient (entries up to about
    50) is a sum of many terms of that size, so entries near zero keep only float32 rounding of
    the large ones: it is compared as a whole tensor, relative to its norm.
    """
    torch.manual_seed(1)
    x = torch.randn(2, 3, 2, 4, 4, dtype=dtype)
    outputs = {}
    for backend in ("reference", "cpu"):
        if backend not in srnc_ext.BACKENDS:
            continue
        torch.manual_seed(0)
        layer = srnc_ext.SRNCConv3d(3, 4, 3, padding=1, beta=0.4, input_size=(2, 4, 4), backend=backend, dtype=dtype)
        out = layer(x)
        out.square().sum().backward()
        outputs[backend] = (out.detach(), layer.weight.grad)
    reference = outputs.pop("reference")
    for out, grad in outputs.values():
        if dtype == torch.float64:
            torch.testing.assert_close(out, reference[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad, reference[1], rtol=1e-9, atol=1e-12)
        else:
            torch.testing.assert_close(out, reference[0], rtol=1e-5, atol=1e-6)
            assert (grad - reference[1]).norm() <= 1e-5 * reference[1].norm()


def test_geometry_for_transposed_matches_torch_output_sizes():
    for size, kwargs in (((5,), dict(stride=2, padding=1, output_padding=1)), ((3, 4), dict(stride=(2, 3), padding=(0, 1))),
                         ((2, 2, 3), dict(stride=2, dilation=2, padding=1, output_padding=1))):
        n = len(size)
        weight_shape = (3, 2) + (3,) * n
        geometry = ConvGeometry.for_transposed(weight_shape, size, **kwargs)
        conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[n](3, 2, 3, **kwargs)
        assert geometry.output_size == size
        assert geometry.input_size == tuple(conv(torch.randn(1, 3, *size)).shape[2:])


def convert(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return srnc_ext.convert(*args, **kwargs)


def test_a_transposed_conv_compiles_fullgraph_and_matches_eager():
    """The transposed kinds have their own forward (output_padding from output_size): no graph break."""
    torch.manual_seed(0)
    layer = srnc_ext.SRNCConvTranspose2d(3, 2, 4, stride=2, padding=1, beta=0.5, input_size=4)
    x = torch.randn(2, 3, 4, 4)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, layer(x))
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))
