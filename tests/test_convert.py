"""convert / to_conv2d: configuration and weights carried over, outputs kept on the round trip."""
import pytest
import torch
from torch import nn

from srnc_ext import SRNCConv2d, convert, to_conv2d


def _model():
    torch.manual_seed(0)
    shared = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
    return nn.Sequential(
        nn.Conv2d(3, 4, (5, 3), stride=2, padding=(2, 1), bias=False),
        nn.ReLU(),
        shared,
        nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2, padding_mode="reflect"), nn.ReLU()),
        shared,
    )


def test_convert_keeps_configuration_and_parameters():
    model = _model()
    originals = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    params = [(m.weight, m.bias) for m in originals]
    convert(model, alpha=1.3, beta=0.5, input_size=16, n_power_iterations=2)
    converted = [m for m in model.modules() if isinstance(m, SRNCConv2d)]
    assert len(converted) == 3 and model[2] is model[4]  # the shared conv stays shared
    for old, new, (weight, bias) in zip(originals, converted, params):
        assert new.weight is weight and new.bias is bias
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            assert getattr(new, attr) == getattr(old, attr), attr
        assert (new.alpha, new.beta, new.n_power_iterations, new.input_size) == (1.3, 0.5, 2, (16, 16))


def test_convert_with_predicate_and_conv_itself():
    model = convert(_model(), alpha=1.0, predicate=lambda name: name.startswith("3."))
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert kinds == ["Conv2d", "Conv2d", "SRNCConv2d"]
    layer = convert(nn.Conv2d(2, 2, 3), alpha=2.0)
    assert isinstance(layer, SRNCConv2d) and layer.alpha == 2.0


@pytest.mark.parametrize("variant", ("projected", "paper"))
def test_round_trip_keeps_outputs(variant):
    model = convert(_model(), alpha=0.9, beta=0.3, variant=variant)
    x = torch.randn(2, 3, 16, 16)
    model(x)  # materialize from the input sizes
    model.eval()
    expected = model(x)
    plain = to_conv2d(model)
    assert not any(isinstance(m, SRNCConv2d) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, rtol=1e-6, atol=1e-6)


def test_to_conv2d_needs_known_input_size():
    with pytest.raises(RuntimeError, match="input_size"):
        to_conv2d(nn.Sequential(SRNCConv2d(2, 2, 3)))
