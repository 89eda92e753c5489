"""The conv operator, its adjoint, kernel gradient and Frobenius Gram against explicit matrices."""
import itertools
import warnings

import pytest
import torch
from oracles import explicit_matrix

from srnc_ext.conv_operator import ConvGeometry

MODES = ("zeros", "circular", "reflect", "replicate")
KERNELS = ((3, 3), (1, 1), (5, 3))
CHANNELS = ((4, 4), (2, 6))


def _cases():
    for mode, stride, dilation, groups, kernel, (c_in, c_out), padding in itertools.product(
        MODES, (1, 2), (1, 2), (1, 2), KERNELS, CHANNELS, (1, "same", "valid", (2, 1))
    ):
        if padding == "same" and stride != 1:
            continue
        yield pytest.param(
            mode, stride, dilation, groups, kernel, c_in, c_out, padding,
            id=f"{mode}-s{stride}-d{dilation}-g{groups}-k{kernel[0]}x{kernel[1]}-c{c_in}to{c_out}-p{padding}",
        )


@pytest.mark.parametrize("mode,stride,dilation,groups,kernel,c_in,c_out,padding", list(_cases()))
def test_adjoint_identity_and_kernel_grad(mode, stride, dilation, groups, kernel, c_in, c_out, padding):
    geometry = ConvGeometry.create(
        (c_out, c_in // groups, *kernel), (11, 9), stride=stride, padding=padding,
        dilation=dilation, groups=groups, padding_mode=mode,
    )
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(geometry.weight_shape, dtype=torch.float64, generator=gen)
    x = torch.randn(geometry.input_shape(2), dtype=torch.float64, generator=gen)
    y = torch.randn(geometry.output_shape(2), dtype=torch.float64, generator=gen)
    wx, wty = geometry.apply(k, x), geometry.adjoint(k, y)
    assert wx.shape == y.shape and wty.shape == x.shape
    lhs, rhs = (wx * y).sum(), (x * wty).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    kr = k.clone().requires_grad_()
    (geometry.apply(kr, x) * y).sum().backward()
    torch.testing.assert_close(geometry.kernel_grad(x, y), kr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("c_in,c_out,groups", [(3, 16, 1), (16, 3, 1), (8, 16, 2), (6, 4, 2)], ids=str)
def test_channels_last_inputs_give_the_same_operator(mode, stride, c_in, c_out, groups):
    """The refresh keeps CPU vectors channels-last; there the adjoint may take conv_transpose2d."""
    geometry = ConvGeometry.create((c_out, c_in // groups, 3, 3), (10, 9), stride=stride, padding=1,
                                   groups=groups, padding_mode=mode)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(geometry.weight_shape, dtype=torch.float64, generator=gen)
    x = torch.randn(geometry.input_shape(), dtype=torch.float64, generator=gen)
    y = torch.randn(geometry.output_shape(), dtype=torch.float64, generator=gen)
    x_cl, y_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
    assert geometry._transpose_is_faster(y_cl) == (c_out // groups >= 8)
    assert not geometry._transpose_is_faster(y)
    torch.testing.assert_close(geometry.apply(k, x_cl), geometry.apply(k, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(geometry.adjoint(k, y_cl), geometry.adjoint(k, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(geometry.kernel_grad(x_cl, y_cl), geometry.kernel_grad(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", (1, 2))
def test_apply_matches_nn_conv2d(mode, stride):
    conv = torch.nn.Conv2d(3, 5, (3, 2), stride=stride, padding=(1, 2), dilation=(1, 2), bias=False,
                           padding_mode=mode, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    geometry = ConvGeometry.from_conv(conv, (9, 10))
    torch.testing.assert_close(geometry.apply(conv.weight, x), conv(x), rtol=0, atol=0)
    assert geometry.output_size == tuple(conv(x).shape[-2:])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride,dilation,padding", [(1, 1, "same"), (2, 1, 1), (1, 2, 2), (2, 2, "valid")])
def test_frobenius_from_gram_equals_explicit(mode, stride, dilation, padding):
    geometry = ConvGeometry.create((3, 2, 3, 3), (7, 8), stride=stride, padding=padding,
                                   dilation=dilation, padding_mode=mode)
    k = torch.randn(geometry.weight_shape, dtype=torch.float64)
    expected = explicit_matrix(geometry, k).pow(2).sum()
    torch.testing.assert_close(geometry.frobenius_sq(k), expected, rtol=1e-12, atol=0)


def test_gram_is_diagonal_for_zero_and_circular_padding():
    for mode in ("zeros", "circular"):
        gram = ConvGeometry.create((1, 1, 3, 3), 6, padding=1, padding_mode=mode).kernel_gram()
        assert torch.count_nonzero(gram - torch.diag(torch.diag(gram))) == 0
    circular = ConvGeometry.create((1, 1, 3, 3), 6, padding=1, padding_mode="circular").kernel_gram()
    torch.testing.assert_close(circular, 36.0 * torch.eye(9, dtype=torch.float64))


def test_same_padding_even_kernel_matches_nn_conv2d():
    conv = torch.nn.Conv2d(2, 2, 4, padding="same", bias=False, padding_mode="reflect", dtype=torch.float64)
    geometry = ConvGeometry.from_conv(conv, 9)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(geometry.apply(conv.weight, x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_size=2), "input_size"),
        (dict(input_size=(9, 4), dilation=2), "input_size"),
        (dict(input_size=4, padding_mode="bogus"), "padding_mode"),
        (dict(input_size=4, padding="full"), "padding"),
        (dict(input_size=4, padding="same", stride=2), "stride"),
        (dict(input_size=3, padding=3, padding_mode="reflect"), "reflect"),
    ],
)
def test_bad_geometry_raises(kwargs, match):
    size = kwargs.pop("input_size")
    with pytest.raises(ValueError, match=match):
        ConvGeometry.create((2, 2, 3, 3), size, **kwargs)


# ---------------------------------------------------------------- any map size (issue 12)
TINY = [  # (mode, kernel, padding, stride, dilation, input size): maps smaller than the (dilated) kernel
    ("zeros", 7, 3, 1, 1, (2, 2)), ("zeros", 7, 3, 1, 1, (1, 1)), ("zeros", 7, 3, 2, 1, (2, 3)),
    ("zeros", 3, 2, 1, 2, (2, 2)), ("zeros", 3, 2, 2, 2, (1, 1)), ("zeros", 4, "same", 1, 1, (2, 1)),
    ("zeros", 5, (2, 0), 1, 1, (1, 5)), ("replicate", 7, 3, 1, 1, (2, 2)), ("replicate", 3, 1, 2, 1, (1, 1)),
    ("replicate", 3, 2, 1, 2, (1, 2)), ("reflect", 3, 1, 1, 1, (2, 2)), ("reflect", 5, 2, 2, 1, (3, 3)),
    ("circular", 3, 1, 1, 1, (1, 1)), ("circular", 5, 2, 1, 1, (2, 2)), ("circular", 3, 2, 1, 2, (2, 3)),
    ("circular", 3, 1, 2, 1, (1, 2)),
]


@pytest.mark.parametrize("mode,k,padding,stride,dilation,size", TINY,
                         ids=[f"{m}-k{k}-p{p}-s{s}-d{d}-{h}x{w}" for m, k, p, s, d, (h, w) in TINY])
@pytest.mark.parametrize("groups", (1, 2))
def test_maps_smaller_than_the_kernel_give_the_explicit_operator(mode, k, padding, stride, dilation, size, groups):
    """Apply, adjoint, kernel gradient and Frobenius Gram on maps smaller than the kernel (kernel taps
    that never touch the input included) against the explicit matrix of F.pad + F.conv2d."""
    geometry = ConvGeometry.create((4, 4 // groups, k, k), size, stride=stride, padding=padding, dilation=dilation,
                                   groups=groups, padding_mode=mode)
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(geometry.weight_shape, dtype=torch.float64, generator=gen)
    matrix = explicit_matrix(geometry, kernel)
    x = torch.randn(geometry.input_shape(3), dtype=torch.float64, generator=gen)
    y = torch.randn(geometry.output_shape(3), dtype=torch.float64, generator=gen)
    torch.testing.assert_close(geometry.apply(kernel, x).flatten(1), x.flatten(1) @ matrix.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(geometry.adjoint(kernel, y).flatten(1), y.flatten(1) @ matrix, rtol=1e-12, atol=1e-12)
    kr = kernel.clone().requires_grad_()
    (geometry.apply(kr, x) * y).sum().backward()
    torch.testing.assert_close(geometry.kernel_grad(x, y), kr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(geometry.frobenius_sq(kernel), matrix.pow(2).sum(), rtol=1e-12, atol=0)


def test_sizes_are_refused_exactly_where_nn_conv2d_refuses():
    """Every padding mode, kernel, padding, stride and dilation below, every height 1..10: ConvGeometry
    accepts the size if and only if nn.Conv2d runs on it, and ``min_input_size`` is the smallest such."""
    checked = 0
    for mode, k, dilation, padding, stride in itertools.product(MODES, (1, 2, 3, 5, 7), (1, 2), (0, 1, 2, 3, "same"),
                                                                 (1, 2)):
        if padding == "same" and stride != 1:
            continue
        conv = torch.nn.Conv2d(1, 1, (k, 3), stride=stride, padding=padding if isinstance(padding, str) else (padding, 1),
                               dilation=(dilation, 1), padding_mode=mode)
        accepted = []
        for h in range(1, 11):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "same" with even kernels: a padded copy
                    conv(torch.zeros(1, 1, h, 5))
                runs = True
            except RuntimeError:
                runs = False
            try:
                geometry = ConvGeometry.from_conv(conv, (h, 5))
                ours = True
            except ValueError:
                ours = False
            assert ours == runs, (mode, k, dilation, padding, stride, h)
            if runs:
                accepted.append(h)
                assert geometry.min_input_size[0] == accepted[0]
            checked += 1
    assert checked > 1500


@pytest.mark.parametrize("mode,padding,size,limit", [
    ("zeros", 0, 2, "padded map must hold the dilated kernel"),
    ("reflect", 3, 2, "reflect padding must be smaller than the input"),
    ("circular", 3, 2, "circular padding must not exceed the input"),
    ("replicate", 0, (4, 2), "padded map must hold the dilated kernel"),
])
def test_refused_size_names_the_mode_the_size_and_pytorchs_limit(mode, padding, size, limit):
    with pytest.raises(ValueError, match=f"input_size=.*{mode!r}.*{limit}.*smallest input_size") as info:
        ConvGeometry.create((2, 2, 7, 7), size, padding=padding, padding_mode=mode)
    assert str(tuple(size) if isinstance(size, tuple) else (size, size)) in str(info.value)


def test_non_positive_sizes_are_refused():
    for size in (0, (3, 0), (-1, 4)):
        with pytest.raises(ValueError, match="input_size"):
            ConvGeometry.create((2, 2, 3, 3), size, padding=1)


def _sigma(geometry, kernel):
    return torch.linalg.svdvals(explicit_matrix(geometry, kernel))[0].item()


MONOTONE_CONFIGS = [  # (kernel, padding, stride, dilation)
    (3, 1, 1, 1), (3, 1, 2, 1), (3, 2, 1, 2), (3, 2, 2, 2), (5, 2, 1, 1), (7, 3, 1, 1), (7, 3, 2, 1),
    (3, 0, 1, 1), (2, "same", 1, 1), (4, "same", 1, 1), ((3, 2), (1, 0), 2, 1),
]


def test_zero_padding_sigma_never_decreases_with_the_map_size():
    """What ``input_size="track"`` relies on: with zero padding, sigma_1 at (h, w) is at most sigma_1 at
    (h + 1, w) and at (h, w + 1) (the smaller operator is the larger one restricted to inputs that vanish
    on the last row/column, with the extra outputs dropped). Checked on explicit matrices, random
    kernels, every stride/dilation above, from maps smaller than the kernel on."""
    gen = torch.Generator().manual_seed(0)
    pairs = 0
    for k, padding, stride, dilation in MONOTONE_CONFIGS:
        for c_in, c_out in ((1, 1), (2, 3)):
            shape = (c_out, c_in, *((k, k) if isinstance(k, int) else k))
            kernel = torch.randn(shape, dtype=torch.float64, generator=gen)
            sigma = {}
            for h, w in itertools.product(range(1, 8), range(1, 8)):
                try:
                    geometry = ConvGeometry.create(shape, (h, w), stride=stride, padding=padding, dilation=dilation)
                except ValueError:  # padded map smaller than the kernel: no operator
                    continue
                sigma[h, w] = _sigma(geometry, kernel)
            for (h, w), value in sigma.items():
                for larger in ((h + 1, w), (h, w + 1)):
                    if larger in sigma:
                        assert value <= sigma[larger] * (1 + 1e-12), (k, padding, stride, dilation, (h, w), larger)
                        pairs += 1
    assert pairs > 1000


@pytest.mark.parametrize("mode", ("reflect", "replicate", "circular"))
def test_other_padding_modes_sigma_can_decrease_with_the_map_size(mode):
    """Why ``input_size="track"`` is for zero padding only: for every other mode random kernels give
    sigma_1 at n + 1 clearly below sigma_1 at n (measured: in about a third of the cases, by up to 31 %
    for reflect, 44 % for replicate, 61 % for circular)."""
    gen = torch.Generator().manual_seed(0)
    drops = []
    for k, padding, stride, dilation in MONOTONE_CONFIGS[:7]:
        kernel = torch.randn(3, 2, k, k, dtype=torch.float64, generator=gen)
        sigma = {}
        for n in range(1, 9):
            try:
                geometry = ConvGeometry.create(kernel.shape, n, stride=stride, padding=padding, dilation=dilation,
                                               padding_mode=mode)
            except ValueError:
                continue
            sigma[n] = _sigma(geometry, kernel)
        drops += [1 - sigma[n + 1] / sigma[n] for n in sigma if n + 1 in sigma]
    assert max(drops) > 0.05
