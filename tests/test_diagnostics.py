"""TRF diagnostic and instability onsets (srnc_ext.diagnostics) on models with known behaviour."""
import math

import pytest
import torch
from torch import nn

import srnc_ext
from srnc_ext.diagnostics import TRFResult, as_recurrent, instability_onsets, trf, trf_verdict

FAST = dict(frames=21, size=8, iters=40, progress=False)


class Linear(nn.Module):
    """Per pixel h_t = a h_{t-1} + x_t, y_t = h_t: dp/dx_t = a^(tau - t) at the centre pixel only."""

    def __init__(self, a):
        super().__init__()
        self.a = a
        self.dummy = nn.Parameter(torch.ones(1))  # a parameter that must not change

    def step(self, x, state):
        h = x * self.dummy if state is None else self.a * state + x * self.dummy
        return h, h


class ConvRNN(nn.Module):
    """h_t = relu(conv_h(h_{t-1})) + conv_x(x_t), y_t = conv_out(h_t)."""

    def __init__(self, size, alpha=None, gain=None, hidden=4, channels=3):
        super().__init__()
        torch.manual_seed(0)
        if alpha is None:
            self.conv_h = nn.Conv2d(hidden, hidden, 3, padding=1)
        else:
            self.conv_h = srnc_ext.SRNCConv2d(hidden, hidden, 3, padding=1, alpha=alpha, input_size=size)
        self.conv_x = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        if gain is not None:  # scale the recurrent operator to spectral norm `gain` on size x size maps
            with torch.no_grad():
                self.conv_h.weight.mul_(gain / srnc_ext.spectral.spectral_norm(self.conv_h, size))

    def step(self, x, state):
        h = self.conv_x(x) if state is None else torch.relu(self.conv_h(state)) + self.conv_x(x)
        return self.conv_out(h), h


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _assert_common(result, model, before, frames, iters):
    assert isinstance(result, TRFResult)
    tau = frames // 2
    assert result.tau == tau and result.X.shape[0] == frames and result.influence.shape == (frames,)
    assert (result.influence[tau + 1:] == 0).all()
    assert torch.isfinite(result.X).all() and result.X.min() >= 0 and result.X.max() <= 1
    assert len(result.p_history) <= iters
    for k, v in _snapshot(model).items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_linear_diverging_reaches_first_frame():
    model = Linear(1.1).train()
    before = _snapshot(model)
    r = trf(model, **FAST)
    _assert_common(r, model, before, 21, 40)
    assert model.training and len(r.p_history) == 40
    assert r.verdict == "unstable" and r.extent == r.tau and r.nonfinite_at is None
    torch.testing.assert_close(r.influence[:11], 1.1 ** torch.arange(10, -1, -1, dtype=torch.float64), rtol=1e-6, atol=0)
    assert r.p_history[-1] > r.p_history[0]


@pytest.mark.parametrize("threshold", [1e-3, 1e-2])
def test_linear_contractive_extent_matches_analytic(threshold):
    a = 0.5
    model = Linear(a).eval()
    before = _snapshot(model)
    r = trf(model, threshold=threshold, **FAST)
    _assert_common(r, model, before, 21, 40)
    assert not model.training
    assert r.verdict == "no instability found" and r.growth <= 10
    assert r.extent == math.floor(math.log(threshold) / math.log(a))  # 9 and 6
    torch.testing.assert_close(r.influence[:11], a ** torch.arange(10, -1, -1, dtype=torch.float64))
    # |p| is maximized: the centre pixel of channel 0 saturates at 1 in every frame up to t = 0
    c = r.X[:11, 0, 4, 4]
    torch.testing.assert_close(c, torch.ones(11))


def test_as_recurrent_and_super_resolution_output():
    def fn(x, state):  # scale-2 output, contractive state
        h = x if state is None else 0.3 * state + x
        return nn.functional.interpolate(h, scale_factor=2, mode="nearest"), h

    r = trf(as_recurrent(fn), **FAST)
    assert r.Y.shape == (21, 3, 16, 16)
    assert r.verdict == "no instability found" and r.extent == math.floor(math.log(1e-3) / math.log(0.3))


def test_srnc_conv_model_is_stable_and_plain_large_is_unstable():
    size = 8
    stable = ConvRNN(size, alpha=0.5)
    srnc_ext.refresh(stable, n_iterations=200)
    stable.train()
    before = _snapshot(stable)
    r = trf(stable, frames=21, size=size, iters=40, progress=False)
    _assert_common(r, stable, before, 21, 40)
    assert stable.training and all(m.training for m in stable.modules())
    assert r.verdict == "no instability found", r.reason
    assert r.extent < r.tau

    unstable = ConvRNN(size, gain=2.5)
    r = trf(unstable, frames=21, size=size, iters=40, progress=False)
    assert r.verdict == "unstable", r.reason
    assert r.extent == r.tau


def test_nan_model_stops_early_without_crash():
    class Blowup(Linear):
        def step(self, x, state):
            h, _ = super().step(x, state)
            if float(h.detach().max()) > 3.0:
                h = torch.full_like(h, float("inf"))
            return h, h

    r = trf(Blowup(1.0), **FAST)
    assert r.verdict == "unstable" and r.nonfinite_at is not None
    assert r.nonfinite_at["iteration"] == 0 and 2 <= r.nonfinite_at["frame"] <= 10
    assert torch.isfinite(r.X).all() and len(r.p_history) == 0


def test_nan_after_some_iterations_keeps_last_finite_x():
    class Late(Linear):  # finite at first, inf once the optimizer pushes the centre pixel up
        def step(self, x, state):
            h, _ = super().step(x, state)
            y = torch.where(h[..., 4, 4].amax() > 10.5, torch.full_like(h, float("nan")), h)
            return y, h

    r = trf(Late(1.0), **FAST)
    assert r.verdict == "unstable" and r.nonfinite_at["iteration"] > 0
    assert len(r.p_history) == r.nonfinite_at["iteration"]
    assert torch.isfinite(r.X).all() and r.X.min() >= 0 and r.X.max() <= 1


def test_bad_inputs():
    with pytest.raises(TypeError, match=r"step\(x_t, state\)"):
        trf(object(), **FAST)
    for frames in (20, 1, 2):
        with pytest.raises(ValueError, match="frames"):
            trf(Linear(0.5), frames=frames, size=8, progress=False)
    with pytest.raises(ValueError, match="size"):
        trf(Linear(0.5), frames=5, size=0, progress=False)
    with pytest.raises(ValueError, match="size"):
        trf(as_recurrent(lambda x, s: (x, s), min_size=16), frames=5, size=8, progress=False)
    with pytest.raises(ValueError, match="iters"):
        trf(Linear(0.5), frames=5, size=8, iters=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        trf(Linear(0.5), frames=5, size=8, lr=0.0, progress=False)


# ---------------------------------------------------------------- instability_onsets (section 3.1)
class _Plain:
    def __init__(self, a):
        self.a = a

    def eval(self):
        return self

    def step(self, x, state):
        h = x if state is None else self.a * state + x
        return h, h


def _frames(n):
    return [torch.full((1, 4, 4), 0.5) for _ in range(n)]


def _identity(clean):
    return clean, clean


def test_onsets_diverging_model():
    result = instability_onsets(_Plain(2.0), _frames(40), _identity)
    # y_k = 0.5 (2^k - 1): |y - 0.5| is 0, 1, 3 for k = 1, 2, 3; PSNR < 0 needs MSE > 1: k = 3
    assert result["instabilities"] == 13 and set(result["onsets"]) == {3}
    assert result["onset_decile_1"] == 3 and result["onset_decile_9"] == 3 and result["frames"] == 40


def test_onsets_contractive_model_reports_inf():
    result = instability_onsets(_Plain(0.5), _frames(40), _identity)
    assert result["instabilities"] == 0 and math.isinf(result["onset_decile_1"])
    assert math.isinf(result["onset_decile_9"]) and len(result["psnr_trace"]) == 40
    assert instability_onsets(_Plain(0.5), _frames(5), _identity, record=False)["psnr_trace"] == []


def test_onsets_non_finite_counts():
    class Nan(_Plain):
        def step(self, x, state):
            return torch.full_like(x, float("nan")), None

    assert instability_onsets(Nan(1.0), _frames(5), _identity)["instabilities"] == 5


def test_srnc_ext_does_not_import_training():
    import srnc_ext.diagnostics as d
    with open(d.__file__) as f:
        src = f.read()
    assert "import training" not in src and "from training" not in src


def test_decaying_field_longer_than_the_sequence_is_inconclusive_not_unstable():
    # a = 0.5 needs floor(log(1e-3)/log(0.5)) = 9 frames before t = 0; give it 2
    model = as_recurrent(lambda x, h: ((x if h is None else 0.5 * h + x),) * 2)
    r = trf(model, frames=5, size=4, iters=3, progress=False)
    assert r.extent == r.tau and r.verdict == "inconclusive", r.reason


# ---------------------------------------------------------------- the "decays" / "unbounded" rule (tail rate)
@pytest.mark.parametrize("a,verdict", [(0.95, "inconclusive"), (1.0, "unstable"), (1.05, "unstable")])
def test_tail_rate_of_linear_recurrences_decides_decay(a, verdict):
    # influence a^(tau - t) reaches the first frame in all three (0.95^10 = 0.6 of the peak); only
    # the tail's per-frame rate tells a decaying field (a < 1) from an unbounded one (a >= 1)
    r = trf(Linear(a), **FAST)
    torch.testing.assert_close(r.influence[:11], a ** torch.arange(10, -1, -1, dtype=torch.float64), rtol=1e-6, atol=0)
    assert r.extent == r.tau and r.growth <= 10 and r.nonfinite_at is None
    assert r.tail_rate == pytest.approx(a, rel=1e-6)
    assert r.verdict == verdict, r.reason
    assert ("unbounded" in r.reason) == (verdict == "unstable")


def test_decaying_linear_recurrence_with_enough_frames_is_bounded():
    # a = 0.95 needs floor(log(1e-3) / log(0.95)) = 134 frames before t = 0: give it 140
    r = trf(Linear(0.95), frames=281, size=4, iters=3, progress=False)
    assert r.verdict == "no instability found" and r.extent == 134 and r.tail_rate is None


def test_flat_and_basicvsr_like_profiles_are_unbounded():
    tau = 20
    flat = torch.cat([torch.full((tau + 1,), 0.7, dtype=torch.float64), torch.zeros(tau)])
    judged = trf_verdict(flat, tau, growth=1.0)
    assert judged["verdict"] == "unstable" and judged["tail_rate"] == pytest.approx(1.0)
    # peak at t = 0, 0.033 of it one frame after t = -tau and 0.037 at t = -tau: a flat, slightly
    # rising tail far below half the peak (the old rule's test) is still unbounded
    profile = torch.zeros(2 * tau + 1, dtype=torch.float64)
    profile[:tau + 1] = torch.tensor([0.037, 0.033, 0.035, 0.034, 0.036, 0.035] + [0.04 * 1.2 ** k for k in range(14)]
                                     + [1.0], dtype=torch.float64)
    judged = trf_verdict(profile, tau, growth=1.0)
    assert judged["verdict"] == "unstable" and judged["extent"] == tau and judged["tail_rate"] >= 0.99
    decaying = torch.zeros(2 * tau + 1, dtype=torch.float64)
    decaying[:tau + 1] = 0.9 ** torch.arange(tau, -1, -1, dtype=torch.float64)
    assert trf_verdict(decaying, tau, growth=1.0)["verdict"] == "inconclusive"
    assert trf_verdict(decaying, tau, growth=1.0, max_decay_rate=0.85)["verdict"] == "unstable"


def test_verdict_edge_cases():
    tau = 4
    assert trf_verdict(torch.zeros(9, dtype=torch.float64), tau, growth=1.0)["verdict"] == "no instability found"
    growing = trf_verdict(torch.tensor([0, 0, 0, 0.5, 1, 0, 0, 0, 0.]), tau, growth=50.0)
    assert growing["verdict"] == "unstable" and "grow" in growing["reason"]
    nonfinite = trf_verdict(torch.full((9,), math.inf), tau, growth=math.inf, nonfinite_at={"iteration": 0, "frame": 2})
    assert nonfinite["verdict"] == "unstable" and "non-finite" in nonfinite["reason"]
    with pytest.raises(ValueError, match="max_decay_rate"):
        trf(Linear(0.5), frames=5, size=4, iters=1, progress=False, max_decay_rate=1.5)
