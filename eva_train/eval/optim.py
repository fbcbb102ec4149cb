"""Optimizers, parameter groups and the lr schedule of the linear-probe and fine-tune protocols.

The schedule is pretraining's (`eva_train.optim.schedule.lr_at_step`), stepped once per batch:
warmup_steps = round(warmup_epochs x batches per epoch), linear warmup reaching the peak at the
last warmup step (the first step already trains at peak / warmup_steps, where MAE's per-iteration
schedule starts at 0), then half-cosine to min_lr at the last batch of the last epoch.

LARS is timm's (`timm.optim.Lars`). MAE's LARS, which the EVA/MAE linear probe uses, applies weight
decay and the trust ratio to matrices only; timm decides per group (trust ratio when the group has
weight decay or `always_adapt`), so the groups here carry `always_adapt` = "holds matrices" and the
1-d groups have no weight decay (the shared rule). With weight decay 0 (the linear-probe recipes)
the update equals MAE's; with decay > 0 timm's trust-ratio denominator is ||g|| + wd ||w|| (the
LARS paper's) where MAE's is ||g + wd w||.
"""

import re

import torch
from timm.optim import Lars

from eva_train.optim.schedule import lr_at_step
from eva_train.optim.weight_decay import skips_weight_decay

LARS_TRUST_COEFFICIENT = 0.001


def protocol_lr(cfg, epoch: int, batch: int, batches_per_epoch: int) -> float:
    """LR of batch `batch` (0-based) of epoch `epoch` (0-based) for a ProtocolConfig `cfg`."""
    return lr_at_step(
        epoch * batches_per_epoch + batch,
        peak_lr=cfg.peak_lr(),
        min_lr=cfg.optim.min_lr,
        warmup_steps=round(cfg.optim.warmup_epochs * batches_per_epoch),
        total_steps=cfg.train.epochs * batches_per_epoch,
    )


def layer_id(name: str, num_blocks: int) -> int:
    """0 for the embedding, i + 1 for block i, num_blocks + 1 for everything after the blocks."""
    name = name.removeprefix("backbone.")
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else num_blocks + 1


def param_groups(
    model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0, num_blocks: int = 0
) -> list[dict]:
    """Groups by (layer, decay?, matrix?) with `lr_scale` = layer_decay ** (num_blocks + 1 - layer),
    weight decay by the shared rule, `always_adapt` (read by LARS only) for matrices. Frozen params
    are left out."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if skips_weight_decay(name, p.shape) else weight_decay
        layer = layer_id(name, num_blocks) if layer_decay != 1.0 else 0
        scale = layer_decay ** (num_blocks + 1 - layer) if layer_decay != 1.0 else 1.0
        matrix = p.ndim > 1
        group = groups.setdefault(
            (layer, decay, matrix), {"params": [], "weight_decay": decay, "lr_scale": scale, "always_adapt": matrix}
        )
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(groups: list[dict], name: str, momentum: float, betas) -> torch.optim.Optimizer:
    if name == "lars":
        return Lars(groups, lr=0.0, momentum=momentum, trust_coeff=LARS_TRUST_COEFFICIENT)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas))
    raise ValueError(f"optimizer '{name}' is unknown; use lars, sgd or adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
