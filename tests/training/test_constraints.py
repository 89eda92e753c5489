"""Constraint methods: SRN-C conversion, reshaped-kernel SN and SRN, validation."""
import pytest
import torch
from torch import nn

from srnc_ext import SRNCConv2d
from training.constraints import METHODS, apply_constraint
from training.models import build_model


def _model(width=8):
    torch.manual_seed(0)
    return build_model("vresnet-feat", width=width)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _reshaped(conv):
    return conv.weight.detach().reshape(conv.weight.shape[0], -1)


def _sigma(conv):
    return torch.linalg.matrix_norm(_reshaped(conv), 2).item()


def _stable_rank(conv):
    w = _reshaped(conv)
    return (torch.linalg.matrix_norm(w) ** 2 / torch.linalg.matrix_norm(w, 2) ** 2).item()


def _train_forwards(model, n=5):
    model.train()
    with torch.no_grad():
        for _ in range(n):
            model(torch.randn(1, 2, 3, 8, 8))


def test_none_and_srnc():
    model = _model()
    assert apply_constraint(model, "none") is model
    model = apply_constraint(model, "srnc", alpha=2.0, beta=0.5, n_power_iterations=2, input_size=8)
    convs = _convs(model)
    assert len(convs) == 12 and all(isinstance(c, SRNCConv2d) for c in convs)
    assert all(c.alpha == 2.0 and c.beta == 0.5 and c.n_power_iterations == 2 for c in convs)
    assert model(torch.randn(1, 2, 3, 8, 8)).shape == (1, 2, 3, 8, 8)


@pytest.mark.parametrize("method", ["sn", "srn"])
@pytest.mark.parametrize("alpha, iterations, rel", [(1.0, 1, 5e-2), (0.5, 20, 1e-4), (2.0, 20, 1e-4)])
def test_reshaped_spectral_norm_is_alpha(method, alpha, iterations, rel):
    """'sn' and 'srn' with beta=1: sigma_1 of the reshaped kernel is alpha once the power
    iteration (one step per training-mode forward) has converged."""
    model = apply_constraint(_model(), method, alpha=alpha, n_power_iterations=iterations)
    _train_forwards(model, 10)
    for conv in _convs(model):
        assert _sigma(conv) == pytest.approx(alpha, rel=rel)


def test_srn_beta_lowers_stable_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    before = _stable_rank(conv)
    beta, rank = 0.2, 16
    apply_constraint(conv, "srn", alpha=1.5, beta=beta)
    conv.train()
    for _ in range(20):
        conv(torch.randn(1, 16, 8, 8))
    after = _stable_rank(conv)
    assert beta * rank < before
    assert after == pytest.approx(beta * rank, rel=0.02)
    assert _sigma(conv) == pytest.approx(1.5, rel=1e-2)
    conv.weight.sum().backward()  # differentiable
    assert conv.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize("method", ["sn", "srn"])
def test_eval_does_not_update(method):
    model = apply_constraint(_model(), method, alpha=1.0)
    _train_forwards(model, 1)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y1 = model(torch.ones(1, 2, 3, 8, 8))
        y2 = model(torch.ones(1, 2, 3, 8, 8))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("first", ["srnc", "sn", "srn"])
@pytest.mark.parametrize("second", ["srnc", "sn", "srn"])
def test_double_application_raises(first, second):
    model = apply_constraint(_model(), first)
    with pytest.raises(ValueError, match="already constrained"):
        apply_constraint(model, second)


def test_bad_method_and_params():
    with pytest.raises(ValueError, match=", ".join(METHODS)):
        apply_constraint(_model(), "lipschitz")
    with pytest.raises(ValueError, match="beta"):
        apply_constraint(_model(), "sn", beta=0.5)
    with pytest.raises(ValueError, match="alpha"):
        apply_constraint(_model(), "srn", alpha=0.0)
    with pytest.raises(ValueError, match="beta"):
        apply_constraint(_model(), "srn", beta=1.5)
    with pytest.raises(ValueError, match="n_power_iterations"):
        apply_constraint(_model(), "srnc", n_power_iterations=0)
    with pytest.raises(ValueError, match="alpha"):
        apply_constraint(_model(), "none", alpha=2.0)


def test_constraints_and_config_reject_hyperparameters_with_the_layers_messages():
    """One home for the checks (srnc_ext.hyperparameters): the same message from the layer, the
    constraint and the run configuration."""
    import pytest
    from srnc_ext import SRNCConv2d
    from training.config import make_config
    from training.constraints import apply_constraint
    from training.models import build_model

    for key, value in (("alpha", float("nan")), ("beta", 1.5), ("variant", "literal")):
        with pytest.raises(ValueError) as layer_error:
            SRNCConv2d(2, 2, 3, **{key: value})
        with pytest.raises(ValueError) as constraint_error:
            apply_constraint(build_model("vresnet-feat", width=4), "srnc", **{key: value})
        with pytest.raises(ValueError) as config_error:
            make_config("smoke", None, [f"{key}={value}"])
        assert str(layer_error.value) == str(constraint_error.value) == str(config_error.value)
