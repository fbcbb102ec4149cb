"""The DeepSpeed side of training: the DeepSpeed config (batch sizes from the recipe), the student
under ZeRO, AdamW param groups, the frozen teacher outside the engine, and one optimizer step."""

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eva_train.config import Config, ConfigError, derived_grad_accum
from eva_train.data.transforms import normalize_images
from eva_train.optim.weight_decay import skips_weight_decay
from eva_train.train.faults import FaultPlan
from eva_train.train.objective import masked_cosine_loss

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_ds_config_path(path: str) -> Path:
    """A DeepSpeed JSON given as-is, or relative to the repository (ds_configs/zero3.json from any cwd)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in (REPO_ROOT / "ds_configs").glob("*.json")))
    raise ConfigError(
        f"deepspeed config '{path}' not found; pass --deepspeed_config with one of "
        f"ds_configs/{{{shipped}}} or your own file"
    )


def _check_agrees(raw: dict[str, Any], key: str, wanted: Any, source: str) -> None:
    if key in raw and raw[key] != "auto" and raw[key] != wanted:
        raise ConfigError(
            f"{source} sets {key}={raw[key]!r} but the recipe implies {wanted!r}; batch sizes, "
            f"clipping and precision come from the recipe: delete {key} from the JSON or change the recipe"
        )


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The JSON (ZeRO + precision details) completed from the recipe; contradictions are ConfigErrors."""
    path = resolve_ds_config_path(cfg.train.deepspeed_config)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"deepspeed config {path} is not valid JSON ({error}); fix the file") from None
    for owned in ("optimizer", "scheduler"):
        if owned in raw:
            raise ConfigError(
                f"{path} has an '{owned}' block; the optimizer and lr schedule come from the "
                f"recipe's [optim] section: delete the block"
            )
    stage = raw.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        # stage 0 (fp32/bf16) steps the optimizer without checking the gradients: a NaN would be applied
        raise ConfigError(
            f"{path}: zero_optimization.stage={stage!r}; use 1, 2 or 3 (their optimizers skip a "
            f"step with non-finite gradients, which the divergence guard relies on)"
        )
    for section, key in (("bf16", "check_grad_overflow"), ("zero_optimization", "compute_grad_norm")):
        if raw.get(section, {}).get(key, True) is not True:
            raise ConfigError(
                f"{path}: {section}.{key} must stay true (without it ZeRO-1/2 apply a step with NaN "
                f"gradients instead of skipping it, as the divergence guard needs); delete the key"
            )
    wanted = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": derived_grad_accum(cfg, world_size),
        "gradient_clipping": float(cfg.optim.grad_clip),
    }
    for key, value in wanted.items():
        _check_agrees(raw, key, value, str(path))
    for precision in ("bf16", "fp16"):
        enabled = raw.get(precision, {}).get("enabled", "auto")
        _check_agrees({"enabled": enabled}, "enabled", cfg.train.precision == precision, f"{path} [{precision}]")
    config = dict(raw, **wanted)
    config["bf16"] = dict(raw.get("bf16", {}), enabled=cfg.train.precision == "bf16")
    config["fp16"] = dict(raw.get("fp16", {}), enabled=cfg.train.precision == "fp16")
    if cfg.train.precision == "fp16":
        config["fp16"].setdefault("loss_scale", 0)  # dynamic loss scale, as the EVA-01 run
        config["fp16"].setdefault("initial_scale_power", 16)
    return config


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for matrices; none for biases, norms, position tables, cls/mask tokens.
    Shapes via `ds_shape` under ZeRO-3, where a partitioned parameter's own tensor is empty."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)
        exempt = skips_weight_decay(name, shape)
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_student(cfg: Config, teacher_dim: int, ds_config: dict[str, Any], init_from: str = "") -> torch.nn.Module:
    """The student, built partitioned under ZeRO-3 so EVA-g never exists whole on one rank, then
    loaded from `init_from` (model.init_from, skipped by the caller when resuming) if given."""
    # deepspeed (2.3 s to import, measured) and the model code (Triton) are imported here, not at the top:
    # pretrain.py's dry run imports this module for build_ds_config and must answer in a fraction of a second
    import deepspeed

    from eva_train.export.weights import init_from as load_init_weights
    from eva_train.models import build_model

    torch.manual_seed(cfg.train.seed)  # same init on every rank and in every run
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage(ds_config) == 3):
        model = build_model(cfg.model, teacher_dim)
    if init_from:
        load_init_weights(model, init_from)
    return model


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    fused = {"fused": True} if device.type == "cuda" else {}
    # lr is set by the engine every step (schedule.lr_at_step); this value is only the initial one
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, **fused)


@dataclass
class StepResult:
    loss: float  # mean over the step's micro batches and all ranks
    grad_norm: float  # global, before clipping (nan when DeepSpeed does not report it)
    lr: float
    loss_finite: bool = True  # on every rank (agreed)
    grads_finite: bool = True  # the global norm was finite, so DeepSpeed applied the step (agreed)
    loss_scale: float = 1.0  # fp16's dynamic scale; 1 for fp32/bf16
    bad_samples: int = 0  # this step's replaced (undecodable) samples, all ranks
    seen_samples: int = 0  # this step's samples, all ranks


class Trainer:
    """One optimizer step = gradient_accumulation_steps micro batches through the DeepSpeed engine."""

    def __init__(
        self, engine, teacher, optimizer, device: torch.device, precision: str, lr_at_step: Callable[[int], float]
    ):
        self.engine, self.teacher, self.optimizer = engine, teacher, optimizer
        self.device, self.dtype, self.lr_at_step = device, DTYPES[precision], lr_at_step
        self.faults = FaultPlan(_rank())  # test-only (EVA_FAULT_INJECT); inert otherwise

    def micro_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["images"].to(self.device, non_blocking=True)  # (B,3,H,W) uint8
        mask = batch["mask"].to(self.device, non_blocking=True)  # (B,N) bool
        target = self.teacher(images)  # (B,N,C) fp32, no grad
        pred = self.engine(normalize_images(images, self.dtype), mask)  # (M,C)
        return masked_cosine_loss(pred, target, mask)

    def train_step(self, step: int, micro_batches: Sequence[dict[str, torch.Tensor]]) -> StepResult:
        """Optimizer step number `step` (0-based) on this rank's micro batches."""
        lr = self.lr_at_step(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            loss = self.faults.apply(step + 1, self.micro_loss(batch))
            self.engine.backward(loss * _nan_unless_finite(loss))
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += loss.detach().float()
        self.faults.step_done(step + 1)
        reported = self.engine.get_global_grad_norm()  # None: ZeRO-1/2 with the norm switched off
        grad_norm = float("nan") if reported is None else float(reported)
        applied = self.engine.was_step_applied()
        # the step's one all-reduce: loss mean, health flags (counts of ranks that saw a problem) and the
        # bad-sample counts (exact in fp32: a step's samples are far below 2**24)
        bad = sum(int(b["bad"].sum()) for b in micro_batches)
        seen = sum(int(b["images"].shape[0]) for b in micro_batches)
        flags = torch.tensor([0.0 if applied else 1.0, bad, seen], device=self.device)
        packed = torch.cat([torch.stack([total / len(micro_batches), (~torch.isfinite(total)).float()]), flags])
        _all_reduce_sum(packed)
        loss_finite, grads_finite = bool(packed[1] == 0), bool(packed[2] == 0)
        if applied and not (loss_finite and grads_finite and (reported is None or math.isfinite(grad_norm))):
            raise RuntimeError(
                f"step {step + 1}: DeepSpeed applied an optimizer step with a non-finite loss or "
                f"gradient norm ({grad_norm}); the divergence guard cannot undo it"
            )
        loss_scale = float(getattr(self.engine.optimizer, "loss_scale", 1.0))
        return StepResult(
            loss=float(packed[0] / _world_size()),
            grad_norm=grad_norm,
            lr=lr,
            loss_finite=loss_finite,
            grads_finite=grads_finite,
            loss_scale=loss_scale,
            bad_samples=int(packed[3]),
            seen_samples=int(packed[4]),
        )

    @torch.no_grad()
    def val_loss(self, loader) -> float:
        """Mean loss over one pass of the val loader (every rank runs the same number of forwards)."""
        self.engine.eval()
        try:
            total = torch.zeros(2, device=self.device, dtype=torch.float64)  # (sum of loss x images, images)
            for batch in loader:
                n = batch["images"].shape[0]
                total += torch.tensor([self.micro_loss(batch).item() * n, n], device=self.device, dtype=torch.float64)
            _all_reduce_sum(total)
        finally:
            self.engine.train()
        return float(total[0] / total[1].clamp(min=1))


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _nan_unless_finite(loss: torch.Tensor) -> torch.Tensor:
    """1, or NaN when `loss` is not finite: multiplied in before backward, it makes every gradient NaN
    (NaN x 0 stays NaN), so DeepSpeed's global-norm check skips the step on every rank even where a
    non-finite loss would have left some gradients finite. x 1.0 leaves finite losses bit-identical."""
    finite = torch.isfinite(loss.detach())
    return torch.where(finite, torch.ones_like(loss), torch.full_like(loss, float("nan"))).detach()


def build_engine(cfg: Config, ds_config: dict[str, Any], teacher_dim: int, device: torch.device, init_from: str = ""):
    """(DeepSpeed engine, the AdamW it wraps)."""
    import deepspeed  # see build_student

    model = build_student(cfg, teacher_dim, ds_config, init_from)
    optimizer = build_optimizer(model, cfg, device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    log.info(
        "engine: ZeRO stage %d, %s, micro %d x accumulation %d, %d ranks",
        zero_stage(ds_config),
        cfg.train.precision,
        ds_config["train_micro_batch_size_per_gpu"],
        ds_config["gradient_accumulation_steps"],
        engine.world_size,
    )
    return engine, optimizer
