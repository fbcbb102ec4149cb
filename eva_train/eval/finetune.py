"""Full fine-tuning (MAE/BEiT/EVA protocol): layer-wise lr decay, drop-path, activation
checkpointing, RandAugment and random erasing, mixup/cutmix, label smoothing, an fp32 EMA of the
weights evaluated and saved beside the live ones; timm's RandAugment, RandomErasing, Mixup, EMA."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.utils import ModelEmaV3

from eva_train.data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, EvalTransform, normalize_images
from eva_train.eval.accuracy import topk_correct, topk_percent
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
        raise ConfigError(
            f"mixup/cutmix pair images within a batch: train.micro_batch_size={cfg.train.micro_batch_size} must be even"
        )
    return Mixup(
        mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=aug.label_smoothing, num_classes=num_classes
    )


class RandAugmentUint8:
    """timm's RandAugment (PIL ops) on our uint8 (3, H, W) tensors: the config string as timm's
    create_transform reads it (translate by 45% of the crop size, fill with the mean color)."""

    def __init__(self, config_str: str, img_size: int):
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN)}
        self.augment = rand_augment_transform(config_str, hparams)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return TF.pil_to_tensor(self.augment(TF.to_pil_image(image)))


def finetune_train_transform(cfg: ProtocolConfig, img_size: int) -> Callable:
    """RandomResizedCrop + flip (the probe's), then RandAugment when the recipe names one (timm's order)."""
    crop_flip = train_transform(img_size, cfg.data.min_crop_scale)
    if not cfg.aug.rand_augment:
        return crop_flip
    return T.Compose([crop_flip, RandAugmentUint8(cfg.aug.rand_augment, img_size)])  # picklable for workers


class FinetuneTask:
    def __init__(self, cfg: ProtocolConfig, rank: int, world_size: int, device, dtype):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        backbone, self.spec = open_backbone(cfg.model, drop_path_rate=cfg.model.drop_path_rate)
        train, val, self.class_names = labeled_pair(cfg.data)
        self.num_blocks = len(backbone.blocks)
        backbone.set_grad_checkpointing(cfg.model.checkpoint_fraction)
        self.crop_pct = cfg.data.eval_crop_pct or EVAL_CROP_PCT
        self.spec["eval_crop_pct"] = self.crop_pct  # recorded in the classifier file's metadata
        head = LinearHead(backbone.embed_dim, len(self.class_names), batch_norm=False, init_std=HEAD_INIT_STD_FINETUNE)
        self.module = Classifier(backbone, head).to(device)
        img_size, workers = self.spec["img_size"], cfg.data.num_workers
        self._train_loader = train_loader(
            train.with_transform(finetune_train_transform(cfg, img_size)),
            cfg.train.micro_batch_size,
            rank,
            world_size,
            cfg.train.seed,
            workers,
        )
        self._val_loader = eval_loader(
            val.with_transform(EvalTransform(img_size, self.crop_pct)),
            cfg.train.micro_batch_size,
            rank,
            world_size,
            workers,
        )
        self.mixup = _mixup(cfg, len(self.class_names))
        self.erasing = (
            RandomErasing(cfg.aug.random_erasing, mode="pixel", device=str(device))
            if cfg.aug.random_erasing > 0
            else None
        )
        # fp32 copy of the starting weights: a 1e-4 step of a 0.9999 EMA vanishes in bf16 rounding,
        # and the engine turns the module into bf16; under ZeRO <= 2 every rank holds the full weights
        self.ema = (
            ModelEmaV3(self.module, decay=cfg.aug.ema_decay, dtype=torch.float32) if cfg.aug.ema_decay > 0 else None
        )

    def train_loader(self):
        return self._train_loader

    def train_inputs(self, batch, device, dtype):
        images = normalize_images(batch["images"], dtype, device)
        labels = batch["label"].to(device)
        if self.erasing is not None:
            images = self.erasing(images)  # after normalization, as timm (pixel noise)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)  # labels become (B, C) soft targets
        return images, labels

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if targets.ndim == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.aug.label_smoothing)

    def after_step(self, module: torch.nn.Module) -> None:
        """Once per optimizer step (the runner calls it at accumulation boundaries)."""
        if self.ema is not None:
            self.ema.update(module)

    def extra_state(self) -> dict:
        """Saved with each epoch's checkpoint: the EMA weights (references, not copies: with 8 ranks a node
        a host copy of EVA-g's 4 GB fp32 EMA per rank would be 32 GB)."""
        return {"ema": dict(self.ema.module.state_dict())} if self.ema is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.ema is None:
            return
        if "ema" not in state:
            raise ConfigError(
                "the checkpoint to resume holds no EMA weights (saved with aug.ema_decay=0); resume "
                "with --aug.ema_decay=0 or start a new output dir"
            )
        self.ema.module.load_state_dict(state["ema"])

    def _accuracy(self, module: torch.nn.Module, prefix: str) -> dict[str, float]:
        param = next(module.parameters())
        was_training = module.training
        module.eval()
        logits, labels = extract_features(module, self._val_loader, param.device, self.world_size, param.dtype)
        module.train(was_training)
        pct = topk_percent(topk_correct(logits, labels, (1, 5)), len(labels))
        return {f"{prefix}top1": pct[1], f"{prefix}top5": pct[5]}

    def evaluate(self, module: torch.nn.Module) -> dict[str, float]:
        metrics = self._accuracy(module, "")
        if self.ema is not None:
            metrics.update(self._accuracy(self.ema.module, "ema_"))
        return metrics

    def classifiers(self, module: torch.nn.Module) -> dict[str, Classifier]:
        out = {"classifier": module}
        if self.ema is not None:
            out["classifier_ema"] = self.ema.module
        return out


def run_finetune(cfg: ProtocolConfig) -> list[dict]:
    """Per-epoch history ({epoch, train_loss, lr, top1, top5[, ema_top1, ema_top5], epoch_s});
    writes OUT/classifier.safetensors (+ classifier_ema.safetensors)."""
    return run_protocol(cfg, FinetuneTask)
