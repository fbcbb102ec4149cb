"""Linear probe on frozen features (MAE/EVA protocol): BatchNorm without affine + linear head,
LARS or SGD. The frozen backbone stays outside the DeepSpeed engine (no optimizer state, no ZeRO
partitioning); the engine trains only the head."""

import torch
import torch.nn.functional as F

from eva_train.data.transforms import EvalTransform, normalize_images
from eva_train.eval.accuracy import topk_correct, topk_percent
from eva_train.eval.data import eval_loader, train_loader, train_transform
from eva_train.eval.features import extract_features
from eva_train.eval.heads import HEAD_INIT_STD_PROBE, Classifier, LinearHead
from eva_train.eval.optim import build_optimizer, param_groups, protocol_lr, set_lr
from eva_train.eval.protocol_config import ProtocolConfig
from eva_train.eval.protocol_inputs import FeatureSet, labeled_pair, open_backbone
from eva_train.eval.runner import run_protocol

EVAL_CHUNK_ROWS = 4096


@torch.no_grad()
def head_accuracy(
    head: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor, prefix: str = ""
) -> dict[str, float]:
    was_training = head.training
    head.eval()
    dtype = next(head.parameters()).dtype
    logits = torch.cat(
        [head(feats[i : i + EVAL_CHUNK_ROWS].to(dtype)).float() for i in range(0, len(feats), EVAL_CHUNK_ROWS)]
    )
    head.train(was_training)
    pct = topk_percent(topk_correct(logits, labels, (1, 5)), len(labels))
    return {f"{prefix}top1": pct[1], f"{prefix}top5": pct[5]}


class LinearProbeTask:
    num_blocks = 0

    def __init__(self, cfg: ProtocolConfig, rank: int, world_size: int, device, dtype):
        self.cfg, self.rank, self.world_size, self.device, self.dtype = cfg, rank, world_size, device, dtype
        backbone, self.spec = open_backbone(cfg.model)
        self.backbone = backbone.to(device, dtype).eval().requires_grad_(False)
        train, val, self.class_names = labeled_pair(cfg.data)
        img_size, workers = self.spec["img_size"], cfg.data.num_workers
        # frozen backbone + deterministic center crops: the val features never change, extract once
        self.val_feats, self.val_labels = self._features(val.with_transform(EvalTransform(img_size)))
        if cfg.data.cache_features:
            feats, labels = self._features(train.with_transform(EvalTransform(img_size)))
            train_set = FeatureSet(feats, labels)
        else:
            train_set = train.with_transform(train_transform(img_size, cfg.data.min_crop_scale))
        self._train_loader = train_loader(
            train_set,
            cfg.train.micro_batch_size,
            rank,
            world_size,
            cfg.train.seed,
            workers if not cfg.data.cache_features else 0,
        )
        self.module = LinearHead(
            self.backbone.embed_dim, len(self.class_names), batch_norm=True, init_std=HEAD_INIT_STD_PROBE
        )

    def _features(self, dataset):
        loader = eval_loader(
            dataset, self.cfg.train.micro_batch_size, self.rank, self.world_size, self.cfg.data.num_workers
        )
        return extract_features(self.backbone, loader, self.device, self.world_size, self.dtype)

    def train_loader(self):
        return self._train_loader

    def train_inputs(self, batch, device, dtype):
        labels = batch["label"].to(device)
        if "feats" in batch:
            return batch["feats"].to(device, dtype), labels
        with torch.no_grad():
            return self.backbone(normalize_images(batch["images"], dtype, device)), labels

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.aug.label_smoothing)

    def evaluate(self, head: torch.nn.Module) -> dict[str, float]:
        return head_accuracy(head, self.val_feats, self.val_labels)

    def classifiers(self, head: torch.nn.Module) -> dict[str, Classifier]:
        return {"classifier": Classifier(self.backbone, head)}


def run_linear_probe(cfg: ProtocolConfig) -> list[dict]:
    """Per-epoch history ({epoch, train_loss, lr, top1, top5, epoch_s}); writes OUT/classifier.safetensors."""
    return run_protocol(cfg, LinearProbeTask)


def fit_linear_probe(
    train_feats: torch.Tensor, train_labels: torch.Tensor, num_classes: int, cfg: ProtocolConfig
) -> LinearHead:
    """The same protocol on features already in memory, without DeepSpeed (single process, e.g. the
    demo's closing report): BN + linear head, the recipe's optimizer, schedule, batch and epochs."""
    generator = torch.Generator().manual_seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    head = LinearHead(train_feats.shape[1], num_classes, batch_norm=True, init_std=HEAD_INIT_STD_PROBE)
    opt = build_optimizer(
        param_groups(head, cfg.optim.weight_decay), cfg.optim.name, cfg.optim.momentum, cfg.optim.betas
    )
    batch = min(cfg.train.global_batch_size, len(train_labels))
    steps_per_epoch = len(train_labels) // batch
    feats, labels = train_feats.float().cpu(), train_labels.cpu()
    for epoch in range(cfg.train.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for i in range(steps_per_epoch):
            set_lr(opt, protocol_lr(cfg, epoch, i, steps_per_epoch))
            idx = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(head(feats[idx]), labels[idx], label_smoothing=cfg.aug.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()
