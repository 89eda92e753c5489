"""Training: backpropagation through time over T frames, Adam, schedule, clipping, logs,
atomic checkpoints and exact resume.

Batches are a pure function of ``(seed, step)`` (clip indices and noise), and the rest of the
state (model incl. SRN-C vectors, Adam, scheduler) is in the checkpoint, so a resumed run's
losses equal an uninterrupted run's on CPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from .checkpoint import check_against, load_checkpoint, save_checkpoint
from .config import Config
from .constraints import apply_constraint
from .data import SyntheticClips, Vimeo90kSeptuplets, make_pair
from .models import build_model
from .run_folder import claim, refuse_existing, remove_stale_temporaries
from .step_log import LOG_FILES, StepLog, records_from_files
from .stop_signals import TrainingInterrupted, deferred_stop

# config keys a checkpoint must agree on to be resumed or evaluated
ARCH_KEYS = ("model", "task", "width", "alpha", "beta", "variant", "crop", "depth", "channels")
_CLIP_POOL = 4096  # synthetic training clips cycled through


def build(config: Config, method: str) -> torch.nn.Module:
    """The model of ``config`` with constraint ``method`` applied (on ``config.device``)."""
    model = build_model(config.model, task=config.task, width=config.width, dampening=config.dampening,
                        depth=config.depth, channels=config.channels, init=config.init)
    size = config.input_size
    params = {}
    if method == "srnc":
        params = dict(alpha=config.alpha, beta=config.beta, variant=config.variant,
                      n_power_iterations=config.n_power_iterations, input_size=size)
    elif method in ("sn", "srn"):
        params = dict(alpha=config.alpha) if method == "sn" else dict(alpha=config.alpha, beta=config.beta)
    return apply_constraint(model, method, **params).to(config.device)


def training_clips(config: Config):
    """The training clip dataset: embedded synthetic clips, or Vimeo-90k (validated up front)."""
    if config.data == "synthetic":
        return SyntheticClips(_CLIP_POOL, frames=config.frames, size=config.crop, seed=config.seed,
                              channels=config.channels, static_prob=config.static_clips)
    if config.channels != 3 or config.static_clips:
        raise ValueError(f"channels={config.channels} and static_clips={config.static_clips} are for the synthetic "
                         "data; Vimeo-90k is read as RGB clips (channels=3, static_clips=0)")
    return Vimeo90kSeptuplets(config.data, split="train", crop=config.crop, list_file=config.list_file,
                              frames=config.frames, seed=config.seed)


def make_batch(config: Config, clips, step: int, rank: int = 0, world: int = 1):
    """``(input, target)`` for ``step``: ``(B, T, C, h, w)``, ``(B, T, C, H, W)``; deterministic in step.

    ``config.batch`` is the global batch; with ``world`` processes, rank ``r`` gets rows
    ``r*B/world .. (r+1)*B/world`` of it (the same rows a single process would use).
    """
    index = [(step * config.batch + i) % len(clips) for i in range(config.batch)]
    if hasattr(clips, "set_epoch"):  # Vimeo-90k: new random crops each pass over the data
        clips.set_epoch(step * config.batch // len(clips))
    clean = torch.stack([clips[i] for i in index])
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    degraded, target = make_pair(clean, config.task, config.sigma / 255.0, gen)
    rows = slice(rank * config.batch // world, (rank + 1) * config.batch // world)
    return degraded[rows].to(config.device), target[rows].to(config.device)


def distributed_context(config: Config):
    """``(rank, world)``; under ``torchrun`` (``WORLD_SIZE`` > 1) joins the process group
    (gloo on CPU, nccl on CUDA) and pins each rank to its GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
    if config.batch % world:
        raise ValueError(f"batch={config.batch} must be divisible by the number of processes ({world})")
    if config.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        config.device = f"cuda:{local}"
    return dist.get_rank(), world


def lr_factor(config: Config, step: int) -> float:
    """The learning rate of ``step`` over ``config.lr``: the schedule times a linear warm-up over
    the first ``config.warmup`` steps."""
    warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
    if config.schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / max(config.steps, 1)))
    if config.schedule == "step":
        return warm * 0.1 ** sum(step >= m for m in (config.steps // 2, 3 * config.steps // 4))
    return warm


def _scheduler(opt, config: Config):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(config, s))


class TrainingDiverged(FloatingPointError):
    """Training diverged at optimizer step ``step`` (0-based): the loss became non-finite (no update
    is applied then), or the update made a weight non-finite. Only finite states are ever written:
    ``kept`` is the step of the checkpoint left on disk (None: none was written)."""

    def __init__(self, step: int, loss: float, kept: Optional[int] = None):
        what = f"loss became {loss}" if not math.isfinite(loss) else f"the update made a weight non-finite (loss {loss})"
        where = (f"the last finite checkpoint (step {kept}) is kept" if kept is not None
                 else "no checkpoint was written (it would not be finite)")
        super().__init__(f"{what} at step {step}; {where}")
        self.step, self.loss, self.kept = step, loss, kept


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def _finite_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> bool:
    """Every floating-point tensor of the model's state and the optimizer's state is finite."""
    return _all_finite(model.state_dict().values()) and all(_all_finite(s.values()) for s in opt.state.values())


def check_compatible(saved: Dict, config: Config, method: str, path) -> None:
    """Raise ``ValueError`` saying which key differs between a checkpoint and the config."""
    if saved.get("method") != method:
        raise ValueError(f"checkpoint {path} was trained with method={saved.get('method')!r}, not {method!r}")
    for key in ARCH_KEYS:  # a key missing from an older checkpoint had its default value
        there = saved["config"].get(key, Config.__dataclass_fields__[key].default)
        if there != getattr(config, key):
            raise ValueError(f"checkpoint {path} is incompatible: {key}={there!r} there, "
                             f"{getattr(config, key)!r} in this config")


def _progress(step: int, total: int, loss: float, start: float, first: int) -> None:
    done = step - first
    rate = (time.perf_counter() - start) / max(done, 1)
    eta = rate * (total - step)
    if sys.stderr.isatty():
        bar = "#" * int(30 * step / max(total, 1))
        sys.stderr.write(f"\r  [{bar:<30}] {step}/{total} loss {loss:.5f} eta {eta:5.0f}s")
        if step == total:
            sys.stderr.write("\n")
    elif step % max(1, total // 10) == 0 or step == total:  # a log file: a line every 10 %
        sys.stderr.write(f"  step {step}/{total} loss {loss:.5f} eta {eta:.0f}s\n")
    sys.stderr.flush()


def train(config: Config, method: str, folder, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, stop_after: Optional[int] = None, on_start: Optional[Callable[[], None]] = None) -> Dict:
    """Train one model; checkpoints and logs go to ``folder``. Returns a summary dict.

    The folder is locked for the run (a second run on it raises ``RunFolderBusy``). A folder that
    already holds a run is refused (``RunExists``) unless ``resume`` (continue from its checkpoint)
    or ``overwrite`` (start over). Everything is checked (data, checkpoint, compatibility) before
    ``on_start()`` is called and the first step runs; a refused run leaves no folder it created.
    Checkpoints are written only between steps and only when finite; the logs follow them (see
    ``training.step_log``). The first Ctrl-C or SIGTERM finishes the step, saves and raises
    ``TrainingInterrupted``. ``stop_after``: stop (with a checkpoint) after that many steps of this
    call, as an interruption would (used by tests of exact resume).
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or start it over")
    folder = Path(folder)
    rank, world = distributed_context(config)
    main_rank = rank == 0
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    clips = training_clips(config)  # validates a dataset before anything else
    model = build(config, method)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = _scheduler(opt, config)
    ckpt_path = folder / "checkpoint.pt"
    run_started_here = folder.is_dir()  # by an earlier command (a run killed before its first checkpoint)
    with (claim(folder) if main_rank else contextlib.nullcontext()) as run:
        first, records = 0, []
        if main_rank:
            remove_stale_temporaries(folder)  # left by a writer that was killed
        if resume and not ckpt_path.is_file():
            if not run_started_here:  # a mistyped folder: say so rather than start a run elsewhere
                raise FileNotFoundError(f"nothing to resume: {ckpt_path} does not exist")
            print(f"nothing to resume in {folder} (stopped before its first checkpoint): starting at step 0",
                  file=sys.stderr)
            resume = False
        if resume:
            saved = load_checkpoint(ckpt_path, map_location=config.device)
            check_compatible(saved, config, method, ckpt_path)
            check_against(saved, model, opt, ckpt_path)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            first = saved["step"]
            # checkpoints of srnc_ext <= 0.2 did not carry their log: take the files' lines up to the step
            records = saved["log"] if "log" in saved else records_from_files(folder, first)
        elif main_rank:
            existing = [folder / name for name in ("checkpoint.pt", *LOG_FILES) if (folder / name).exists()]
            if existing and not overwrite:
                refuse_existing(existing, "a training run", "pass --resume to continue it or --overwrite to start over")
            for path in existing:
                path.unlink()
            shutil.rmtree(folder / "tensorboard", ignore_errors=True)
        if on_start is not None and main_rank:
            on_start()
        if run is not None:
            run.started()
        log = StepLog(folder, records, write=main_rank, resume=resume)
        try:
            return _train_loop(config, method, model, opt, sched, clips, log, ckpt_path, rank, world, first,
                               resume, progress, stop_after)
        finally:
            log.close()


def _train_loop(config, method, model, opt, sched, clips, log, ckpt_path, rank, world, first, resume, progress,
                stop_after) -> Dict:
    main_rank = rank == 0
    net = model
    if world > 1:  # gradients are averaged over ranks: the global-batch mean, as one process
        import srnc_ext

        net = torch.nn.parallel.DistributedDataParallel(model)
        # DDP broadcast rank 0's weights and SRN-C buffers in place: still fresh for each other
        srnc_ext.mark_fresh(model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if config.amp and config.device.startswith("cuda")
                else contextlib.nullcontext())
    saved_at = first if resume else None
    loss_value = float("nan")

    def snapshot(step: int, stops) -> None:
        """Checkpoint, then the log lines it holds; never a non-finite state."""
        nonlocal saved_at
        if not main_rank or saved_at == step:
            return
        if not _finite_state(model, opt):
            raise TrainingDiverged(step - 1, loss_value, kept=saved_at)
        with stops.critical():
            try:
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                            "scheduler": sched.state_dict(), "step": step, "method": method,
                                            "config": config.to_dict(), "log": log.records})
                saved_at = step
                log.flush()
            except OSError as err:  # a full or read-only disk: say what was being written and what is kept
                kept = f"the checkpoint of step {saved_at} is kept" if saved_at is not None else "no checkpoint was kept"
                raise OSError(err.errno, f"{err.strerror or err} while writing the checkpoint of step {step} "
                                         f"in {ckpt_path.parent} ({kept})") from None

    model.train()
    start, done = time.perf_counter(), first
    last = config.steps if stop_after is None else min(config.steps, first + stop_after)
    with deferred_stop() as stops:
        between_steps = True  # the state is the one after step `done`: it may be saved
        stopped = False  # on a signal to this process or, under torchrun, to any rank
        try:
            for step in range(first, last):
                inputs, target = make_batch(config, clips, step, rank, world)
                between_steps = False
                with autocast:
                    loss = (net(inputs).float() - target).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:  # log the global-batch loss, as a single process would
                    loss = loss.detach().clone()
                    torch.distributed.all_reduce(loss)
                    loss /= world
                loss_value = loss.item()
                if not math.isfinite(loss_value):  # before the update: the weights stay finite
                    raise TrainingDiverged(step, loss_value, kept=saved_at)
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                try:
                    opt.step()  # SRN-C layers refresh in its post-hook
                except ValueError:  # an SRN-C refresh refuses non-finite weights (a finite loss, inf gradients)
                    if _all_finite(model.parameters()):
                        raise
                    raise TrainingDiverged(step, loss_value, kept=saved_at) from None
                sched.step()
                done = step + 1
                between_steps = True
                if main_rank and (done % config.log_every == 0 or done == last):
                    log.add(done, loss_value, sched.get_last_lr()[0], time.perf_counter() - start)
                if done % config.checkpoint_every == 0:
                    snapshot(done, stops)
                if progress and main_rank:
                    _progress(done, config.steps, loss_value, start, first)
                if _stop_agreed(stops, world, config.device):
                    stopped = True
                    break
            snapshot(done, stops)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # raised by code or a second Ctrl-C: save only a consistent state
            if between_steps:
                snapshot(done, stops)
            raise
        if stopped and done < config.steps:
            raise TrainingInterrupted(done, stops.signum or signal.SIGINT, ckpt_path)
    return {"method": method, "steps": done, "last_loss": loss_value, "seconds": time.perf_counter() - start,
            "checkpoint": str(ckpt_path)}


def _stop_agreed(stops, world: int, device: str) -> bool:
    """Whether to stop after this step; under torchrun every rank stops at the same step (the flag
    on the training device: NCCL reduces CUDA tensors only)."""
    if world == 1:
        return stops.requested
    flag = torch.tensor([float(stops.requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def load_trained(config: Config, method: str, path) -> torch.nn.Module:
    """A model rebuilt from a checkpoint of ``train`` (weights_only load, compatibility checked)."""
    saved = load_checkpoint(path, map_location=config.device)
    check_compatible(saved, config, method, path)
    model = build(config, method)
    check_against(saved, model, None, path)  # shapes and sizes before anything is allocated
    model.load_state_dict(saved["model"])
    return model.eval()
