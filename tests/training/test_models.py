"""Models of the training bench: shapes, the step/state protocol, dampening, bursts, validation."""
import pytest
import torch

from training.models import MODEL_NAMES, build_model, run_bursts

RECURRENT = [n for n in MODEL_NAMES if n.split("-")[1] in ("feat", "frame", "rlsp")]


def _model(name, task="denoise", **kw):
    torch.manual_seed(0)
    return build_model(name, task=task, width=8, **kw).eval()


def _he_model(name, task="denoise"):
    """He-initialized, so that the influence of old frames survives the deep VDnCNN in float32."""
    model = _model(name, task)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


@pytest.mark.parametrize("task", ["denoise", "sr2"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_protocol_and_zero_state(name, task):
    model = _model(name, task)
    s = model.scale
    assert s == (2 if task == "sr2" else 1) and model.name == name
    assert model.recurrent == (name in RECURRENT)
    x = torch.randn(1, 3, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (1, 3, 3, 16 * s, 16 * s)
        state, steps = None, []
        for t in range(3):
            out, state = model.step(x[:, t], state)
            steps.append(out)
        torch.testing.assert_close(torch.stack(steps, 1), y, rtol=0, atol=1e-6)
        zero = model.init_state(x[:, 0])
        zero = tuple(torch.zeros_like(z) for z in zero) if isinstance(zero, tuple) else torch.zeros_like(zero)
        torch.testing.assert_close(model.step(x[:, 0], zero)[0], model.step(x[:, 0], None)[0], rtol=0, atol=0)


@pytest.mark.parametrize("task", ["denoise", "sr2"])
@pytest.mark.parametrize("name", RECURRENT + ["vresnet-multi", "vdncnn-shift"])
def test_dampening(name, task):
    model = _he_model(name, task)
    x = torch.randn(1, 3, 3, 16, 16)
    x2 = x.clone()
    x2[:, 1 if name.endswith("shift") else 0] += 1.0  # "shift" only sees one frame back
    with torch.no_grad():
        assert (model(x)[:, 2] - model(x2)[:, 2]).abs().max() > 1e-4
        model.dampening = 0.0
        torch.testing.assert_close(model(x)[:, 2], model(x2)[:, 2], rtol=0, atol=0)
        ref = _he_model(name, task)
        ref.dampening = 0.5
        model.dampening = 0.5
        torch.testing.assert_close(model(x), ref(x))


def test_feedforward_state_is_bounded():
    """'shift' and 'multi' outputs depend on at most 1 / 2 previous frames."""
    x = torch.randn(1, 5, 3, 16, 16)
    x2 = x.clone()
    x2[:, 0] += 1.0
    with torch.no_grad():
        for name, lag in (("vdncnn-shift", 1), ("vresnet-multi", 2)):
            model = _he_model(name)
            y, y2 = model(x), model(x2)
            assert (y[:, lag] - y2[:, lag]).abs().max() > 1e-4
            torch.testing.assert_close(y[:, lag + 1:], y2[:, lag + 1:], rtol=0, atol=0)


def test_validation_messages():
    with pytest.raises(ValueError, match="vresnet-feat.*vdncnn-rlsp|vdncnn-rlsp.*vresnet-feat"):
        build_model("vresnet-lstm")
    with pytest.raises(ValueError, match="task.*denoise.*sr2"):
        build_model("vresnet-feat", task="sr4")
    with pytest.raises(ValueError, match="width"):
        build_model("vresnet-feat", width=0)
    with pytest.raises(ValueError, match="channels"):
        build_model("vresnet-feat", channels=2.5)
    with pytest.raises(ValueError, match="state_channels"):
        build_model("vresnet-feat", state_channels=4)
    with pytest.raises(ValueError, match="dampening"):
        build_model("vresnet-feat", dampening=1.5)
    model = _model("vdncnn-frame")
    with pytest.raises(ValueError, match="dampening"):
        model.dampening = -0.1
    assert build_model("vdncnn-rlsp", width=8, state_channels=5).init_state(torch.zeros(2, 3, 4, 4)).shape == (2, 5, 4, 4)


def test_bursts_without_overlap():
    model = _model("vresnet-feat")
    x = torch.randn(1, 7, 3, 16, 16)
    with torch.no_grad():
        out = torch.stack(list(run_bursts(model, (x[:, t] for t in range(7)), burst=3)), 1)
        ref = torch.cat([model(x[:, i:i + 3]) for i in range(0, 7, 3)], 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_bursts_with_overlap():
    """burst=4: state A restarts at 0, 4, 8; state B at 2, 6, 10. Output from A on 0-3, B on 4-5,
    A on 6-7, B on 8-9, A on 10."""
    model = _model("vdncnn-rlsp")
    x = torch.randn(1, 11, 3, 16, 16)
    with torch.no_grad():
        out = torch.stack(list(run_bursts(model, (x[:, t] for t in range(11)), burst=4, overlap=True)), 1)
        a = torch.cat([model(x[:, i:i + 4]) for i in range(0, 11, 4)], 1)
        b = torch.cat([model(x[:, i:i + 4]) for i in range(2, 11, 4)], 1)
    source = {t: a[:, t] for t in (0, 1, 2, 3, 6, 7, 10)} | {t: b[:, t - 2] for t in (4, 5, 8, 9)}
    for t in range(11):
        torch.testing.assert_close(out[:, t], source[t], rtol=0, atol=1e-6)


def test_bursts_validation():
    model = _model("vdncnn-feat")
    for burst in (1, 0, 2.5):
        with pytest.raises(ValueError, match="burst"):
            next(run_bursts(model, iter([torch.zeros(1, 3, 8, 8)]), burst=burst, overlap=True))


@pytest.mark.parametrize("init,std", [("he", lambda fan_in, fan_out: (2 / fan_in) ** 0.5),
                                      ("glorot", lambda fan_in, fan_out: (2 / (fan_in + fan_out)) ** 0.5)])
def test_init_schemes(init, std):
    torch.manual_seed(0)
    model = build_model("vresnet-feat", width=32, init=init)
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * 9
        assert abs(float(conv.weight.detach().std()) / std(fan_in, fan_out) - 1) < 0.15
        assert not conv.bias.any()
    default = build_model("vresnet-feat", width=32)
    assert all(conv.bias.any() for conv in default.modules() if isinstance(conv, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="init"):
        build_model("vresnet-feat", init="xavier")


def test_depth_gives_appendix_g_tiny_model_and_shorter_vresnet():
    tiny = build_model("vdncnn-feat", depth=3, width=32, channels=1)
    convs = [m for m in tiny.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and convs[0].in_channels == 33 and convs[-1].out_channels == 1
    assert tiny(torch.rand(1, 4, 1, 8, 8)).shape == (1, 4, 1, 8, 8)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in build_model("vresnet-frame", depth=2).modules()) == 6
    assert sum(isinstance(m, torch.nn.Conv2d) for m in build_model("vdncnn-feat").modules()) == 10
    for name, depth in (("vdncnn-feat", 1), ("vresnet-feat", 0), ("vresnet-feat", 2.0)):
        with pytest.raises(ValueError, match="depth"):
            build_model(name, depth=depth)


def test_normal_init_is_the_papers_figure_2b_gaussian():
    torch.manual_seed(0)
    model = build_model("vresnet-feat", width=64, init="normal")
    conv = model.net.body[0].conv1
    assert abs(float(conv.weight.detach().std()) - 0.1) < 0.005 and not conv.bias.any()
