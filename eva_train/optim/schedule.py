"""Learning-rate schedule: linear warmup, then cosine decay to min_lr. Computed per step by the
engine (no DeepSpeed scheduler), so a resumed run needs nothing but the step number."""

import math


def lr_at_step(step: int, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based). Warmup reaches peak_lr at step warmup_steps - 1."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_steps(
    *,
    total_steps: int,
    epochs: float,
    warmup_steps: int,
    warmup_epochs: float,
    dataset_size: int,
    global_batch_size: int,
):
    """(total_steps, warmup_steps): explicit values win, otherwise epochs x dataset / global batch."""
    steps_per_epoch = dataset_size / global_batch_size
    total = total_steps if total_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))
    warmup = warmup_steps if warmup_steps > 0 else int(round(warmup_epochs * steps_per_epoch))
    return total, min(warmup, total)


def recipe_steps(cfg, dataset_size: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) of a pretraining config (`train` and `optim` sections) on `dataset_size` samples
    per epoch: what the run, its dry run and the planner all count with."""
    return plan_steps(
        total_steps=cfg.train.total_steps,
        epochs=cfg.train.epochs,
        warmup_steps=cfg.optim.warmup_steps,
        warmup_epochs=cfg.optim.warmup_epochs,
        dataset_size=dataset_size,
        global_batch_size=cfg.train.global_batch_size,
    )
