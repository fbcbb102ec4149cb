"""Weighted k-nearest-neighbour classification on features (DINO's protocol).

Cosine similarity between L2-normalised features; each of the k nearest train samples votes for
its label with weight exp(similarity / temperature). Test rows are processed in chunks so the
(test x train) similarity matrix never exists in full.
"""

import torch
import torch.nn.functional as F

from eva_train.eval.accuracy import topk_correct, topk_percent


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Class votes (num_test, num_classes) for each test feature."""
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one train feature; the kNN train set is empty")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"train features are {train_feats.shape[1]}-d but test features are "
            f"{test_feats.shape[1]}-d; extract both with the same model"
        )
    if int(train_labels.max()) >= num_classes or int(train_labels.min()) < 0:
        raise ValueError(
            f"train labels span [{int(train_labels.min())}, {int(train_labels.max())}] "
            f"but num_classes={num_classes}; labels must lie in [0, num_classes)"
        )
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)  # (Ntr, D)
    out = []
    for start in range(0, test_feats.shape[0], chunk_rows):
        test = F.normalize(test_feats[start : start + chunk_rows].float(), dim=1)  # (b, D)
        sim = test @ train.T  # (b, Ntr)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()  # (b, k)
        votes = torch.zeros(test.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # (b, C)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """`{"knn_top1": %, "knn_top5": %}` of weighted kNN on the given features."""
    scores = knn_scores(train_feats, train_labels.long(), test_feats, num_classes, k, temperature)
    pct = topk_percent(topk_correct(scores, test_labels.long(), (1, 5)), test_labels.shape[0])
    return {"knn_top1": pct[1], "knn_top5": pct[5]}
