"""Training: backpropagation through time over T frames, Adam, schedule, clipping, logs,
atomic checkpoints and exact resume.

Batches are a pure function of ``(seed, step)`` (clip indices and noise), and the rest of the
state (model incl. SRN-C vectors, Adam, scheduler) is in the checkpoint, so a resumed run's
losses equal an uninterrupted run's on CPU.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .constraints import apply_constraint
from .data import SyntheticClips, Vimeo90kSeptuplets, make_pair
from .models import build_model

# config keys a checkpoint must agree on to be resumed or evaluated
ARCH_KEYS = ("model", "task", "width", "alpha", "beta", "variant", "crop", "depth", "channels")
_CLIP_POOL = 4096  # synthetic training clips cycled through


def build(config: Config, method: str) -> torch.nn.Module:
    """The model of ``config`` with constraint ``method`` applied (on ``config.device``)."""
    model = build_model(config.model, task=config.task, width=config.width, dampening=config.dampening,
                        depth=config.depth, channels=config.channels, init=config.init)
    size = config.crop // 2 if config.task == "sr2" else config.crop
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
    is applied then), or the update made a weight non-finite. The last checkpoint is kept."""

    def __init__(self, step: int, loss: float):
        what = f"loss became {loss}" if not math.isfinite(loss) else f"the update made a weight non-finite (loss {loss})"
        super().__init__(f"{what} at step {step}; the last checkpoint is kept")
        self.step, self.loss = step, loss


def check_compatible(saved: Dict, config: Config, method: str, path) -> None:
    """Raise ``ValueError`` saying which key differs between a checkpoint and the config."""
    if saved.get("method") != method:
        raise ValueError(f"checkpoint {path} was trained with method={saved.get('method')!r}, not {method!r}")
    for key in ARCH_KEYS:  # a key missing from an older checkpoint had its default value
        there = saved["config"].get(key, Config.__dataclass_fields__[key].default)
        if there != getattr(config, key):
            raise ValueError(f"checkpoint {path} is incompatible: {key}={there!r} there, "
                             f"{getattr(config, key)!r} in this config")


class _Logger:
    """JSONL + CSV (+ TensorBoard when installed) step logs, appended on resume."""

    def __init__(self, folder: Path, resume: bool):
        folder.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        self.jsonl = open(folder / "log.jsonl", mode)
        self.csv_file = open(folder / "log.csv", mode, newline="")
        self.csv = csv.writer(self.csv_file)
        if not resume:
            self.csv.writerow(["step", "loss", "lr", "seconds"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tensorboard"))
        except Exception:  # tensorboard not installed: logs stay JSONL/CSV
            self.tb = None

    def log(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.jsonl.write(json.dumps({"step": step, "loss": loss, "lr": lr, "seconds": seconds}) + "\n")
        self.csv.writerow([step, loss, lr, round(seconds, 3)])
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("lr", lr, step)

    def close(self) -> None:
        self.jsonl.close()
        self.csv_file.close()
        if self.tb is not None:
            self.tb.close()


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


def train(config: Config, method: str, folder, *, resume: bool = False, progress: bool = True,
          stop_after: Optional[int] = None) -> Dict:
    """Train one model; checkpoints and logs go to ``folder``. Returns a summary dict.

    ``stop_after``: stop (with a checkpoint) after that many steps of this call, as an
    interruption would (used by tests of exact resume).
    """
    folder = Path(folder)
    rank, world = distributed_context(config)
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    clips = training_clips(config)  # validates a dataset before anything else
    model = build(config, method)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = _scheduler(opt, config)
    ckpt_path = folder / "checkpoint.pt"
    first = 0
    if resume:
        saved = load_checkpoint(ckpt_path, map_location=config.device)
        check_compatible(saved, config, method, ckpt_path)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        first = saved["step"]
    net = model
    if world > 1:  # gradients are averaged over ranks: the global-batch mean, as one process
        import srnc_ext

        net = torch.nn.parallel.DistributedDataParallel(model)
        # DDP broadcast rank 0's weights and SRN-C buffers in place: still fresh for each other
        srnc_ext.mark_fresh(model)
    main_rank = rank == 0
    logger = _Logger(folder, resume) if main_rank else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if config.amp and config.device.startswith("cuda")
                else contextlib.nullcontext())

    def snapshot(step):
        if not main_rank:
            return
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "step": step, "method": method,
                                    "config": config.to_dict()})

    model.train()
    start, done, loss_value = time.perf_counter(), first, float("nan")
    last = config.steps if stop_after is None else min(config.steps, first + stop_after)
    try:
        for step in range(first, last):
            inputs, target = make_batch(config, clips, step, rank, world)
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
                raise TrainingDiverged(step, loss_value)
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            try:
                opt.step()
            except ValueError:  # an SRN-C refresh refuses non-finite weights (a finite loss, inf gradients)
                if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    raise
                raise TrainingDiverged(step, loss_value) from None
            sched.step()
            done = step + 1
            if main_rank and ((step + 1) % config.log_every == 0 or step + 1 == last):
                logger.log(step + 1, loss_value, sched.get_last_lr()[0], time.perf_counter() - start)
            if (step + 1) % config.checkpoint_every == 0:
                snapshot(step + 1)
            if progress and main_rank:
                _progress(step + 1, config.steps, loss_value, start, first)
    except KeyboardInterrupt:
        snapshot(done)  # completed steps only: resume repeats the interrupted one
        if logger:
            logger.close()
        raise
    except TrainingDiverged:
        if logger:
            logger.close()
        raise
    snapshot(done)
    if logger:
        logger.close()
    return {"method": method, "steps": done, "last_loss": loss_value, "seconds": time.perf_counter() - start,
            "checkpoint": str(ckpt_path)}


def load_trained(config: Config, method: str, path) -> torch.nn.Module:
    """A model rebuilt from a checkpoint of ``train`` (weights_only load, compatibility checked)."""
    saved = load_checkpoint(path, map_location=config.device)
    check_compatible(saved, config, method, path)
    model = build(config, method)
    model.load_state_dict(saved["model"])
    return model.eval()
