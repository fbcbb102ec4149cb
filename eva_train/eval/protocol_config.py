"""Typed configuration of the two benchmark protocols (linear probe, fine-tune).

Defaults <- recipe (TOML in `eva_train/eval/recipes/`, or a path) <- `--section.key=value`
overrides, the same mechanics as the pretraining config; validated once before anything is built.
"""

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eva_train.config import ConfigError, fill_config

RECIPE_DIR = Path(__file__).parent / "recipes"
PROTOCOLS = ("linear", "finetune")
OPTIMIZERS = ("lars", "sgd", "adamw")


@dataclass
class ProtoModelConfig:
    checkpoint: str = ""  # safetensors backbone (consolidated); "" only with random_init
    variant: str = ""  # "" = from the checkpoint's metadata
    img_size: int = 0  # 0 = the checkpoint's / variant's default
    random_init: bool = False  # baseline: a randomly initialised backbone of the same variant
    drop_path_rate: float = 0.1  # fine-tune only
    checkpoint_fraction: float = 0.0  # fine-tune: activation checkpointing of this fraction of the blocks
    depth: int = 0  # 0 = the variant's; fewer blocks for a quick smoke run of a big recipe


@dataclass
class ProtoDataConfig:
    train: list[str] = field(default_factory=list)  # image folder (ROOT/CLASS/*) or labeled index files
    val: list[str] = field(default_factory=list)
    num_workers: int = 4
    min_crop_scale: float = 0.08  # RandomResizedCrop scale (min, 1) for training
    cache_features: bool = False  # linear only: extract frozen features once (center crops), train on them
    eval_crop_pct: float = 0.0  # fine-tune eval: EvalTransform's crop fraction (0 = its default 0.875; 1 = no crop)


@dataclass
class ProtoOptimConfig:
    name: str = "lars"  # lars, sgd or adamw
    blr: float = 0.1  # base lr per 256 images: lr = blr * global_batch_size / 256
    lr: float = 0.0  # absolute lr; overrides blr when > 0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9  # lars / sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    warmup_epochs: float = 10.0
    layer_decay: float = 1.0  # fine-tune: lr scale decay per block from the head down (1 = off)
    grad_clip: float = 0.0  # 0 = off


@dataclass
class ProtoTrainConfig:
    protocol: str = "linear"  # linear or finetune
    epochs: int = 100
    global_batch_size: int = 16384
    micro_batch_size: int = 256
    precision: str = "bf16"  # bf16 or fp32 (fp32 on CPU)
    zero_stage: int = 0  # DeepSpeed ZeRO stage of the trained module (0-3; LARS needs 0)
    seed: int = 0
    output_dir: str = "outputs/eval"
    resume: str = "auto"  # auto, none or a checkpoint path


@dataclass
class ProtoAugConfig:
    mixup: float = 0.0  # fine-tune: mixup alpha (0 = off)
    cutmix: float = 0.0  # fine-tune: cutmix alpha (0 = off)
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # fine-tune: EMA of weights, evaluated too (0 = off; ZeRO stage <= 2)
    rand_augment: str = ""  # fine-tune: timm RandAugment config string, e.g. rand-m9-mstd0.5-inc1 ("" = off)
    random_erasing: float = 0.0  # fine-tune: timm RandomErasing probability per image (pixel mode; 0 = off)


@dataclass
class ProtocolConfig:
    model: ProtoModelConfig = field(default_factory=ProtoModelConfig)
    data: ProtoDataConfig = field(default_factory=ProtoDataConfig)
    optim: ProtoOptimConfig = field(default_factory=ProtoOptimConfig)
    train: ProtoTrainConfig = field(default_factory=ProtoTrainConfig)
    aug: ProtoAugConfig = field(default_factory=ProtoAugConfig)
    recipe: str = ""

    def to_dict(self):
        return dataclasses.asdict(self)

    def peak_lr(self) -> float:
        return self.optim.lr if self.optim.lr > 0 else self.optim.blr * self.train.global_batch_size / 256


def build_protocol_config(recipe: str, overrides: Sequence[str] = ()) -> ProtocolConfig:
    return fill_config(ProtocolConfig(), recipe, RECIPE_DIR, overrides)


def validate_protocol(cfg: ProtocolConfig, world_size: int) -> int:
    """Cheap checks; returns the gradient accumulation steps."""
    t, o, m = cfg.train, cfg.optim, cfg.model
    if t.protocol not in PROTOCOLS:
        raise ConfigError(f"train.protocol '{t.protocol}' is unknown; use linear or finetune")
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name '{o.name}' is unknown; use {', '.join(OPTIMIZERS)}")
    if t.precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision '{t.precision}' is unknown; use bf16 or fp32")
    if not 0 <= t.zero_stage <= 3:
        raise ConfigError(f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    if o.name == "lars" and t.zero_stage > 0:
        raise ConfigError(
            f"optim.name=lars with train.zero_stage={t.zero_stage}: ZeRO hands the optimizer flat "
            f"partitions, so LARS's per-layer trust ratio would be wrong; use train.zero_stage=0 "
            f"(the probe trains only a head) or optim.name=sgd/adamw"
        )
    _check_finetune_fields(cfg)
    if cfg.aug.ema_decay and t.zero_stage == 3:
        raise ConfigError("aug.ema_decay needs full weights on every rank; use train.zero_stage <= 2 or ema_decay=0")
    if not m.random_init and not os.path.isfile(m.checkpoint):
        raise ConfigError(
            f"model.checkpoint '{m.checkpoint}' does not exist; pass a consolidated "
            f".safetensors file (tools/consolidate.py) or --model.random_init=true"
        )
    if m.random_init and not m.variant:
        raise ConfigError("model.random_init needs model.variant (e.g. --model.variant=eva_b_p16)")
    for key in ("train", "val"):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key} is empty; pass an image folder or labeled index: --data.{key}=PATH")
    if t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs} must be positive")
    per_step = t.micro_batch_size * world_size
    if t.micro_batch_size <= 0 or t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro batch "
            f"{t.micro_batch_size} x {world_size} ranks; change one so global = micro x ranks x accumulation"
        )
    return t.global_batch_size // per_step


def _check_finetune_fields(cfg: ProtocolConfig) -> None:
    """Ranges of the fine-tune options; a RandAugment string is parsed by timm, as at run time."""
    ranges = {
        "model.checkpoint_fraction": (cfg.model.checkpoint_fraction, 0.0, 1.0),
        "data.eval_crop_pct": (cfg.data.eval_crop_pct, 0.0, 1.0),
        "aug.random_erasing": (cfg.aug.random_erasing, 0.0, 1.0),
        "aug.label_smoothing": (cfg.aug.label_smoothing, 0.0, 0.999),
        "aug.ema_decay": (cfg.aug.ema_decay, 0.0, 0.999999),
    }
    if cfg.model.depth < 0:
        raise ConfigError(f"model.depth={cfg.model.depth} must be 0 (the variant's) or a positive block count")
    for name, (value, low, high) in ranges.items():
        if not low <= value <= high:
            raise ConfigError(f"{name}={value} must lie in [{low}, {high}]")
    if cfg.aug.rand_augment:
        # timm costs ~1 s to import (measured); only recipes with RandAugment pay it here
        from timm.data.auto_augment import rand_augment_transform

        try:
            rand_augment_transform(cfg.aug.rand_augment, {})
        except (AssertionError, ValueError, KeyError) as err:
            raise ConfigError(
                f"aug.rand_augment='{cfg.aug.rand_augment}' is not a timm RandAugment string "
                f'({err or "unknown section"}); use e.g. rand-m9-mstd0.5-inc1 or "" for none'
            ) from None
