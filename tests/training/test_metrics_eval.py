"""PSNR against hand-computed values; the instability test on models with known behaviour."""
import math

import pytest
import torch

from training.evaluate import instability_test
from training.metrics import psnr, rgb_to_y


def test_psnr_hand_computed():
    target = torch.zeros(2, 3, 4, 4)
    output = torch.full((2, 3, 4, 4), 0.1)
    output[1] = 0.5
    values = psnr(output, target)
    torch.testing.assert_close(values, torch.tensor([20.0, 10 * math.log10(4.0)], dtype=torch.float64))
    assert psnr(target, target).isinf().all()


def test_psnr_y_channel_and_border_crop():
    target = torch.zeros(1, 3, 6, 6)
    output = target.clone()
    output[..., 0, :] = 1.0  # only the border row differs
    assert psnr(output, target, crop_border=1).isinf().all()
    y = rgb_to_y(torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(y, torch.full((1, 1, 2, 2), 235.0 / 255.0))
    with pytest.raises(ValueError, match="shape"):
        psnr(output, target[..., :5])


class _Linear:
    """h_t = a h_{t-1} + x_t, y_t = h_t: diverges for a > 1."""

    def __init__(self, a):
        self.a = a

    def eval(self):
        return self

    def step(self, x, state):
        state = x if state is None else self.a * state + x
        return state, state


def _frames(n):
    return (torch.full((3, 4, 4), 0.5) for _ in range(n))


def _identity(clean):
    return clean, clean


def test_instability_counts_and_resets_on_a_diverging_model():
    result = instability_test(_Linear(2.0), _frames(40), _identity)
    # y_k = 0.5 (2^k - 1): |y - 0.5| is 0, 1, 3 for k = 1, 2, 3; PSNR < 0 needs MSE > 1: k = 3
    assert result["instabilities"] == 13 and set(result["onsets"]) == {3}
    assert result["onset_decile_1"] == 3 and result["onset_decile_9"] == 3


def test_no_instability_on_a_contractive_model_reports_inf():
    result = instability_test(_Linear(0.5), _frames(40), _identity)
    assert result["instabilities"] == 0 and math.isinf(result["onset_decile_9"])
    assert len(result["psnr_trace"]) == 40


def test_non_finite_output_counts_as_instability():
    class Nan(_Linear):
        def step(self, x, state):
            return torch.full_like(x, float("nan")), None

    assert instability_test(Nan(1.0), _frames(5), _identity)["instabilities"] == 5
