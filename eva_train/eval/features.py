"""Feature extraction on all ranks with the same number of forwards, gathered in sample order."""

from collections.abc import Callable

import torch
import torch.distributed as dist

from eva_train.data.transforms import normalize_images


@torch.no_grad()
def extract_local(
    forward: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (features (n,D) fp32, labels (n,), valid (n,)) in its loader order."""
    feats, labels, valid = [], [], []
    for batch in loader:
        images = normalize_images(batch["images"], dtype, device)
        feats.append(forward(images).float())  # (B, D)
        labels.append(batch["label"].to(device))
        valid.append(batch["valid"].to(device))
    if not feats:
        raise ValueError("the evaluation loader gave no batches on this rank; the labeled set is empty")
    return torch.cat(feats), torch.cat(labels), torch.cat(valid)


def gather_in_order(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Undo the strided sharding of `eval_loader`: rank r held positions r, r+W, ...; returns all
    positions 0..padded_len-1 in order. Every rank gets the full tensor."""
    if world_size == 1 or not dist.is_initialized():
        return local
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous())
    stacked = torch.stack(parts, dim=1)  # (n_per_rank, W, ...)
    return stacked.reshape(-1, *local.shape[1:])  # (n_per_rank * W, ...)


def extract_features(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader,
    device: torch.device,
    world_size: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples' (features (N, D) fp32, labels (N,)) on every rank, padding removed."""
    feats, labels, valid = extract_local(forward, loader, device, dtype)
    feats = gather_in_order(feats, world_size)
    labels = gather_in_order(labels, world_size)
    valid = gather_in_order(valid.to(torch.uint8), world_size).bool()  # gloo cannot gather bool
    return feats[valid], labels[valid]
