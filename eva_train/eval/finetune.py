"""Full fine-tuning (MAE/BEiT protocol): layer-wise lr decay, drop-path, mixup/cutmix, label
smoothing, optional EMA of the weights; timm's Mixup and soft-target loss."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import ModelEmaV3

from eva_train.eval.accuracy import topk_correct, topk_percent
from eva_train.data.transforms import EvalTransform, normalize_images
from eva_train.eval.data import eval_loader, train_loader, train_transform
from eva_train.eval.features import extract_features
from eva_train.eval.heads import HEAD_INIT_STD_FINETUNE, Classifier, LinearHead
from eva_train.eval.protocol_config import ConfigError, ProtocolConfig
from eva_train.eval.protocol_inputs import labeled_pair, open_backbone
from eva_train.eval.runner import run_protocol


def _mixup(cfg: ProtocolConfig, num_classes: int):
    aug = cfg.aug
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    if cfg.train.micro_batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair images within a batch: train.micro_batch_size="
                          f"{cfg.train.micro_batch_size} must be even")
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=aug.label_smoothing,
                 num_classes=num_classes)


class FinetuneTask:
    def __init__(self, cfg: ProtocolConfig, rank: int, world_size: int, device, dtype):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        backbone, self.spec = open_backbone(cfg.model, drop_path_rate=cfg.model.drop_path_rate)
        train, val, self.class_names = labeled_pair(cfg.data)
        self.num_blocks = len(backbone.blocks)
        head = LinearHead(backbone.embed_dim, len(self.class_names), batch_norm=False, init_std=HEAD_INIT_STD_FINETUNE)
        self.module = Classifier(backbone, head).to(device)
        img_size, workers = self.spec["img_size"], cfg.data.num_workers
        self._train_loader = train_loader(train.with_transform(train_transform(img_size, cfg.data.min_crop_scale)),
                                          cfg.train.micro_batch_size, rank, world_size, cfg.train.seed, workers)
        self._val_loader = eval_loader(val.with_transform(EvalTransform(img_size)), cfg.train.micro_batch_size,
                                       rank, world_size, workers)
        self.mixup = _mixup(cfg, len(self.class_names))
        self.ema = None

    def train_loader(self):
        return self._train_loader

    def train_inputs(self, batch, device, dtype):
        images = normalize_images(batch["images"], dtype, device)
        labels = batch["label"].to(device)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)      # labels become (B, C) soft targets
        return images, labels

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if targets.ndim == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.aug.label_smoothing)

    def after_step(self, module: torch.nn.Module) -> None:
        if self.cfg.aug.ema_decay <= 0:
            return
        if self.ema is None:
            self.ema = ModelEmaV3(module, decay=self.cfg.aug.ema_decay)
        self.ema.update(module)

    def _accuracy(self, module: torch.nn.Module, prefix: str) -> Dict[str, float]:
        param = next(module.parameters())
        was_training = module.training
        module.eval()
        logits, labels = extract_features(module, self._val_loader, param.device, self.world_size, param.dtype)
        module.train(was_training)
        pct = topk_percent(topk_correct(logits, labels, (1, 5)), len(labels))
        return {f"{prefix}top1": pct[1], f"{prefix}top5": pct[5]}

    def evaluate(self, module: torch.nn.Module) -> Dict[str, float]:
        metrics = self._accuracy(module, "")
        if self.ema is not None:
            metrics.update(self._accuracy(self.ema.module, "ema_"))
        return metrics

    def classifiers(self, module: torch.nn.Module) -> Dict[str, Classifier]:
        out = {"classifier": module}
        if self.ema is not None:
            out["classifier_ema"] = self.ema.module
        return out


def run_finetune(cfg: ProtocolConfig) -> List[Dict]:
    """Per-epoch history ({epoch, train_loss, lr, top1, top5[, ema_top1, ema_top5], epoch_s});
    writes OUT/classifier.safetensors (+ classifier_ema.safetensors)."""
    return run_protocol(cfg, FinetuneTask)
