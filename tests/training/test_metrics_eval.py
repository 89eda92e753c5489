"""PSNR against hand-computed values; the evaluation uses the library's instability test."""
import math

import pytest
import torch

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


def test_training_uses_the_library_instability_test():
    # its behaviour is tested in tests/test_diagnostics.py
    from srnc_ext import diagnostics
    from training import evaluate

    assert evaluate.instability_test is diagnostics.instability_onsets
