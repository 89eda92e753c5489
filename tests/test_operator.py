"""The conv operator, its adjoint, kernel gradient and Frobenius Gram against explicit matrices."""
import itertools

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
