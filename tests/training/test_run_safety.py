"""Run safety of ``python -m training.run``: interruptions at any point, locks, records never
overwritten, non-finite states never kept, everything checked before the first step.

SIGKILLs happen in a subprocess (``fault_driver.py``) at injected points of the step/save/log
sequence; SIGINTs are sent to this process at the worst moments of a step. Each case then resumes
and compares with an uninterrupted run: logs, no temporary files, and the final checkpoint bit for
bit (model and optimizer).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import checkpoint
from training.run import main

DRIVER = Path(__file__).with_name("fault_driver.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS, LOG_EVERY, CHECKPOINT_EVERY = 8, 1, 2
TINY = [f"steps={STEPS}", "width=4", "crop=16", "frames=3", "batch=2", f"log_every={LOG_EVERY}",
        f"checkpoint_every={CHECKPOINT_EVERY}", "eval_clips=1", "long_frames=12", "deterministic=true"]


def _sets(extra=()):
    return sum((["--set", s] for s in TINY + list(extra)), [])


def _train_args(out, method="srnc", extra=(), *more):
    return ["--preset", "smoke", *_sets(extra), "--no-progress", "train", "--method", method, "--out", str(out), *more]


def _states(path):
    saved = checkpoint.load_checkpoint(path)
    return saved["model"], saved["optimizer"], saved["step"]


def _assert_same_checkpoint(a, b):
    model_a, opt_a, step_a = _states(a)
    model_b, opt_b, step_b = _states(b)
    assert step_a == step_b
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        torch.testing.assert_close(model_a[key], model_b[key], rtol=0, atol=0, msg=key)
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][index][name], rtol=0, atol=0, msg=f"{index}.{name}")


def _assert_logs_complete(run, steps=STEPS):
    lines = (run / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    expected = list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    assert [r["step"] for r in records] == expected
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds"
    assert [int(row.split(",")[0]) for row in rows[1:]] == expected
    assert [float(row.split(",")[1]) for row in rows[1:]] == [r["loss"] for r in records]


def _no_temporaries(folder):
    left = [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]
    assert not left, left


@pytest.fixture(autouse=True)
def python_sigint():
    """Python's own SIGINT handler during each test, also when the test run itself was started with
    SIGINT ignored (a background job: training then keeps ignoring it, as it should)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's folder (per method)."""
    root = tmp_path_factory.mktemp("reference")
    for method in ("srnc", "none"):
        assert main(_train_args(root / method, method)) == 0
    return root


def _driver(fault, nth, args, timeout=300):
    env = dict(os.environ, SRNC_TEST_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(DRIVER), fault, str(nth), "--", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("fault,nth", [("save-partial", 2), ("before-rename", 2), ("after-rename", 2),
                                       ("log-partial", 2), ("after-log", 3)])
def test_sigkill_then_resume_equals_uninterrupted(fault, nth, tmp_path, reference):
    out = tmp_path / "out"
    done = _driver(fault, nth, _train_args(out))
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert main(_train_args(out, "srnc", (), "--resume")) == 0
    _assert_logs_complete(out / "srnc")
    _no_temporaries(out)
    _assert_same_checkpoint(out / "srnc" / "checkpoint.pt", reference / "srnc" / "srnc" / "checkpoint.pt")


def test_kill_before_the_first_checkpoint_leaves_a_fresh_start(tmp_path, reference, capsys):
    out = tmp_path / "out"
    assert _driver("before-rename", 1, _train_args(out)).returncode == -signal.SIGKILL
    assert not (out / "srnc" / "checkpoint.pt").exists() and not (out / "srnc" / "log.jsonl").exists()
    assert main(_train_args(out)) == 0  # nothing to resume: not "a run exists"
    _assert_logs_complete(out / "srnc")
    _no_temporaries(out)
    _assert_same_checkpoint(out / "srnc" / "checkpoint.pt", reference / "srnc" / "srnc" / "checkpoint.pt")
    assert main(_train_args(tmp_path / "typo", "srnc", (), "--resume")) == 2  # no such run: not a fresh one
    assert "nothing to resume" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def _in_training_step() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_train_loop":
            return True
        frame = frame.f_back
    return False


def _interrupt_at(monkeypatch, where, when, sig=signal.SIGINT):
    """Send ``sig`` to this process at the ``when``-th call of ``where`` inside the training loop
    (not while the model is built), then make the call."""
    owner, name = where
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += _in_training_step()
        if calls["n"] == when:
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _points():
    import srnc_ext.batched_refresh as refresh

    return {"after the optimizer step": (torch.optim.lr_scheduler.LambdaLR, "step"),
            "during the refresh": (refresh, "_power_iteration"),
            "inside the checkpoint write": (torch, "save")}


@pytest.mark.parametrize("point", ["after the optimizer step", "during the refresh", "inside the checkpoint write"])
def test_sigint_then_resume_is_bit_exact(point, tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, _points()[point], 3)
        assert main(_train_args(out)) == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("SIGINT received: stopped after step"), err
    saved = checkpoint.load_checkpoint(out / "srnc" / "checkpoint.pt")
    assert saved["step"] < STEPS
    _assert_logs_complete(out / "srnc", steps=saved["step"])
    assert main(_train_args(out, "srnc", (), "--resume")) == 0
    _assert_logs_complete(out / "srnc")
    _no_temporaries(out)
    _assert_same_checkpoint(out / "srnc" / "checkpoint.pt", reference / "srnc" / "srnc" / "checkpoint.pt")


def test_sigterm_stops_like_ctrl_c(tmp_path, reference, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, (torch.optim.lr_scheduler.LambdaLR, "step"), 4, signal.SIGTERM)
        assert main(_train_args(out, "none")) == 128 + signal.SIGTERM
    assert main(_train_args(out, "none", (), "--resume")) == 0
    _assert_same_checkpoint(out / "none" / "checkpoint.pt", reference / "none" / "none" / "checkpoint.pt")


def test_second_ctrl_c_inside_a_write_waits_for_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    original = torch.save

    def save_with_two_interrupts(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_with_two_interrupts)
    assert main(_train_args(out)) == 130
    saved = checkpoint.load_checkpoint(out / "srnc" / "checkpoint.pt")  # whole: the write was not cut
    assert saved["step"] == CHECKPOINT_EVERY
    _assert_logs_complete(out / "srnc", steps=CHECKPOINT_EVERY)
    _no_temporaries(out)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    from training.run_folder import claim

    out = tmp_path / "out"
    with claim(out / "srnc"):  # another process's run, as far as the lock is concerned
        assert main(_train_args(out)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "in use by another run" in err, err
        assert not (out / "srnc" / "checkpoint.pt").exists()
    with claim(out):
        assert main(["--preset", "smoke", *_sets(), "--no-progress", "--out", str(out)]) == 2
        assert "in use by another run" in capsys.readouterr().err


def test_two_processes_one_folder(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from training.run_folder import claim\n"
                               "with claim(sys.argv[1]):\n print('held', flush=True); time.sleep(120)", str(out / "srnc")],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_train_args(out)) == 2
    finally:
        holder.kill()
        holder.wait()
    assert main(_train_args(out)) == 0  # the kernel released the killed holder's lock


def test_train_into_an_existing_run_refuses(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_train_args(out, "none")) == 0
    before = {p: p.read_bytes() for p in (out / "none").iterdir() if p.is_file()}
    assert main(_train_args(out, "none")) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in (out / "none").iterdir() if p.is_file()} == before
    assert main(_train_args(out, "none", ("steps=2",), "--overwrite")) == 0
    assert _states(out / "none" / "checkpoint.pt")[2] == 2
    _assert_logs_complete(out / "none", steps=2)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A finished pipeline run (one method) and the arguments that made it."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    args = ["--preset", "smoke", *_sets(["methods=none"]), "--no-progress", "--out", str(out)]
    assert main(args) == 0
    return out, args


def test_pipeline_into_an_existing_run_refuses(pipeline_run, capsys):
    out, args = pipeline_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts} == before


def test_eval_and_friends_write_under_their_own_names(pipeline_run):
    out, _ = pipeline_run
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "config.json", "report.md")}
    ckpt = str(out / "none" / "checkpoint.pt")
    for command in ("eval", "instability", "spectra"):
        assert main(["--preset", "smoke", *_sets(), command, "--checkpoint", ckpt, "--method", "none",
                     "--out", str(out)]) == 0
        result = json.loads((out / f"{command}-none.json").read_text())
        assert result["command"] == command and command in result and result["checkpoint"] == ckpt
        # a second one would replace it: refused
        assert main(["--preset", "smoke", *_sets(), command, "--checkpoint", ckpt, "--method", "none",
                     "--out", str(out)]) == 2
    assert main(["--preset", "smoke", *_sets(["trf_frames=5", "trf_size=8", "trf_iters=2"]), "trf", "--checkpoint",
                 ckpt, "--method", "none", "--out", str(out)]) == 0
    assert (out / "trf-vresnet-feat-none.json").is_file()
    assert {name: (out / name).read_bytes() for name in before} == before


def test_refused_resume_leaves_config_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_train_args(out, "none", ("steps=2",))) == 0
    config = (out / "none" / "config.json").read_bytes()
    assert main(_train_args(out, "none", ("width=6",), "--resume")) == 2
    assert "width" in capsys.readouterr().err
    assert (out / "none" / "config.json").read_bytes() == config


def test_non_finite_weights_are_never_the_kept_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    original = torch.optim.lr_scheduler.LambdaLR.step
    calls = {"n": 0}

    def poison_after_third_update(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the LambdaLR constructor steps once: this is after optimizer step 3
            with torch.no_grad():
                self.optimizer.param_groups[0]["params"][0].fill_(float("nan"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", poison_after_third_update)
    assert main(_train_args(out, "none")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step 2) is kept" in err, err
    model, optimizer, step = _states(out / "none" / "checkpoint.pt")
    assert step == 2
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_crafted_huge_vector_checkpoint_is_refused_with_bounded_memory(tmp_path, capsys):
    import resource

    out = tmp_path / "out"
    assert main(_train_args(out, "srnc", ("steps=2",))) == 0
    path = out / "srnc" / "checkpoint.pt"
    saved = checkpoint.load_checkpoint(path)
    key = next(k for k in saved["model"] if k.endswith(".v"))
    channels = saved["model"][key].shape[1]
    saved["model"][key] = torch.zeros(1).expand(1, channels, 200_000, 200_000)  # 40 G elements, 4 bytes stored
    torch.save(saved, path)
    assert path.stat().st_size < 1_000_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(_train_args(out, "srnc", ("steps=4",), "--resume")) == 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # KiB: no huge allocation
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and key in err, err


@pytest.mark.parametrize("override", ["long_video={nowhere}", "long_video={empty}", "data={nowhere}"])
def test_bad_data_is_refused_before_training_and_leaves_no_folder(override, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    override = override.format(nowhere=tmp_path / "nowhere", empty=tmp_path / "empty")
    out = tmp_path / "run"
    start = time.perf_counter()
    assert main(["--preset", "smoke", *_sets([override]), "--no-progress", "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err, err
    assert time.perf_counter() - start < 30


def test_options_before_or_after_the_subcommand(tmp_path):
    out = tmp_path / "out"
    args = ["--preset", "smoke", *_sets(["steps=3"]), "--no-progress", "--out", str(out), "train", "--method", "none"]
    assert main(args) == 0
    assert _states(out / "none" / "checkpoint.pt")[2] == 3
    out2 = tmp_path / "out2"  # split: some before, some after
    assert main(["--set", "steps=2", "--out", str(out2), "train", "--method", "none", "--preset", "smoke",
                 *_sets(["steps=2"])]) == 0
    assert _states(out2 / "none" / "checkpoint.pt")[2] == 2


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "out"
    original = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(_train_args(out, "none")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    monkeypatch.setattr(os, "fsync", original)
    _no_temporaries(out)
    step = _states(out / "none" / "checkpoint.pt")[2]
    _assert_logs_complete(out / "none", steps=step)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path, reference):
    """The battery's long loop: kill a run at random moments, resume, until it completes; the
    result equals the uninterrupted run's."""
    rng = random.Random(0)
    out = tmp_path / "out"
    env = dict(os.environ, SRNC_TEST_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))
    args = _train_args(out)
    for attempt in range(12):
        resume = ["--resume"] if (out / "srnc" / "checkpoint.pt").exists() else []
        proc = subprocess.Popen([sys.executable, str(DRIVER), "none", "0", "--", *args, *resume], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(2.0, 6.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode == 0:
            break
    else:
        resume = ["--resume"] if (out / "srnc" / "checkpoint.pt").exists() else []
        assert main(args + resume) == 0
    _assert_logs_complete(out / "srnc")
    _no_temporaries(out)
    _assert_same_checkpoint(out / "srnc" / "checkpoint.pt", reference / "srnc" / "srnc" / "checkpoint.pt")


def test_an_ignored_sigint_stays_ignored():
    """A job started in the background (`nohup ... &`) ignores SIGINT; training must not take it over."""
    from training.stop_signals import deferred_stop

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_stop():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # still handled
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    assert main(_train_args(out, "none")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a folder" in err and str(out) in err, err
    assert out.read_text() == "not a folder"
