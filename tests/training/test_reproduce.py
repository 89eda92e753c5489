"""``python -m training.run reproduce``: smoke run of every experiment, resume from the cache, the
claim verdicts from known numbers, and the bad-input rules."""
import json
import math
import os
import warnings

import pytest
import torch

from training.reproduce import claims, runner
from training.reproduce.claims import CLAIMS, NOT_REPRODUCED, NOT_RUN, NOT_TESTABLE, REPRODUCED, judge
from training.reproduce.experiments import DEFAULT_EXPERIMENTS, EXPERIMENTS, TINY
from training.reproduce.store import claim_folder, read_json, write_json
from training.run import main


def _claim_rows(text):
    section = text.split("## Claims", 1)[1].split("## Time", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reproduce") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SRN-C's floor warnings at the smoke scale's 4x4 maps
        assert main(["reproduce", "--preset", "smoke", "--out", str(folder), "--no-progress"]) == 0
    return folder


def test_smoke_runs_every_experiment_with_one_row_per_claim(smoke_folder):
    text = (smoke_folder / "reproduction.md").read_text()
    rows = _claim_rows(text)
    assert len(rows) == len(CLAIMS)
    allowed = claims.VERDICTS + ("not run",)
    for row, claim in zip(rows, CLAIMS):
        verdict = row.split("**")[1]
        assert verdict in allowed, row
        # every experiment of the default run ran: only the recipe search's claim may be "not run"
        assert (verdict == NOT_RUN) == (claim.experiment == "recipe"), row
    for name in DEFAULT_EXPERIMENTS:
        assert f"## {EXPERIMENTS[name].title}" in text
    for figure in ("fig2b/figure2b.png", "table3/spectra.png", "table3/long_video.png",
                   "appendixG/training_curves.png"):
        assert (smoke_folder / figure).stat().st_size > 0, figure
    strips = [line for line in text.splitlines() if "![TRF" in line]
    assert strips and all((smoke_folder / line.split("](")[1].rstrip(")")).is_file() for line in strips)


def test_second_run_trains_and_measures_nothing(smoke_folder, monkeypatch):
    before = (smoke_folder / "reproduction.md").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("the second run must come from the cache")

    monkeypatch.setattr(runner, "train", forbidden)
    monkeypatch.setattr(runner, "measure_model", forbidden)
    monkeypatch.setattr("training.figures.output_norms", forbidden)
    export = smoke_folder.parent / "export"
    assert main(["reproduce", "--preset", "smoke", "--out", str(smoke_folder), "--no-progress",
                 "--export", str(export)]) == 0
    after = (smoke_folder / "reproduction.md").read_text()
    assert _claim_rows(after) == _claim_rows(before)
    # the export: the report, every figure it links and its records, no checkpoint
    assert (export / "reproduction.md").read_text() == after
    linked = [line.split("](")[1].rstrip(")") for line in after.splitlines() if "](" in line]
    assert linked and all((export / name).is_file() for name in linked)
    assert len(list((export / "measure").glob("*.json"))) >= 25 and not list(export.rglob("*.pt"))


def test_only_unknown_name_lists_the_valid_ones(tmp_path, capsys):
    assert main(["reproduce", "--preset", "smoke", "--only", "table3,tabel2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "tabel2" in err and all(name in err for name in EXPERIMENTS)
    assert not (tmp_path / "r").exists()


def test_folder_of_another_configuration_refuses_to_resume(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["reproduce", "--preset", "smoke", "--only", "fig2b", "--out", out]) == 0
    assert main(["reproduce", "--preset", "smoke", "--only", "fig2b", "--out", out, "--set", "width=6"]) == 2
    err = capsys.readouterr().err
    assert "width" in err and "refusing" in err
    assert main(["reproduce", "--preset", "default", "--only", "fig2b", "--out", out]) == 2
    assert "preset" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not mine")
    assert main(["reproduce", "--preset", "smoke", "--only", "fig2b", "--out", str(tmp_path / "other")]) == 2


def test_a_diverging_model_is_recorded_with_its_step_and_the_job_goes_on(tmp_path, monkeypatch):
    import training.train as train_module

    original = train_module.make_batch

    def nan_at_step_2(config, clips, step, *args):
        inputs, target = original(config, clips, step, *args)
        if config.alpha == 1.5 and step == 2:  # only SRN-C 1.5-1 diverges
            inputs = inputs * float("nan")
        return inputs, target

    monkeypatch.setattr(train_module, "make_batch", nan_at_step_2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["reproduce", "--preset", "smoke", "--only", "table3", "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "reproduction.md").read_text()
    assert "| SRN-C 1.5-1 | diverged at step 2" in text
    assert "| SRN-C 0.5-1 | " in text and "| SRN-C 2-0.05 | " in text  # the models after it were trained
    row = next(r for r in _claim_rows(text) if "alpha > 1 are unstable" in r)
    assert NOT_TESTABLE in row and "diverged in training at step 2" in row


def test_tiny_model_and_gray_data_come_from_the_registries():
    from training.config import Config
    from training.models import build_model
    from training.train import build, training_clips

    entry = EXPERIMENTS["appendixG"].entries("default")[-1]
    config = runner.entry_config({**Config().to_dict()}, entry)
    assert (config.model, config.depth, config.channels, config.sigma, config.frames) == ("vdncnn-feat", 3, 1, 20.0, 56)
    model = build(config, "none")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and convs[0].in_channels == 1 + TINY["width"]  # one internal conv; gray + state
    assert type(model) is type(build_model("vdncnn-feat"))
    clip = training_clips(config)[0]
    assert clip.shape == (56, 1, 32, 32)


def test_store_writes_atomically_and_names_the_differing_key(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    write_json(path, {"x": math.inf, "y": [1.0, math.nan]})
    assert read_json(path)["x"] == math.inf and math.isnan(read_json(path)["y"][1])

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"x": 2})
    monkeypatch.undo()
    assert read_json(path)["x"] == math.inf and sorted(os.listdir(tmp_path)) == ["a.json"]
    claim_folder(tmp_path / "f", {"preset": "smoke", "base": {"lr": 1e-3, "steps": 3}})
    with pytest.raises(ValueError, match=r"base\.steps=3 there, 4 now"):
        claim_folder(tmp_path / "f", {"preset": "smoke", "base": {"lr": 1e-3, "steps": 4}})


# ---------------------------------------------------------------- verdicts from known numbers
def _record(psnr=30.0, instabilities=0, trf="no instability found", extent=5, sigmas=(1.0,), diverged=None,
            fractions=(0.5,), psnr_t=None, trace=None, curve=()):
    return {"train": {"diverged_at": diverged, "seconds": 1.0, "last_loss": 0.0},
            "eval": {"mean": psnr, "psnr_1": psnr, "psnr_T": psnr if psnr_t is None else psnr_t},
            "instability": {"instabilities": instabilities, "frames": 2000, "onsets": [5] * instabilities,
                            "onset_decile_1": 5.0 if instabilities else math.inf,
                            "onset_decile_9": 9.0 if instabilities else math.inf,
                            "psnr_trace": [psnr] * 4 if trace is None else trace},
            "trf": {"verdict": trf, "extent": extent, "tau": 20, "growth": 1.0},
            "sigma_layers": list(sigmas), "sigma_max": max(sigmas), "stable_rank_fraction_layers": list(fractions),
            "input_psnr": 18.6, "loss_curve": list(curve)}


def _verdicts(results):
    return {claim.id: (verdict, reason) for claim, _, verdict, reason in judge(results)}


def test_claim_verdicts_are_computed_from_the_numbers():
    unstable = _record(instabilities=12, trf="unstable", extent=20)
    table3 = {"none": _record(psnr=27.0, instabilities=3, trf="unstable", extent=20, sigmas=(1.4, 2.0)),
              "SN 1": _record(sigmas=(1.6, 1.8)),
              "SRN 1-1": _record(sigmas=(1.0, 1.05)),  # within 1.1 alpha: SRN reaches alpha here
              "SRN-C 2-1": _record(psnr=4.4, instabilities=310, trf="unstable", extent=20, sigmas=(2.0, 2.0)),
              "SRN-C 1.5-1": dict(unstable, sigma_layers=[1.5, 1.51]),
              "SRN-C 1-1": _record(psnr=26.0, extent=9, sigmas=(1.0, 0.99)),
              "SRN-C 0.5-1": _record(psnr=24.0, extent=4, sigmas=(0.5, 0.5)),
              "SRN-C 2-0.4": dict(unstable, sigma_layers=[2.0], stable_rank_fraction_layers=[0.3]),
              "SRN-C 2-0.2": _record(trf="inconclusive", extent=20, sigmas=(2.0,), fractions=(0.2,)),
              "SRN-C 2-0.1": _record(psnr=26.8, sigmas=(2.0, 2.005), fractions=(0.1,)),
              "SRN-C 2-0.05": _record(psnr=26.5, sigmas=(2.0,), fractions=(0.12,))}
    v = _verdicts({"table3": table3})
    assert v["t3-sn-sigma"][0] == REPRODUCED
    assert v["t3-srn-sigma"][0] == NOT_REPRODUCED
    assert v["t3-srnc-sigma"][0] == REPRODUCED and v["t3-beta-sigma"][0] == REPRODUCED
    assert v["t3-alpha-unstable"] == (NOT_TESTABLE, "SRN-C 2-1 did not learn its task (PSNR 4.40 dB <= input 18.60 dB)")
    assert v["t3-alpha-stable"][0] == REPRODUCED
    assert v["t3-alpha-trf"][0] == REPRODUCED  # extent 4 < 9
    assert v["t3-alpha-psnr"][0] == NOT_TESTABLE  # alpha 2 did not learn
    assert v["t3-beta-unstable"][0] == NOT_TESTABLE and "inconclusive" in v["t3-beta-unstable"][1]
    assert v["t3-beta-stable"][0] == REPRODUCED
    assert v["t3-beta-srank"][0] == NOT_REPRODUCED  # 0.05 above 0.1
    assert v["t3-soft-vs-hard"][0] == REPRODUCED  # 26.8 > 26.0 and stable
    assert v["t4-cost"][0] == REPRODUCED  # -0.2 dB, and SRN-C 2-0.1 is stable
    assert v["tests-agree"][0] == REPRODUCED  # every decided model agrees, some unstable
    assert v["t2-unstable"][0] == NOT_RUN and v["fig2b"][0] == NOT_RUN and v["central"][0] == NOT_RUN
    # the same numbers with the unconstrained model 1 dB above SRN-C 2-0.1: a significant loss
    table3["none"] = _record(psnr=27.9, psnr_t=27.9)
    v = _verdicts({"table3": table3})
    assert v["t4-cost"][0] == NOT_REPRODUCED and "-1.10 dB" in v["t4-cost"][1]
    # a long-video instability without a TRF instability: the tests disagree
    table3["SRN-C 2-0.05"] = _record(psnr=26.5, instabilities=2, trf="no instability found", fractions=(0.05,))
    v = _verdicts({"table3": table3})
    assert v["tests-agree"][0] == NOT_REPRODUCED and "SRN-C 2-0.05" in v["tests-agree"][1]
    assert v["t3-beta-stable"][0] == NOT_REPRODUCED and v["t3-beta-srank"][0] == REPRODUCED


def test_claim_verdicts_of_the_other_experiments():
    stable, unstable = _record(), _record(instabilities=4, trf="unstable", extent=20)
    table2 = {"vdncnn-feat": unstable, "vdncnn-rlsp": unstable, "vresnet-feat": _record(trf="unstable", extent=20),
              "vdncnn-frame": stable, "vresnet-frame": stable, "vresnet-rlsp": _record(instabilities=1),
              }
    appendix_g = {f"T={t}": _record(curve=[(s, 1.0 / s) for s in range(1, 50)]) for t in (7, 14, 28)}
    appendix_g["T=56"] = _record(diverged=120)
    ef = {"none": _record(psnr=27.0, instabilities=5, trf="unstable", extent=20, trace=[27.0, 26.0]),
          "bursts of 10": _record(psnr=26.0, trace=[25.0, 24.0]),
          "bursts of 10, overlap": _record(psnr=26.5, instabilities=1, trace=[26.0, 26.0]),
          "dampening 0.95": _record(instabilities=3, trf="unstable", extent=20),
          "dampening 0.85": _record(),
          "dampening 0.55": _record(psnr=25.0, psnr_t=25.0),
          "SRN-C 2-0.1": _record(psnr=26.8, psnr_t=26.8, trace=[26.5, 26.5])}
    fig2b = {"curves": {"vresnet-feat": [1.0, 50.0, math.inf], "vresnet-single": [1.0, 1.1, 1.2],
                        "vdncnn-frame": [1.0, 1.0, 1.0]}}
    recipe = {"baseline | none": stable, "baseline | SRN-C 2-1": _record(psnr=5.0),
              "init=he | none": _record(psnr=25.0, instabilities=9, trf="unstable", extent=20),
              "init=he | SRN-C 2-1": _record(psnr=24.5)}
    v = _verdicts({"table2": table2, "appendixG": appendix_g, "appendixEF": ef, "fig2b": fig2b, "recipe": recipe})
    assert v["t2-unstable"][0] == REPRODUCED and v["t2-stable"] == (NOT_REPRODUCED, "vresnet-rlsp: unstable")
    assert v["t2-spectra"][0] == NOT_REPRODUCED  # every layer at sigma_1 1
    assert v["fig2b"] == (NOT_REPRODUCED, "against the claim: vdncnn-frame")
    assert v["g-56"][0] == NOT_TESTABLE and "step 120" in v["g-56"][1]
    assert v["g-curve"][0] == REPRODUCED  # T=56 diverged, the others decrease smoothly
    assert v["e-bursts-stable"] == (NOT_REPRODUCED, "bursts still fail")
    assert v["e-bursts-psnr"][0] == REPRODUCED  # 26.5 above 24.5 and 26.0
    assert v["f-damp-unstable"][0] == NOT_REPRODUCED and v["f-damp-stable"][0] == REPRODUCED
    assert v["f-damp-cost"][0] == REPRODUCED  # -2.0 dB against -0.2 dB
    assert v["central"][0] == REPRODUCED and v["central"][1].startswith("1 of 2 recipes")
    recipe["init=he | none"] = stable
    v = _verdicts({"recipe": recipe})
    assert v["central"][0] == NOT_TESTABLE and "of the 2 tried" in v["central"][1]


def test_recipe_rule_prefers_an_unstable_trained_model_then_a_learning_srnc():
    from training.reproduce.claims import pick_recipe

    levers = [("baseline", {}, ""), ("clip", {"grad_clip": 1.0}, ""), ("he", {"init": "he"}, ""),
              ("long", {"steps": 6000}, "")]
    recs = {"baseline | none": _record(psnr=27.0), "baseline | SRN-C 2-1": _record(psnr=8.0),
            "clip | none": _record(psnr=27.1), "clip | SRN-C 2-1": _record(psnr=26.0),
            "he | none": _record(psnr=5.0, instabilities=9, trf="unstable", extent=20),
            "he | SRN-C 2-1": _record(psnr=7.0),
            "long | none": _record(psnr=29.0, instabilities=9, trf="unstable", extent=20),
            "long | SRN-C 2-1": _record(psnr=28.5)}
    assert pick_recipe(recs, levers, 500)[0] == "clip"  # he's model is unstable but did not learn; long is too long
    recs["he | none"] = _record(psnr=26.0, instabilities=9, trf="unstable", extent=20)
    assert pick_recipe(recs, levers, 500)[0] == "he"
    assert pick_recipe(recs, levers, 6000)[0] == "long"
    assert pick_recipe({}, levers, 500)[0] is None
