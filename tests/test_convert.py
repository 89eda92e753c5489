"""convert / remove / to_conv2d: configuration and weights carried over, outputs kept on the round trip;
per-layer input sizes, lazy convs, and the warning that lists what convert leaves alone."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import singular_values
from torch import nn

import srnc_ext
from srnc_ext import LazySRNCConv2d, SRNCConv2d, convert, remove, to_conv2d


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
    with pytest.warns(UserWarning, match="'0' \\(Conv2d, rejected by predicate\\)"):
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


# ---------------------------------------------------------------- per-layer input sizes (issue 12)
def _pyramid():
    """A SPyNet-like stack: the same 7x7 block at three pyramid levels (2x2, 8x8, 16x16 maps)."""
    torch.manual_seed(0)
    level = lambda: nn.Sequential(nn.Conv2d(4, 8, 7, padding=3), nn.ReLU(), nn.Conv2d(8, 4, 7, padding=3))
    return nn.ModuleDict({"coarse": level(), "middle": level(), "fine": level()})


def _run_pyramid(model, batch=1):
    return [model[name](torch.randn(batch, 4, n, n)) for name, n in (("coarse", 2), ("middle", 8), ("fine", 16))]


def test_input_size_dict_by_qualified_name_and_first_input_for_the_others():
    model = convert(_pyramid(), alpha=1.0, input_size={"coarse.0": 2, "coarse.2": (2, 2), "fine.0": "track"})
    assert model["coarse"][0].input_size == (2, 2) and model["coarse"][2].input_size == (2, 2)
    assert model["middle"][0].input_size is None and model["fine"][0].track_input_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer runs at its own size: no size warning
        _run_pyramid(model)
    assert [model[n][i].input_size for n in ("coarse", "middle", "fine") for i in (0, 2)] == [
        (2, 2), (2, 2), (8, 8), (8, 8), (16, 16), (16, 16)]


def test_input_size_dict_with_unknown_names_is_refused_before_anything_changes():
    model = _pyramid()
    with pytest.raises(ValueError, match=r"'coarse\.1' \(ReLU, not converted\).*'nope' \(no such module\)"):
        convert(model, alpha=1.0, input_size={"coarse.0": 2, "coarse.1": 2, "nope": 4})
    with pytest.raises(ValueError, match=r"'middle\.0' \(Conv2d, not converted\)"):  # not selected by the predicate
        convert(model, alpha=1.0, input_size={"middle.0": 8}, predicate=lambda name: name.startswith("coarse"))
    assert not any(isinstance(m, SRNCConv2d) for m in model.modules())


def test_a_refused_layer_leaves_the_model_unconverted():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match=r"layer '1': input_size='track' needs padding_mode='zeros'.*'circular'"):
        convert(model, alpha=1.0, input_size="track")
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d]


def test_one_size_for_layers_that_run_at_other_sizes_warns_once_per_layer():
    model = convert(_pyramid(), alpha=1.0, input_size=8)
    with pytest.warns(RuntimeWarning) as record:
        _run_pyramid(model)
        _run_pyramid(model)
    messages = sorted(str(w.message) for w in record if "normalized for input size" in str(w.message))
    assert len(messages) == 4  # coarse.0, coarse.2 (2x2) and fine.0, fine.2 (16x16), once each
    for name, size in (("coarse.0", "(2, 2)"), ("coarse.2", "(2, 2)"), ("fine.0", "(16, 16)"), ("fine.2", "(16, 16)")):
        assert sum(f"layer {name}:" in m and "(8, 8)" in m and size in m for m in messages) == 1


def test_track_through_convert_bounds_every_size_the_layers_ran_at():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)).double(), alpha=1.0,
                    input_size="track")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (2, 6, 4):
            model(torch.randn(1, 3, n, n, dtype=torch.float64))
    srnc_ext.refresh(model, 3000)
    for layer in model:
        assert layer.input_size == (6, 6)
        weight, bound = layer.effective_weight().detach(), layer.residual + 1e-12  # the error the residual leaves
        for n in (2, 4, 6):
            sigma = srnc_ext.spectral.spectral_norm(weight, n, padding=1)
            assert sigma <= 1.0 + bound and (n != 6 or abs(sigma - 1.0) <= bound)


# ---------------------------------------------------------------- lazy convs
def _lazy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyConv2d(6, 3, padding=1), nn.ReLU(), nn.LazyConv2d(3, 3, padding=1, bias=False))


def test_lazy_conv_converts_materializes_trains_and_round_trips_its_state_dict():
    model = convert(_lazy_model(), alpha=1.5, beta=0.5, input_size={"0": 8})
    assert [type(m) for m in model[::2]] == [LazySRNCConv2d, LazySRNCConv2d]
    x = torch.randn(2, 4, 8, 8)
    out = model(x)
    assert [type(m) for m in model[::2]] == [SRNCConv2d, SRNCConv2d]
    assert (model[0].in_channels, model[2].in_channels, model[0].input_size, model[2].input_size) == (4, 6, (8, 8), (8, 8))
    assert model[0].srnc_name == "0" and model[2].srnc_name == "2" and out.shape == (2, 3, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # after materialization, as with torch's lazy modules
    before = model[0].weight.detach().clone()
    loss = (model(x) - x[:, :3]).square().mean()
    loss.backward()
    opt.step()
    assert not torch.equal(model[0].weight, before) and not model[0].is_stale()
    model.eval()
    expected = model(x)
    state = copy.deepcopy(model.state_dict())
    lazy = convert(_lazy_model(), alpha=1.5, beta=0.5)  # loaded before its first forward, as torch's lazy modules
    lazy.load_state_dict(state)
    lazy.eval()
    assert lazy[0].in_channels == 4 and lazy[0].input_size == (8, 8)
    torch.testing.assert_close(lazy(x), expected, rtol=0, atol=0)
    assert type(lazy[0]) is SRNCConv2d and not lazy[0].is_stale()
    materialized = convert(_lazy_model(), alpha=1.5, beta=0.5)
    materialized(torch.randn(1, 4, 8, 8))
    materialized.load_state_dict(state)
    materialized.eval()
    torch.testing.assert_close(materialized(x), expected, rtol=0, atol=0)
    torch.optim.SGD(lazy.parameters(), lr=0.1)  # an optimizer can be built on the loaded model


def test_lazy_conv_takes_its_size_from_its_first_input():
    model = convert(_lazy_model(), alpha=1.0)
    model(torch.randn(1, 4, 2, 3))
    assert model[0].input_size == (2, 3) and model[0].weight.shape == (6, 4, 3, 3)


# ---------------------------------------------------------------- what convert leaves alone
class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
        self.temporal = nn.Conv3d(4, 4, 3, padding=1)
        self.audio = nn.Conv1d(4, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)


def test_convert_warns_once_listing_the_conv_like_modules_it_left_alone():
    model = _Unsupported()
    with pytest.warns(UserWarning, match="srnc_ext.convert left alone 1 conv-like module") as record:
        convert(model, alpha=1.0)
    assert len(record) == 1 and isinstance(model.body, SRNCConv2d)
    kinds = {"up": srnc_ext.SRNCConvTranspose2d, "temporal": srnc_ext.SRNCConv3d, "audio": srnc_ext.SRNCConv1d}
    assert all(type(getattr(model, name)) is kind for name, kind in kinds.items())  # every conv kind by default
    message = str(record[0].message)
    assert "'head' (Linear, not in types)" in message  # Linear only when types names it
    assert all(f"'{name}'" not in message for name in ("up", "temporal", "audio", "body"))
    convert(model, alpha=1.0, types=nn.Linear)
    assert type(model.head) is srnc_ext.SRNCLinear
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU()), alpha=1.0)  # nothing left alone: silent


def test_convert_names_deformable_convs():
    ops = pytest.importorskip("torchvision.ops")
    model = nn.ModuleDict({"offset": nn.Conv2d(4, 18, 3, padding=1), "dcn": ops.DeformConv2d(4, 4, 3, padding=1)})
    with pytest.warns(UserWarning, match=r"'dcn' \(DeformConv2d, not supported by SRN-C yet\)"):
        convert(model, alpha=1.0)
    assert isinstance(model["offset"], SRNCConv2d)


def test_types_chooses_the_kinds_and_refuses_unsupported_ones():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.LazyConv2d(2, 3))
    with pytest.warns(UserWarning, match=r"'0' \(Conv2d, not in types\)"):
        convert(model, alpha=1.0, types=nn.LazyConv2d)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is LazySRNCConv2d
    with pytest.raises(ValueError, match="types: .*ConvTranspose2d.*got BatchNorm2d"):
        convert(model, alpha=1.0, types=(nn.Conv2d, nn.BatchNorm2d))
    with pytest.raises(TypeError, match="types"):
        convert(model, alpha=1.0, types=("Conv2d",))


# ---------------------------------------------------------------- remove: back to the raw weights
@pytest.mark.parametrize("variant", ("projected", "paper"))
def test_remove_gives_plain_convs_with_the_raw_weights(variant):
    original = _model()
    x = torch.randn(2, 3, 16, 16)
    expected = original(x)
    model = convert(copy.deepcopy(original), alpha=0.7, beta=0.3, variant=variant)
    model(x)
    layers = [m for m in model.modules() if isinstance(m, SRNCConv2d)]
    raw = [(m.weight, m.bias) for m in layers]
    removed = remove(model)
    plain = [m for m in removed.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is nn.Conv2d for m in plain) and removed[2] is removed[4]  # still shared
    for conv, srnc, (weight, bias) in zip(plain, layers, raw):
        assert conv.weight is weight and conv.bias is bias  # the raw parameters themselves
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            assert getattr(conv, attr) == getattr(srnc, attr), attr
    torch.testing.assert_close(removed(x), expected, rtol=0, atol=0)
    assert isinstance(remove(SRNCConv2d(2, 2, 3)), nn.Conv2d)
    lazy = remove(convert(nn.LazyConv2d(3, 3), alpha=1.0))  # not yet materialized: a lazy conv again
    assert type(lazy) is nn.LazyConv2d and lazy(torch.randn(1, 2, 5, 5)).shape == (1, 3, 3, 3)


def test_remove_after_training_keeps_the_trained_raw_weight_and_to_conv2d_the_normalized_one():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)), alpha=0.5, input_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    normalized = model(x)
    weight = model[0].weight.detach().clone()
    baked = to_conv2d(copy.deepcopy(model))
    torch.testing.assert_close(baked(x), normalized, rtol=1e-6, atol=1e-6)
    assert singular_values(model[0].geometry, baked[0].weight)[0].item() == pytest.approx(0.5, rel=2e-2)
    removed = remove(model)
    assert torch.equal(removed[0].weight, weight)
    torch.testing.assert_close(removed(x), F.conv2d(x, weight, removed[0].bias, padding=1), rtol=0, atol=0)
