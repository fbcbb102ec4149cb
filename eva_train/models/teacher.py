"""The frozen CLIP teacher: an open_clip vision tower loaded from a local file.

EVA-01's target is the teacher's final patch tokens after `ln_post`, multiplied by `visual.proj`
(768-d for OpenAI CLIP-L/14). The tower is fed a crop resized so that its patch grid equals the
student's (a p16 student at 224 has 14x14 patches: the p14 teacher sees 196 px, with its position
table resized once at build time). Weights never load silently wrong: any missing, unexpected or
mis-shaped key is an error naming the file.
"""

import logging
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import _build_vision_tower
from open_clip.transformer import VisionTransformer

from eva_train.errors import ConfigError
from eva_train.models import flops
from eva_train.models.pos_embed import resize_pos_embed
from eva_train.models.weights_file import read_state_dict as read_weights_file

log = logging.getLogger(__name__)

# the demo's tower: small enough to run every step on 2 CPU cores
TINY_TOWER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
}
RANDOM_TEACHER_SEED = 1234
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


class TeacherLoadError(ConfigError):
    """The teacher's weights file is missing, unreadable or does not fit the named tower."""


class Teacher(nn.Module):
    """Frozen vision tower: uint8 images (B, 3, H, W) -> float32 patch targets (B, N, out_dim)."""

    def __init__(
        self,
        visual: nn.Module,
        out_dim: int,
        input_px: int,
        autocast_dtype: torch.dtype | None,
        input_transform: str = "none",
    ):
        super().__init__()
        if input_transform not in ("none", "gray_standardized"):
            raise ValueError(f"teacher input_transform '{input_transform}' is unknown; use none or gray_standardized")
        self.input_transform = input_transform
        self.visual = visual
        self.out_dim = out_dim
        self.input_px = input_px
        self.autocast_dtype = autocast_dtype
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return self  # always in eval mode: no dropout / drop-path in the targets

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = (images.float() - self.mean) / self.std
        if x.shape[-1] != self.input_px or x.shape[-2] != self.input_px:
            x = F.interpolate(
                x, size=(self.input_px, self.input_px), mode="bicubic", antialias=True, align_corners=False
            )
        return x

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images -> projected final patch tokens (B, N, out_dim)."""
        if isinstance(self.visual, VisionTransformer):
            _, tokens = self.visual._pool(self.visual.transformer(self.visual._embeds(x)))  # after ln_post
            return tokens @ self.visual.proj
        trunk = self.visual.trunk  # open_clip TimmModel (EVA-CLIP): trunk norm -> head projection
        tokens = trunk.forward_features(x)[:, trunk.num_prefix_tokens :]
        return self.visual.head(trunk.head(trunk.fc_norm(tokens)))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_transform == "gray_standardized":
            images = gray_standardized(images)
        x = self._preprocess(images)
        enabled = self.autocast_dtype is not None and x.is_cuda
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            return self.patch_tokens(x).float()

    def forward_flops_per_image(self) -> float:
        """Analytic forward FLOPs of one image through the tower, projection included."""
        patch_size = _tower_patch_size(self.visual)
        grid = self.input_px // patch_size
        if isinstance(self.visual, VisionTransformer):
            blocks, width = self.visual.transformer.resblocks, self.visual.transformer.width
        else:
            blocks, width = self.visual.trunk.blocks, self.visual.trunk.embed_dim
        mlp_macs = sum(m.in_features * m.out_features for m in blocks[0].mlp.modules() if isinstance(m, nn.Linear))
        body = flops.transformer_forward_flops(grid * grid, 1, width, len(blocks), mlp_macs, patch_size)
        return body + 2.0 * grid * grid * width * self.out_dim


def _tower_patch_size(visual: nn.Module) -> int:
    if isinstance(visual, VisionTransformer):
        return visual.patch_size[0]
    return visual.trunk.patch_embed.patch_size[0]


def _model_config(name: str) -> dict:
    if name == "tiny":
        return {"embed_dim": TINY_TOWER["embed_dim"], "vision_cfg": dict(TINY_TOWER["vision_cfg"])}
    if name.startswith("hf-hub:"):
        raise ValueError(
            f"teacher.name '{name}' would download from the Hugging Face hub; download the config "
            f"and weights once, then use 'local-dir:DIR' (DIR holding open_clip_config.json)"
        )
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"teacher.name '{name}' is not an open_clip model config; use 'tiny' or one of "
            f"open_clip.list_models(), e.g. ViT-L-14-quickgelu (OpenAI CLIP-L/14), EVA02-L-14"
        )
    return cfg


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (eva_train.models.weights_file: safetensors, or a torch file
    loaded with weights_only=True; training checkpoints unwrapped)."""
    if not Path(path).is_file():
        raise TeacherLoadError(f"teacher.checkpoint '{path}' does not exist; pass the local path of the weights")
    try:
        state = read_weights_file(path)
    except ValueError as exc:
        raise TeacherLoadError(f"cannot read teacher.checkpoint '{path}': {exc}") from None
    if not state:
        raise TeacherLoadError(f"teacher.checkpoint '{path}' does not hold a state dict of tensors")
    return state


def visual_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the vision tower's tensors, without a `visual.` / `module.` prefix."""
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def _check_keys(visual: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    expected = visual.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        (label, keys)
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (file vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        detail = "; ".join(f"{len(keys)} {label}: {', '.join(keys[:5])}" for label, keys in problems)
        raise TeacherLoadError(
            f"teacher.checkpoint '{path}' does not fit the {type(visual).__name__} tower "
            f"of teacher.name: {detail}; check teacher.name matches the weights"
        )


def teacher_out_dim(name: str) -> int:
    """Width of the teacher's targets (the tower's projection), from its open_clip config alone."""
    return int(_model_config(name)["embed_dim"])


def check_teacher_weights(teacher_cfg, state: dict[str, torch.Tensor]) -> int:
    """Start-up check of a teacher file's tensors (meta tensors are enough) against the tower of
    teacher_cfg.name, built on the meta device; returns the output width. TeacherLoadError if unfit."""
    tower_cfg = _model_config(teacher_cfg.name)
    with torch.device("meta"):
        visual, out_dim = _build_tower(teacher_cfg.name, tower_cfg, state)
    _check_keys(visual, visual_state_dict(state), teacher_cfg.checkpoint)
    return out_dim


def _adapt_to_grid(visual: nn.Module, grid: int) -> None:
    """Resize the tower's position table so its patch grid equals the student's."""
    if isinstance(visual, VisionTransformer):
        table = visual.positional_embedding.data.unsqueeze(0)  # (1, 1+g*g, W)
        resized = resize_pos_embed(table, grid, num_prefix_tokens=1)[0]
        visual.positional_embedding = nn.Parameter(resized, requires_grad=False)
        visual.grid_size = (grid, grid)
    else:
        visual.set_input_size(grid * _tower_patch_size(visual))


def _uses_openai_weights(raw: dict[str, torch.Tensor]) -> bool:
    return any(k in raw for k in OPENAI_METADATA_KEYS)


def _build_tower(name: str, cfg: dict, raw: dict[str, torch.Tensor] | None) -> tuple[nn.Module, int]:
    quick_gelu = bool(cfg.get("quick_gelu", False))
    if raw is not None and _uses_openai_weights(raw) and not quick_gelu:
        # OpenAI's CLIP was trained with QuickGELU; a GELU tower would give subtly wrong targets
        log.info("teacher: OpenAI CLIP weights detected, building %s with QuickGELU", name)
        quick_gelu = True
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu)
    return visual, int(cfg["embed_dim"])


def gray_standardized(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 gray image with each channel standardized per image first.

    Demo only: the procedural images paint each class's pattern in two random colours, and a random
    teacher's features are then mostly colour, which carries no class information; predicting them
    teaches the student nothing useful. Without colour the targets describe structure only."""
    x = images.float()
    x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 1e-3)
    gray = x.mean(dim=1, keepdim=True).expand_as(x)
    return (gray * 50 + 128).clamp(0, 255).to(torch.uint8)


def build_teacher(teacher_cfg, student_grid: int, device) -> Teacher:
    """The frozen teacher for a student with `student_grid` x `student_grid` patches."""
    device = torch.device(device)
    tower_cfg = _model_config(teacher_cfg.name)  # an unknown name fails before a large file is read
    if teacher_cfg.random_init:
        log.warning(
            "teacher: RANDOM INIT %s (seed %d): the targets carry no CLIP knowledge; demo only",
            teacher_cfg.name,
            RANDOM_TEACHER_SEED,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            visual, out_dim = _build_tower(teacher_cfg.name, tower_cfg, None)
    else:
        if not teacher_cfg.checkpoint:
            raise TeacherLoadError(
                f"teacher.checkpoint is empty; give the local path of the {teacher_cfg.name} "
                f"weights (only the demo may use teacher.random_init=true)"
            )
        raw = read_state_dict(teacher_cfg.checkpoint)
        visual, out_dim = _build_tower(teacher_cfg.name, tower_cfg, raw)
        state = visual_state_dict(raw)
        _check_keys(visual, state, teacher_cfg.checkpoint)
        visual.load_state_dict(state, strict=True)
        log.info("teacher: loaded %s from %s", teacher_cfg.name, teacher_cfg.checkpoint)
    _adapt_to_grid(visual, student_grid)
    autocast_dtype = None
    if device.type == "cuda":  # fp32 weights, low-precision matmuls: LayerNorm/softmax stay fp32 under autocast
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(teacher_cfg.precision)
    transform = getattr(teacher_cfg, "input_transform", "none")
    if transform != "none" and not teacher_cfg.random_init:
        raise TeacherLoadError("teacher.input_transform is for the demo's random teacher only; use none")
    teacher = Teacher(visual, out_dim, student_grid * _tower_patch_size(visual), autocast_dtype, transform)
    return teacher.to(device)
