"""A tiny real DeepSpeed training run that saves/resumes through CheckpointManager.

Launched by tests/test_resume.py as N plain processes with RANK/WORLD_SIZE/MASTER_*
set (the srun path of the real entry point). Every step reads the global samples [samples_seen, samples_seen + B)
of a synthetic dataset, so the data position is explicit; dropout makes the torch RNG matter.
Rank 0 appends {"step", "loss", "first_sample"} to OUT/metrics.jsonl after every step.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn

from eva_train.config import CheckpointConfig
from eva_train.runtime.checkpoint import CheckpointManager
from eva_train.runtime.rng import capture_rng_state, restore_rng_state

GLOBAL_BATCH = 8
IN_DIM, HIDDEN_DIM, OUT_DIM = 12, 24, 5  # odd sizes: ZeRO partitions get padding


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--total_steps", type=int, default=8)
    p.add_argument("--every_steps", type=int, default=2)
    p.add_argument("--keep_last", type=int, default=2)
    p.add_argument("--keep_every", type=int, default=0)
    p.add_argument("--zero_stage", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--resume", default="auto")
    p.add_argument("--slow_save_s", type=float, default=0.0)  # widens the window a kill can hit
    return p.parse_args()


def sample_batch(first: int, rank: int, world_size: int):
    """Samples [first, first + GLOBAL_BATCH), this rank's contiguous share; sample i is a pure function of i."""
    per_rank = GLOBAL_BATCH // world_size
    xs, ys = [], []
    for i in range(first + rank * per_rank, first + (rank + 1) * per_rank):
        g = torch.Generator().manual_seed(1000 + i)
        xs.append(torch.randn(IN_DIM, generator=g))
        ys.append(torch.randn(OUT_DIM, generator=g))
    return torch.stack(xs), torch.stack(ys)


def build_engine(args, world_size: int, load_universal: bool):
    torch.manual_seed(0)  # same initial weights on every rank and every launch
    model = nn.Sequential(
        nn.Linear(IN_DIM, HIDDEN_DIM), nn.GELU(), nn.Dropout(args.dropout), nn.Linear(HIDDEN_DIM, OUT_DIM)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.05)
    ds_config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "checkpoint": {"load_universal": load_universal},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def slow_down_saves(engine, seconds: float) -> None:
    """Sleep after DeepSpeed wrote this rank's files, before the commit barrier."""
    real_save = engine.save_checkpoint

    def save(*a, **kw):
        result = real_save(*a, **kw)
        time.sleep(seconds)
        return result

    engine.save_checkpoint = save


def main():
    args = parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ckpt_cfg = CheckpointConfig(
        every_steps=args.every_steps, keep_last=args.keep_last, keep_every=args.keep_every, resume=args.resume
    )
    manager = CheckpointManager(args.out, ckpt_cfg, rank, world_size)
    resume_path = manager.find_resume(args.resume)
    engine = build_engine(args, world_size, load_universal=manager.prepare_resume(resume_path))
    if args.slow_save_s:
        slow_down_saves(engine, args.slow_save_s)
    step, samples_seen = 0, 0
    torch.manual_seed(1 + rank)  # the dropout stream, per rank
    if resume_path:
        state = manager.load(engine, resume_path)
        step, samples_seen = state["step"], state["samples_seen"]
        if state["rng"] is not None:
            restore_rng_state(state["rng"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    metrics = Path(args.out) / "metrics.jsonl"
    while step < args.total_steps:
        x, y = sample_batch(samples_seen, rank, world_size)
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        step, first_sample, samples_seen = step + 1, samples_seen, samples_seen + GLOBAL_BATCH
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(
                    json.dumps({"step": step, "loss": (mean_loss / world_size).item(), "first_sample": first_sample})
                    + "\n"
                )
        if manager.due(step) or step == args.total_steps:
            manager.save(
                engine,
                step,
                {
                    "step": step,
                    "samples_seen": samples_seen,
                    "rng": capture_rng_state(),
                    "config": vars(args),
                    "code_version": "test",
                },
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    # Interpreter teardown after DeepSpeed takes ~6 s here; everything is written and closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
