"""Classification heads and the classifier that puts one on an EVA backbone."""

import torch
import torch.nn as nn

HEAD_INIT_STD_PROBE = 0.01  # MAE/EVA linear probe: trunc_normal(std=.01)
HEAD_INIT_STD_FINETUNE = 2e-5  # MAE fine-tune: tiny head init (timm's head_init_scale x .02 style)


class LinearHead(nn.Module):
    """Linear classifier, optionally after a BatchNorm without affine (MAE/EVA linear probe: the
    BN only re-standardises frozen features, so it is equivalent to a normalised linear layer)."""

    def __init__(self, in_dim: int, num_classes: int, batch_norm: bool, init_std: float):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(feats))  # (B, D) -> (B, C)


class Classifier(nn.Module):
    """Backbone pooled feature -> head. Parameter names: `backbone.*` (timm Eva names) + `head.*`."""

    def __init__(self, backbone: nn.Module, head: LinearHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images_normalized: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images_normalized))  # (B,3,H,W) -> (B, C)
