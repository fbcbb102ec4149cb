"""What both protocols start from: the backbone (checkpoint or random init) and the labeled pair."""

import torch

from eva_train.eval.checkpoints import load_backbone
from eva_train.eval.data import LabeledImages, open_labeled
from eva_train.eval.protocol_config import ProtoDataConfig, ProtoModelConfig
from eva_train.models import build_backbone


def open_backbone(model_cfg: ProtoModelConfig, drop_path_rate: float = 0.0) -> tuple[torch.nn.Module, dict]:
    """(backbone, {'variant', 'img_size'}); random init is seeded by the caller's torch seed."""
    overrides = {"depth": model_cfg.depth} if model_cfg.depth else {}
    if model_cfg.random_init:
        backbone = build_backbone(
            model_cfg.variant, model_cfg.img_size or None, drop_path_rate=drop_path_rate, **overrides
        )
        return backbone, {"variant": model_cfg.variant, "img_size": backbone.img_size[0]}  # square: one int
    return load_backbone(
        model_cfg.checkpoint, model_cfg.variant, model_cfg.img_size or None, drop_path_rate, **overrides
    )


def labeled_pair(data_cfg: ProtoDataConfig) -> tuple[LabeledImages, LabeledImages, list[str]]:
    """(train, val, class names); the val labels must be the train classes."""
    train, val = open_labeled(data_cfg.train), open_labeled(data_cfg.val)
    num_classes = max(len(train.class_names), int(train.labels.max()) + 1)
    if len(val.class_names) != len(train.class_names) or int(val.labels.max()) >= num_classes:
        raise ValueError(
            f"label count mismatch: train {data_cfg.train} has {num_classes} classes but val "
            f"{data_cfg.val} has {max(len(val.class_names), int(val.labels.max()) + 1)}; "
            f"use a val set with the same classes"
        )
    if train.class_names != val.class_names:
        raise ValueError(
            f"train and val class names differ ({train.class_names[:3]}... vs "
            f"{val.class_names[:3]}...); use the same class folders in both"
        )
    return train, val, train.class_names


class FeatureSet(torch.utils.data.Dataset):
    """Precomputed features with labels, batched like images: {'feats', 'label'}."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor):
        self.feats, self.labels = feats.cpu(), labels.cpu()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"feats": self.feats[i], "label": self.labels[i]}
