"""Training loop, checkpoints, exact resume, config handling and the CLI at a tiny size."""
import json
import os

import pytest
import torch

from training import checkpoint
from training.config import make_config
from training.run import main
from training.train import train

TINY = ["steps=8", "width=4", "crop=16", "frames=3", "batch=2", "log_every=1", "checkpoint_every=2",
        "eval_clips=1", "long_frames=12"]


def _config(*extra):
    return make_config("smoke", overrides=TINY + list(extra))


@pytest.mark.parametrize("method", ["none", "srnc"])
def test_loss_decreases(method, tmp_path):
    config = _config("steps=40", "lr=3e-3", "schedule=constant", "width=8")
    train(config, method, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("method", ["none", "srnc"])
def test_resume_equals_uninterrupted(method, tmp_path):
    config = _config("deterministic=true")
    train(config, method, tmp_path / "full", progress=False)
    train(config, method, tmp_path / "split", progress=False, stop_after=3)
    train(config, method, tmp_path / "split", progress=False, resume=True)
    full = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    split = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in split] == [r["step"] for r in full]
    assert [r["loss"] for r in split] == [r["loss"] for r in full]
    a = checkpoint.load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = checkpoint.load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
        else:
            assert a[key] == b[key], key


def test_incompatible_resume_says_why(tmp_path):
    train(_config(), "none", tmp_path, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="width"):
        train(_config("width=6"), "none", tmp_path, progress=False, resume=True)
    with pytest.raises(ValueError, match="method"):
        train(_config(), "srnc", tmp_path, progress=False, resume=True)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save_checkpoint(path, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"step": 2})
    assert checkpoint.load_checkpoint(path, training=False) == {"step": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


def test_ctrl_c_leaves_a_usable_checkpoint(tmp_path, monkeypatch):
    import training.train as train_module

    calls = {"n": 0}
    original = train_module.make_batch

    def interrupt_on_fourth(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(train_module, "make_batch", interrupt_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        train(_config(), "srnc", tmp_path, progress=False)
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


@pytest.mark.parametrize("override,match", [("model=vresnet-lstm", "vresnet-feat"), ("methods=none,magic", "srnc"),
                                            ("methods=srnc-2-x", "srnc-2-x"), ("methods=sn-1-1", "sn-1-1"),
                                            ("beta=2", "beta"), ("widht=3", "valid keys"), ("steps=abc", "steps")])
def test_bad_config_names_the_argument(override, match, capsys, tmp_path):
    assert main(["--set", override, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_missing_dataset_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(_config(f"data={tmp_path / 'nowhere'}"), "none", tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_pipeline_end_to_end_at_tiny_size(tmp_path):
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in TINY + ["methods=none,sn-1,srnc-2-0.1,srnc-1-1"]), [])
    assert main(["--preset", "smoke", *sets, "--out", str(out), "--no-progress"]) == 0
    for name in ("config.json", "metrics.json", "report.md", "psnr_per_frame.png", "psnr_long_sequence.png",
                 "spectra.png", "none/checkpoint.pt", "srnc-2-0.1/checkpoint.pt", "sn-1/log.csv", "srnc-1-1/log.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"none", "sn-1", "srnc-2-0.1", "srnc-1-1"}
    assert metrics["instability"]["srnc-2-0.1"]["frames"] == 12 and len(metrics["average_spectrum"]["sn-1"]) == 100
    assert metrics["asked"]["srnc-2-0.1"] == {"method": "srnc", "alpha": 2.0, "beta": 0.1}
    saved = checkpoint.load_checkpoint(out / "srnc-2-0.1" / "checkpoint.pt")
    assert (saved["method"], saved["config"]["alpha"], saved["config"]["beta"]) == ("srnc", 2.0, 0.1)
    summary = (out / "report.md").read_text().split("\n\n")[1].splitlines()
    assert [line[:3] for line in summary] == ["1. ", "2. ", "3. "], summary
    assert "Stability" in summary[0] and "Cost" in summary[1] and "sn-1 (on the reshaped kernel, asked 1)" in summary[2]


def test_stage_subcommands(tmp_path):
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in TINY), [])
    assert main(["train", "--method", "srnc", *sets, "--out", str(out), "--no-progress"]) == 0
    ckpt = str(out / "srnc" / "checkpoint.pt")
    for command in ("eval", "instability", "spectra"):
        assert main([command, "--checkpoint", ckpt, "--method", "srnc", *sets, "--out", str(out / command)]) == 0
        assert json.loads((out / command / f"{command}-srnc.json").read_text())[command]


def test_help_lists_models_and_methods(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "vresnet-feat" in text and "srnc" in text and "--set" in text


def test_trf_subcommand_on_an_untrained_model_and_a_checkpoint(tmp_path):
    sets = sum((["--set", s] for s in TINY + ["trf_frames=7", "trf_size=8", "trf_iters=3"]), [])
    assert main(["trf", "--model", "vdncnn-frame", "--method", "srnc", *sets, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "trf_vdncnn-frame-srnc.png").stat().st_size > 0
    assert main(["train", "--method", "none", *sets, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert main(["trf", "--checkpoint", str(tmp_path / "b" / "none" / "checkpoint.pt"), "--method", "none",
                 *sets, "--out", str(tmp_path / "c")]) == 0
    trf = json.loads((tmp_path / "c" / "trf-vresnet-feat-none.json").read_text())["trf"]
    assert trf["verdict"] in ("unstable", "inconclusive", "no instability found") and trf["influence"][-1] == 0


def test_figure2b_recurrent_vresnets_diverge_feedforward_ones_do_not():
    from training.figures import output_norms

    curves = output_norms(frames=30, size=16, width=8)
    assert all(v[-1] < 1e3 for k, v in curves.items() if k.endswith(("single", "multi")))
    assert curves["vresnet-feat"][-1] > 1e6
    assert set(curves) >= {"vdncnn-feat", "vresnet-rlsp"}


def test_eval_burst_by_burst_and_y_channel_options(tmp_path):
    sets = sum((["--set", s] for s in TINY), [])
    assert main(["train", "--method", "none", *sets, "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    ckpt = str(tmp_path / "a" / "none" / "checkpoint.pt")
    results = {}
    for extra in ([], ["--set", "burst=2"], ["--set", "burst=2", "--set", "burst_overlap=true"],
                  ["--set", "y_channel=true", "--set", "crop_border=2"]):
        out = tmp_path / f"e{len(results)}"
        assert main(["eval", "--checkpoint", ckpt, "--method", "none", *sets, *extra, "--out", str(out)]) == 0
        results[len(results)] = json.loads((out / "eval-none.json").read_text())["eval"]["per_frame"]
    assert results[1][:2] == results[0][:2] and results[1][2] != results[0][2]  # frame 2 starts a new burst
    assert results[3] != results[0]


def test_warmup_multiplies_the_schedule():
    from training.train import lr_factor

    config = _config("steps=100", "warmup=10", "schedule=constant")
    assert [lr_factor(config, s) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    cosine = _config("steps=100", "warmup=10", "schedule=cosine")
    assert lr_factor(cosine, 0) == pytest.approx(0.1) and lr_factor(cosine, 50) == pytest.approx(0.5)
    step = _config("steps=100", "schedule=step")
    assert [lr_factor(step, s) for s in (49, 50, 75)] == [1.0, pytest.approx(0.1), pytest.approx(0.01)]


@pytest.mark.parametrize("override,match", [("init=xavier", "init"), ("channels=2", "channels"),
                                            ("static_clips=2", "static_clips"), ("warmup=-1", "warmup"),
                                            ("depth=1", "depth")])
def test_new_keys_are_validated(override, match, capsys, tmp_path):
    assert main(["--set", "model=vdncnn-feat", "--set", override, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_divergence_raises_with_the_step_and_keeps_weights_finite(tmp_path, monkeypatch):
    import training.train as train_module
    from training.train import TrainingDiverged

    original = train_module.make_batch

    def nan_at_3(config, clips, step, *args):
        inputs, target = original(config, clips, step, *args)
        return (inputs * float("nan"), target) if step == 3 else (inputs, target)

    monkeypatch.setattr(train_module, "make_batch", nan_at_3)
    for method in ("none", "srnc"):
        with pytest.raises(TrainingDiverged) as err:
            train(_config(), method, tmp_path / method, progress=False)
        assert err.value.step == 3 and "step 3" in str(err.value)
        saved = checkpoint.load_checkpoint(tmp_path / method / "checkpoint.pt")
        assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values()
                                           if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_gray_tiny_model_trains_and_evaluates(tmp_path):
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in TINY + ["model=vdncnn-feat", "depth=3", "channels=1", "sigma=20",
                                              "trf_frames=5", "trf_size=8", "trf_iters=2"]), [])
    assert main(["--preset", "smoke", *sets, "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["spectra"]["none"]) == 3 and metrics["instability"]["none"]["frames"] == 12
