"""The diagnostics' PNG figures are written and non-empty at a tiny setting."""
import torch

from srnc_ext import diagnostics, plots


def test_trf_influence_and_spectrum_figures(tmp_path):
    model = diagnostics.as_recurrent(lambda x, h: ((x if h is None else 0.5 * h + x),) * 2)
    result = diagnostics.trf(model, frames=11, size=8, iters=3, progress=False)
    for path in (plots.trf_figure(result, tmp_path / "trf.png"), plots.influence_figure(result, tmp_path / "inf.png"),
                 plots.spectrum_figure({"a": torch.linspace(2, 0, 50).tolist()}, tmp_path / "spec.png")):
        assert path.stat().st_size > 1000


def test_trf_figure_survives_non_finite_outputs(tmp_path):
    model = diagnostics.as_recurrent(lambda x, h: (torch.full_like(x, float("inf")), None))
    result = diagnostics.trf(model, frames=5, size=8, iters=2, progress=False)
    assert result.verdict == "unstable"
    assert plots.trf_figure(result, tmp_path / "trf.png").stat().st_size > 1000
