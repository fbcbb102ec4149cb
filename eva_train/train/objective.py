"""The masked-image-modeling objective of EVA: negative cosine similarity between the student's
predictions and the teacher's features, over masked patches only."""

import torch
import torch.nn.functional as F


def masked_cosine_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred: (M, C) predictions at masked patches in row-major order of `mask` (M = mask.sum());
    target: (B, N, C) teacher features; mask: bool (B, N). Returns -mean cos over the M patches
    (-1 = perfect). Computed in fp32: a bf16 cosine over 768-d vectors loses the loss's last digits."""
    if mask.dtype != torch.bool or mask.shape != target.shape[:2]:
        raise ValueError(f"mask must be bool {tuple(target.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    picked = target[mask]  # (M, C)
    if pred.shape != picked.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} do not match the {tuple(picked.shape)} masked targets")
    # cosine_similarity normalizes both sides: the EVA-01 target is the normalized teacher feature
    return -F.cosine_similarity(pred.float(), picked.float(), dim=-1).mean()
