"""Typed configuration: dataclass defaults <- recipe file (TOML) <- `--section.key=value` overrides.

Defaults are the EVA-01 recipe (the paper's pretraining settings); a recipe states only what differs. Everything is
validated once by `validate()`, before any process group, model or data worker exists, and each
error is one line naming the problem and the fix.
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import tomllib

from eva_train.errors import ConfigError  # noqa: F401 - re-exported: callers import it from here
from eva_train.models import check_model_config  # torch-free: the variants table and the model section's checks
from eva_train.models.variants import VARIANTS

RECIPE_DIR = Path(__file__).parent / "recipes"
Precision = Literal["bf16", "fp16", "fp32"]


@dataclass
class ModelConfig:
    variant: str = "eva_g_p14"  # a name from eva_train.models.variants
    img_size: int = 224  # pixels, square
    drop_path_rate: float = 0.1
    mode: Literal["mim", "mae"] = (
        "mim"  # "mim": mask tokens in the encoder (EVA); "mae": visible-only encoder + decoder
    )
    decoder_depth: int = 4  # mae mode only
    decoder_width: int = 512  # mae mode only
    decoder_heads: int = 16  # mae mode only
    checkpoint_fraction: float = 1.0  # fraction of blocks under activation checkpointing (0 = none)
    kernels: Literal["", "auto", "triton", "torch", "apex"] = ""  # "" = $EVA_KERNELS or auto
    init_from: str = ""  # optional local weights to start from (EVA/timm/mmpretrain/ours)


@dataclass
class TeacherConfig:
    name: str = "ViT-L-14"  # open_clip model name, or "tiny" for the demo's small tower
    checkpoint: str = ""  # local file with the tower's weights (required unless random_init)
    random_init: bool = False  # demo only: a randomly initialised teacher, said loudly in the log
    precision: Precision = "bf16"  # teacher compute dtype on GPU (fp32 on CPU)
    input_transform: Literal["none", "gray_standardized"] = "none"  # gray_standardized: demo only (a random
    # teacher's targets would otherwise be dominated by the images' random colours)


@dataclass
class MaskConfig:
    strategy: Literal["block", "random"] = (
        "block"  # "block" (BEiT block-wise, EVA) or "random" (exact count, MAE-style)
    )
    num_masking_patches: int = 105  # of 256 at 224/14 (about 40%); scaled with the grid at other sizes
    min_block_patches: int = 16
    min_aspect: float = 0.3  # max aspect is 1 / min_aspect


@dataclass
class DataConfig:
    index: list[str] = field(default_factory=list)  # Arrow index files for training
    val_index: list[str] = field(default_factory=list)  # Arrow index files for validation ([] = no val)
    demo_root: str = ""  # demo only: folder where procedural images + index are made on first use
    num_workers: int = 8  # DataLoader workers per rank
    min_crop_scale: float = 0.2  # RandomResizedCrop scale (min_crop_scale, 1)
    bad_sample_threshold: float = 0.01  # abort when more than this fraction of samples failed to decode
    bad_sample_min_count: int = 1000  # samples seen before the threshold can abort (one bad image early is noise)
    max_image_pixels: int = 67108864  # images larger than this (64 Mpx) count as bad instead of eating memory
    prefetch_factor: int = 4


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (absolute, for global_batch_size)
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 0  # if 0, warmup_epochs is used
    warmup_epochs: float = 2.0
    grad_clip: float = 3.0  # max global grad norm (0 = off)


@dataclass
class TrainConfig:
    global_batch_size: int = 4096  # images per optimizer step, all ranks
    micro_batch_size: int = 32  # images per rank per forward
    epochs: float = 150.0  # used when total_steps == 0
    total_steps: int = 0
    precision: Precision = "bf16"  # bf16, fp16 or fp32
    seed: int = 0
    output_dir: str = "outputs/run"
    deepspeed_config: str = "ds_configs/zero3.json"
    val_every_steps: int = 0  # 0 = only at the end (when a val index is given)
    max_steps_this_run: int = 0  # stop (and save) after this many steps in this process (0 = off)
    dist_timeout_s: int = 1800  # process-group timeout: a collective waiting longer raises instead of hanging
    stall_timeout_s: float = 1800.0  # watchdog: no training progress for this long -> stacks in the log, exit non-zero
    # finish the step, save, then requeue (time limit, preemption) or stop (a user's cancel) on these
    save_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGHUP"])
    max_bad_steps: int = 3  # this many non-finite steps in a row (each skipped) stop the run, exit 1
    spike_factor: float = 0.0  # loss spike: cosine distance (loss + 1) > factor x its running median (0 = off)
    spike_window: int = 50  # ... median of the last this many healthy steps
    spike_patience: int = 3  # ... for this many steps in a row -> reload the last good checkpoint, skip the data


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 2  # most recent checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    resume: str = "auto"  # "auto" (latest complete in output_dir), "none", or a checkpoint path


@dataclass
class LoggingConfig:
    log_every_steps: int = 10
    wandb: bool = True  # offline automatically without credentials / network
    wandb_project: str = "eva-train"
    run_name: str = ""
    progress_bar: bool = True


@dataclass
class EvalConfig:
    knn_every_steps: int = 0  # kNN monitor interval (0 = off)
    knn_train_index: list[str] = field(default_factory=list)
    knn_val_index: list[str] = field(default_factory=list)
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_max_images: int = 10000
    knn_batch_size: int = 64  # images per rank per forward in the kNN monitor
    final_report: bool = False  # after training: kNN + linear probe, pretrained vs random init (demo)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = "demo"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def available_recipes(recipe_dir: Path = RECIPE_DIR) -> list[str]:
    return sorted(p.stem for p in recipe_dir.glob("*.toml"))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn a TOML value or a CLI string into the field's declared type."""
    origin = get_origin(hint)
    if origin is Literal:
        return _choice(value, get_args(hint), where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if not value.startswith("[") else json.loads(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(hint)
        item_type = args[0] if args else str
        items = [_coerce(v, item_type, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:
        if hint is int and isinstance(value, str) and not value.lstrip("-").isdigit():
            as_float = float(value)  # accept 1e4 for an int field, but not 2.5
            if not as_float.is_integer():
                raise ValueError(value)
            return int(as_float)
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None


def _choice(value: Any, choices: tuple[Any, ...], where: str) -> Any:
    """A value of a `Literal[...]` field: one of its choices (CLI strings compared as text)."""
    for choice in choices:
        if value == choice or (isinstance(value, str) and value == str(choice)):
            return choice
    shown = ", ".join(repr(c) if c == "" else str(c) for c in choices)
    raise ConfigError(f"{where} {value!r} is unknown; use one of {shown}")


def apply_value(root: Any, section: str, key: str, value: Any, source: str) -> None:
    """Set `root.section.key` (root: any dataclass of section dataclasses) from a TOML value or CLI
    string, coerced to the field's type; unknown sections and keys are one-line errors."""
    sections = [f.name for f in dataclasses.fields(root) if dataclasses.is_dataclass(getattr(root, f.name))]
    if section not in sections:
        raise ConfigError(f"{source}: unknown section '{section}'; sections are {', '.join(sections)}")
    target = getattr(root, section)
    hints = get_type_hints(type(target))
    if key not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"{source}: unknown key '{section}.{key}'; known keys: {known}")
    setattr(target, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


def load_recipe(name_or_path: str, recipe_dir: Path = RECIPE_DIR) -> tuple[str, dict[str, Any]]:
    """Return (recipe name, raw TOML dict) for a recipe name in `recipe_dir` or a path to a .toml file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = recipe_dir / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"recipe '{name_or_path}' not found; use one of {', '.join(available_recipes(recipe_dir))} "
            f"or a path to a .toml file"
        )
    with open(path, "rb") as f:
        return path.stem, tomllib.load(f)


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str, str]]:
    """`--section.key=value` (or `--section.key value`) -> [(section, key, value)]."""
    out, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
            value, i = args[i + 1], i + 1
        section, _, key = name.partition(".")
        out.append((section, key, value))
        i += 1
    return out


def fill_config(root: Any, recipe: str, recipe_dir: Path, overrides: Sequence[str]) -> Any:
    """Defaults (the dataclass tree `root`) <- recipe TOML <- `--section.key=value` overrides; sets root.recipe.
    The one mechanism behind the pretraining config and the evaluation protocols' config."""
    root.recipe, raw = load_recipe(recipe, recipe_dir)
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"recipe {root.recipe}: top-level key '{section}' must be a [section] table")
        for key, value in values.items():
            apply_value(root, section, key, value, f"recipe {root.recipe}")
    for section, key, value in parse_overrides(overrides):
        apply_value(root, section, key, value, "command line")
    return root


def build_config(recipe: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- recipe <- overrides. Does not validate (call `validate`)."""
    return fill_config(Config(), recipe or "demo", RECIPE_DIR, overrides)


def derived_grad_accum(cfg: Config, world_size: int) -> int:
    """Gradient accumulation steps implied by the batch sizes; an error if they do not multiply out."""
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x world size {world_size}; "
            f"change one of them so global = micro x ranks x accumulation"
        )
    return cfg.train.global_batch_size // per_step


# Allowed values of numeric fields ("> 0", ">= 0", or an interval "[0, 1)"); tuples are checked item by item.
RANGES = {
    "model.img_size": "> 0",
    "model.drop_path_rate": "[0, 1)",
    "model.checkpoint_fraction": "[0, 1]",
    "model.decoder_depth": "> 0",
    "model.decoder_width": "> 0",
    "model.decoder_heads": "> 0",
    "mask.min_block_patches": "> 0",
    "mask.min_aspect": "(0, 1]",
    "data.num_workers": ">= 0",
    "data.min_crop_scale": "(0, 1]",
    "data.bad_sample_threshold": "[0, 1]",
    "data.bad_sample_min_count": ">= 0",
    "data.max_image_pixels": "> 0",
    "data.prefetch_factor": "> 0",
    "optim.lr": "> 0",
    "optim.min_lr": ">= 0",
    "optim.betas": "[0, 1)",
    "optim.eps": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.warmup_steps": ">= 0",
    "optim.warmup_epochs": ">= 0",
    "optim.grad_clip": ">= 0",
    "train.global_batch_size": "> 0",
    "train.micro_batch_size": "> 0",
    "train.epochs": ">= 0",
    "train.total_steps": ">= 0",
    "train.seed": ">= 0",
    "train.val_every_steps": ">= 0",
    "train.max_steps_this_run": ">= 0",
    "train.dist_timeout_s": "> 0",
    "train.stall_timeout_s": "> 0",
    "train.max_bad_steps": "> 0",
    "train.spike_factor": ">= 0",
    "train.spike_window": "> 0",
    "train.spike_patience": "> 0",
    "logging.log_every_steps": "> 0",
    "eval.knn_every_steps": ">= 0",
    "eval.knn_k": "> 0",
    "eval.knn_temperature": "> 0",
    "eval.knn_max_images": "> 0",
    "eval.knn_batch_size": "> 0",
}


def in_range(value: float, rule: str) -> bool:
    """`value` satisfies a RANGES rule; NaN satisfies none."""
    if rule.startswith((">", "<")):
        op, bound = rule.split()
        return {">": value > float(bound), ">=": value >= float(bound)}.get(op, False)
    low, high = (float(x) for x in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def check_ranges(cfg: Config) -> None:
    for name, rule in RANGES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if not all(in_range(v, rule) for v in (value if isinstance(value, (tuple, list)) else (value,))):
            raise ConfigError(f"{name}={value} is out of range: it must be {rule}; change it (--{name}=...)")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"optim.min_lr={cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}; the schedule decays "
            f"from lr to min_lr, so lower min_lr"
        )


def check_choices(root: Any) -> None:
    """Every `Literal[...]` field of every section holds one of its choices (values set in code
    bypass the coercion that checks recipes and command lines)."""
    for section in dataclasses.fields(root):
        target = getattr(root, section.name)
        if dataclasses.is_dataclass(target):
            check_section_choices(target, section.name)


def check_section_choices(target: Any, section: str) -> None:
    for key, hint in get_type_hints(type(target)).items():
        if get_origin(hint) is Literal:
            _choice(getattr(target, key), get_args(hint), f"{section}.{key}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cheap checks that must pass before anything expensive starts."""

    check_choices(cfg)
    check_ranges(cfg)
    m = cfg.model
    if m.variant not in VARIANTS:
        raise ConfigError(f"model.variant '{m.variant}' is unknown; choose one of {', '.join(sorted(VARIANTS))}")
    patch = VARIANTS[m.variant].patch_size
    if m.img_size % patch:
        raise ConfigError(
            f"model.img_size={m.img_size} is not divisible by the patch size {patch} of "
            f"{m.variant}; use a multiple of {patch} (e.g. {patch * (max(m.img_size, patch) // patch)})"
        )

    try:
        check_model_config(m)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if m.mode == "mae" and cfg.mask.strategy != "random":
        raise ConfigError(
            "model.mode=mae needs the same number of masked patches in every image; set mask.strategy=random"
        )
    if m.init_from and not Path(m.init_from).is_file():
        raise ConfigError(
            f"model.init_from '{m.init_from}' does not exist; give a local weights file (official "
            f"EVA-01/EVA-02 .pt, timm/open_clip/mmpretrain, or tools/consolidate.py output)"
        )
    if cfg.train.total_steps <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("train.total_steps and train.epochs are both 0; set one of them")
    # mask counts are given for the 16x16 reference grid (224/14) and scaled by area to the real grid
    if not 0 < cfg.mask.num_masking_patches < 256:
        raise ConfigError(
            f"mask.num_masking_patches={cfg.mask.num_masking_patches} must lie in (0, 256): it counts "
            f"patches of a 16x16 grid and is scaled to the model's grid (105 = EVA's 40%)"
        )
    derived_grad_accum(cfg, world_size)
    _validate_teacher(cfg.teacher)
    _validate_paths(cfg)
    _validate_save_signals(cfg.train.save_signals)
    if 0 < cfg.train.spike_factor <= 1:  # the loss would count as a spike at or below its own median
        raise ConfigError(
            f"train.spike_factor={cfg.train.spike_factor} would call ordinary steps spikes; use a "
            f"factor above 1 (e.g. 3) or 0 to switch the loss-spike policy off"
        )


def _validate_save_signals(names: list[str]) -> None:
    allowed = ("TERM", "USR1", "USR2", "HUP", "INT", "QUIT")  # those a job can catch and save on
    for name in names:
        if name.upper().removeprefix("SIG") not in allowed:
            raise ConfigError(
                f"train.save_signals: '{name}' is not a signal a run can save on; use any of "
                f"{', '.join('SIG' + a for a in allowed)} (comma-separated)"
            )


def _validate_teacher(t: TeacherConfig) -> None:
    check_section_choices(t, "teacher")
    if t.random_init:
        return
    if not t.checkpoint:
        raise ConfigError(
            f"teacher.checkpoint is empty; give the local path of the {t.name} weights "
            f"(--teacher.checkpoint=PATH); only the demo may use teacher.random_init=true"
        )
    if not os.path.isfile(t.checkpoint):
        raise ConfigError(
            f"teacher.checkpoint '{t.checkpoint}' does not exist; download the {t.name} "
            f"weights to a local file and pass its path"
        )
    if t.input_transform != "none":
        raise ConfigError(
            "teacher.input_transform is for the demo's random teacher only; a real CLIP teacher must "
            "see the real image: set teacher.input_transform=none"
        )


def _validate_paths(cfg: Config) -> None:
    if not cfg.data.index and not cfg.data.demo_root:
        raise ConfigError("data.index is empty; build one with tools/build_index.py and pass --data.index=PATH")
    for path in list(cfg.data.index) + list(cfg.data.val_index):
        if not os.path.isfile(path):
            raise ConfigError(
                f"data index '{path}' does not exist; build it with `python tools/build_index.py SOURCE --out {path}`"
            )
    out = Path(cfg.train.output_dir)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise ConfigError(
            f"train.output_dir '{out}' lies under {probe}, which is not a folder; "
            f"pass --output_dir to a folder you can write"
        )
    if not os.access(probe, os.W_OK):
        raise ConfigError(
            f"train.output_dir '{out}' is not writable ({probe} denies writing); "
            f"pass --output_dir to a folder you can write"
        )
