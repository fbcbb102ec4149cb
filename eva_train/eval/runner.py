"""The epoch loop shared by the linear probe and fine-tuning, under DeepSpeed (CPU or GPU).

A task (see linear_probe.py / finetune.py) supplies the trained module, its batches, loss and
evaluation; this file owns the process group, DeepSpeed engine, lr schedule, per-epoch
top-1/top-5 report, resumable checkpoints (one per epoch, via eva_train.runtime.checkpoint: tag
`step_{epoch:08d}` holds the state after that many epochs) and the final classifier file.
"""

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from eva_train.config import CheckpointConfig
from eva_train.eval.checkpoints import save_classifier
from eva_train.eval.optim import build_optimizer, param_groups, protocol_lr, set_lr
from eva_train.eval.protocol_config import ProtocolConfig, validate_protocol
from eva_train.runtime.checkpoint import CheckpointManager
from eva_train.runtime.distributed import init_process_group, world_from_env

log = logging.getLogger(__name__)


DIST_TIMEOUT_S = 1800  # a feature-extraction pass over a large val set may hold ranks apart for minutes


def setup_distributed():
    """(rank, world_size, device) through the training side's set-up (launcher or SLURM variables;
    a plain `python tools/x.py` becomes a 1-rank group)."""
    world = world_from_env()
    device = init_process_group(world, DIST_TIMEOUT_S) if not dist.is_initialized() else None
    if device is None:
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deepspeed_config(cfg: ProtocolConfig, grad_accum_steps: int, world_size: int) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.micro_batch_size * grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # LARS / torch optimizers under ZeRO 1-2
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
    }


class EpochLogger:
    """Rank 0: one line per epoch on stdout and one JSON object in OUT/metrics.jsonl (appended)."""

    def __init__(self, output_dir: str, rank: int):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.rank = rank

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)


def _train_one_epoch(engine, task, cfg: ProtocolConfig, epoch: int, device, dtype) -> dict[str, float]:
    loader = task.train_loader()
    loader.sampler.set_epoch(epoch)
    num_batches, loss_sum, lr = len(loader), torch.zeros((), device=device), 0.0
    for i, batch in enumerate(loader):
        lr = protocol_lr(cfg, epoch, i, num_batches)
        set_lr(engine.optimizer, lr)
        inputs, targets = task.train_inputs(batch, device, dtype)
        loss = task.loss(engine(inputs), targets)
        engine.backward(loss)
        engine.step()
        if engine.is_gradient_accumulation_boundary() and hasattr(task, "after_step"):
            task.after_step(engine.module)
        loss_sum += loss.detach().float()
    return {"train_loss": float(loss_sum) / max(num_batches, 1), "lr": lr}


def _resume(ckpt, engine, cfg: ProtocolConfig, task):
    path = ckpt.find_resume(cfg.train.resume)
    if path is None:
        return 0, []
    state = ckpt.load(engine, path)
    if hasattr(task, "load_extra_state"):  # e.g. the fine-tune EMA, which lives outside the engine
        task.load_extra_state(state)
    log.info("resumed from %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state["history"])


def run_protocol(cfg: ProtocolConfig, make_task) -> list[dict]:
    """Train `make_task(cfg, rank, world_size, device, dtype)`'s module; per-epoch history."""
    import deepspeed  # 2.3 s to import (measured): the tools' exit-2 config checks run before it

    rank, world_size, device = setup_distributed()
    grad_accum = validate_protocol(cfg, world_size)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    seed_everything(cfg.train.seed)
    task = make_task(cfg, rank, world_size, device, dtype)
    groups = param_groups(task.module, cfg.optim.weight_decay, cfg.optim.layer_decay, task.num_blocks)
    optimizer = build_optimizer(groups, cfg.optim.name, cfg.optim.momentum, cfg.optim.betas)
    engine, *_ = deepspeed.initialize(
        model=task.module, optimizer=optimizer, config=deepspeed_config(cfg, grad_accum, world_size)
    )
    ckpt = CheckpointManager(
        cfg.train.output_dir, CheckpointConfig(keep_last=1, resume=cfg.train.resume), rank, world_size
    )
    start_epoch, history = _resume(ckpt, engine, cfg, task)
    logger = EpochLogger(cfg.train.output_dir, rank)
    for epoch in range(start_epoch, cfg.train.epochs):
        started = time.time()
        engine.train()
        record = {"epoch": epoch + 1, **_train_one_epoch(engine, task, cfg, epoch, device, dtype)}
        record.update(task.evaluate(engine.module))
        record["epoch_s"] = round(time.time() - started, 2)
        history.append(record)
        logger.log(record)
        extra = task.extra_state() if hasattr(task, "extra_state") else {}
        ckpt.save(engine, epoch + 1, {"epoch": epoch + 1, "history": history, "config": cfg.to_dict(), **extra})
    _save_final(engine, task, cfg, rank)
    return history


def _save_final(engine, task, cfg: ProtocolConfig, rank: int) -> None:
    """Gather (ZeRO-3) and write OUT/classifier.safetensors on rank 0 (+ classifier_ema with EMA)."""
    import deepspeed  # see run_protocol

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.train.zero_stage == 3):
        if rank == 0:
            for name, classifier in task.classifiers(engine.module).items():
                path = os.path.join(cfg.train.output_dir, f"{name}.safetensors")
                save_classifier(path, classifier, task.spec, task.class_names, cfg.train.protocol)
    if dist.is_initialized():
        dist.barrier()
