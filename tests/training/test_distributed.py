"""DistributedDataParallel with 2 gloo processes on CPU equals one process on the same global batch."""
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from training import checkpoint
from training.config import make_config
from training.train import train

TINY = ["steps=3", "width=4", "crop=16", "frames=2", "batch=4", "log_every=1", "checkpoint_every=10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        train(make_config("smoke", overrides=TINY), "srnc", folder, progress=False)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # nobody tears gloo down while a peer still uses it
            dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    train(make_config("smoke", overrides=TINY), "srnc", tmp_path / "single", progress=False)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("ddp", "single")]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    ddp = checkpoint.load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"]
    single = checkpoint.load_checkpoint(tmp_path / "single" / "checkpoint.pt")["model"]
    assert ddp.keys() == single.keys()
    # Adam steps are 1e-3 per weight; summation order changes near-zero gradients' updates slightly
    for key, value in single.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(ddp[key], value, rtol=0, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_each_rank_gets_its_half_of_the_global_batch():
    from training.train import make_batch, training_clips

    config = make_config("smoke", overrides=TINY)
    clips = training_clips(config)
    full = make_batch(config, clips, 5)
    halves = [make_batch(config, clips, 5, rank, 2) for rank in range(2)]
    for part in range(2):
        torch.testing.assert_close(torch.cat([h[part] for h in halves]), full[part], rtol=0, atol=0)


def _stop_worker(rank, world, port, folder):
    """Rank 1 alone gets a SIGINT after its second optimizer step; each rank writes where it stopped."""
    import signal

    from training.stop_signals import TrainingInterrupted

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    original, calls = torch.optim.lr_scheduler.LambdaLR.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:  # the constructor steps once: this follows optimizer step 2
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    torch.optim.lr_scheduler.LambdaLR.step = step
    stopped = None
    try:
        train(make_config("smoke", overrides=TINY + ["steps=6"]), "srnc", folder, progress=False)
    except TrainingInterrupted as err:
        stopped = err.step
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    with open(os.path.join(folder, f"stopped-{rank}.json"), "w") as f:
        json.dump(stopped, f)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    folder = tmp_path / "ddp"
    folder.mkdir()
    mp.spawn(_stop_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    stopped = [json.loads((folder / f"stopped-{rank}.json").read_text()) for rank in (0, 1)]
    assert stopped[0] == stopped[1] == 2, stopped
    assert checkpoint.load_checkpoint(folder / "checkpoint.pt")["step"] == 2
