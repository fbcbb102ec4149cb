"""Optimizers, parameter groups and the lr schedule of the linear-probe and fine-tune protocols."""
import math
import re
from typing import Dict, List

import torch

from eva_train.eval.lars import LARS

NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


def lr_at(epoch: float, peak_lr: float, min_lr: float, warmup_epochs: float, total_epochs: float) -> float:
    """Linear warmup then half-cosine to min_lr (MAE's per-iteration schedule); epoch is fractional."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(total_epochs - warmup_epochs, 1e-8)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def layer_id(name: str, num_blocks: int) -> int:
    """0 for the embedding, i + 1 for block i, num_blocks + 1 for everything after the blocks."""
    name = name.removeprefix("backbone.")
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else num_blocks + 1


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 num_blocks: int = 0) -> List[Dict]:
    """Groups by (layer, decay?) with `lr_scale` = layer_decay ** (num_blocks + 1 - layer); no weight
    decay for 1-d tensors (biases, norms) and tokens/position tables. Frozen params are left out."""
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim <= 1 or name.endswith(NO_DECAY_NAMES) else weight_decay
        layer = layer_id(name, num_blocks) if layer_decay != 1.0 else 0
        scale = layer_decay ** (num_blocks + 1 - layer) if layer_decay != 1.0 else 1.0
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(groups: List[Dict], name: str, momentum: float, betas) -> torch.optim.Optimizer:
    if name == "lars":
        return LARS(groups, lr=0.0, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas))
    raise ValueError(f"optimizer '{name}' is unknown; use lars, sgd or adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
