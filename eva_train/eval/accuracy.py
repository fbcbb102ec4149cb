"""Top-k accuracy from class scores."""

from collections.abc import Sequence

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the k highest scores, for each k.

    scores: (B, C), labels: (B,). k larger than C counts every row (the label is always among C).
    """
    max_k = min(max(ks), scores.shape[1])
    top = scores.topk(max_k, dim=1).indices  # (B, max_k)
    hit = top.eq(labels.view(-1, 1))  # (B, max_k)
    return {k: int(hit[:, : min(k, max_k)].any(dim=1).sum()) for k in ks}


def topk_percent(correct: dict[int, int], total: int) -> dict[int, float]:
    return {k: 100.0 * c / max(total, 1) for k, c in correct.items()}
