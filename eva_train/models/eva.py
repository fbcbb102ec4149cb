"""The EVA ViT backbone (EVA-01 and EVA-02 options) and its MIM pretraining model.

State-dict names equal timm's `Eva` (num_classes=0, global_pool='token'), so a timm model of the
same dims loads our backbone with strict=True; MIM-only tensors are `mask_token` and `lm_head.*`,
as in official EVA-01 checkpoints.
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from eva_train.models.blocks import INIT_STD, Block, InitLinear, LayerNorm
from eva_train.models.pos_embed import GridCache, as_hw, resize_pos_embed, rope_sin_cos
from eva_train.models.variants import EvaConfig, num_checkpointed_blocks


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, 3, H, W) -> (B, N, D), any H, W that are multiples
    of the patch size; `img_size` (H, W) is the size the model is set up for."""

    def __init__(self, patch_size: int, embed_dim: int, img_size: tuple[int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.img_size = img_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The (rows, cols) patch grid of an image size; a one-line error for other sizes."""
        p = self.patch_size
        if height % p or width % p or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {p}; resize or "
                f"crop to multiples of {p} (e.g. {max(p, height // p * p)}x{max(p, width // p * p)})"
            )
        return height // p, width // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _trunc_normal_param(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape))
    nn.init.trunc_normal_(param, std=INIT_STD)
    return param


class EVA(nn.Module):
    """EVA ViT: cls token + learned absolute position embedding, pre-LN blocks, final norm.

    Runs on any H x W that is a multiple of the patch size: at the set-up size (`img_size`) the
    stored position table and RoPE buffers are used as they are (the training path); at another
    size the table is resampled and RoPE computed for that grid, both cached per grid.
    `set_input_size` changes the set-up size for good (state dict and exports carry it)."""

    position_tables = ("pos_embed",)  # learned (1, 1 + N, D) tables that follow the grid

    def __init__(self, cfg: EvaConfig, img_size: int | tuple[int, int] | None = None, drop_path_rate: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = 1
        self.checkpoint_blocks = 0
        img_hw = as_hw(img_size or cfg.default_img_size)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim, img_hw)
        self._set_size(img_hw)
        self.cls_token = _trunc_normal_param(1, 1, cfg.embed_dim)
        self.pos_embed = _trunc_normal_param(1, 1 + self.num_patches, cfg.embed_dim)
        if cfg.rope:
            sin, cos = self._rope_tables(self.grid_size)
            self.register_buffer("rope_sin", sin, persistent=False)  # (N, head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
        rates = torch.linspace(0, drop_path_rate, cfg.depth, device="cpu").tolist()  # stochastic depth rule
        self.blocks = nn.ModuleList([Block(cfg, i, rates[i]) for i in range(cfg.depth)])
        self.norm = LayerNorm(cfg.embed_dim, cfg.norm_eps)

    def _set_size(self, img_hw: tuple[int, int]) -> None:
        self.grid_size = self.patch_embed.grid_for(*img_hw)  # (rows, cols)
        self.img_size = img_hw  # (H, W)
        self.patch_embed.img_size = img_hw
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self._pos_cache, self._rope_cache = GridCache(), GridCache()

    def _rope_tables(self, grid: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_sin_cos(grid, self.cfg.head_dim, self.cfg.rope_ref_grid, self.cfg.rope_temperature, device=device)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the RoPE tables (needed after `to_empty()` from the meta device)."""
        if self.cfg.rope:
            sin, cos = self._rope_tables(self.grid_size, device=self.rope_sin.device)
            self.rope_sin.copy_(sin)
            self.rope_cos.copy_(cos)

    def _apply(self, fn, *args, **kwargs):
        # .to(bf16) / .half() (e.g. by DeepSpeed) would round the RoPE angles' sin/cos; keep them fp32
        module = super()._apply(fn, *args, **kwargs)
        if self.cfg.rope and self.rope_sin.dtype != torch.float32 and self.rope_sin.device.type != "meta":
            self.rope_sin, self.rope_cos = self._rope_tables(self.grid_size, device=self.rope_sin.device)
        self._pos_cache.clear()
        self._rope_cache.clear()
        return module

    @torch.no_grad()
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Set the model up for `img_size` (int or (H, W)) for good: position tables resampled into
        their parameters (new Parameter objects: build optimizers afterwards), RoPE rebuilt."""
        img_hw = as_hw(img_size)
        old_grid, new_grid = self.grid_size, self.patch_embed.grid_for(*img_hw)
        if any(hasattr(getattr(self, name), "ds_id") for name in self.position_tables):
            raise ValueError(
                "set_input_size on a ZeRO-3 partitioned model: build the model with the new img_size, "
                "or call it before deepspeed.initialize / on consolidated weights"
            )
        for name in self.position_tables:
            table = getattr(self, name)
            resized = resize_pos_embed(table.data, new_grid, self.num_prefix_tokens, old_grid=old_grid)
            setattr(self, name, nn.Parameter(resized, requires_grad=table.requires_grad))
        self._set_size(img_hw)
        if self.cfg.rope:
            self.rope_sin, self.rope_cos = self._rope_tables(new_grid, device=self.rope_sin.device)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (1, 1 + rows*cols, D) position table of a grid; the parameter itself at the set-up grid."""
        if grid == self.grid_size:
            return self.pos_embed
        table = self.pos_embed
        resample = lambda: resize_pos_embed(table, grid, self.num_prefix_tokens, old_grid=self.grid_size)  # noqa: E731
        if (torch.is_grad_enabled() and table.requires_grad) or table.is_inference():
            # trained through: a cached graph would hold stale values after a step; inference
            # tensors (built under inference_mode) have no version counter to notice a reload
            return resample()
        return self._pos_cache.get(grid, (table.data_ptr(), table._version, table.dtype, table.device), resample)

    def rope_for(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sin, cos) RoPE tables of a grid (None without RoPE); the buffers at the set-up grid."""
        if not self.cfg.rope:
            return None
        if grid == self.grid_size:
            return self.rope_sin, self.rope_cos
        device = self.rope_sin.device
        return self._rope_cache.get(grid, device, lambda: self._rope_tables(grid, device=device))

    def set_grad_checkpointing(self, fraction: float = 1.0) -> None:
        """Run the first round(fraction * depth) blocks under activation checkpointing in training."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"grad checkpointing fraction {fraction} must lie in [0, 1]")
        self.checkpoint_blocks = num_checkpointed_blocks(fraction, len(self.blocks))

    def run_blocks(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        checkpointing = self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if checkpointing and i < self.checkpoint_blocks:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return x

    def forward_features(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: normalized images (B, 3, H, W), H and W multiples of the patch size; mask: bool (B, N),
        True = replace by mask_token. Returns tokens after the final norm, (B, 1 + N), N = H*W/p^2."""
        grid = self.patch_embed.grid_for(*x.shape[-2:])
        x = self.patch_embed(x)  # (B, N, D)
        B, N = x.shape[:2]
        if mask is not None:
            if mask.shape != (B, N):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({B}, {N})")
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.to(x.dtype).expand(B, -1, -1), x], dim=1) + self.pos_embed_for(grid)
        return self.norm(self.run_blocks(x, self.rope_for(grid)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature: the cls token after the final norm, (B, D)."""
        return self.forward_features(x)[:, 0]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # weights saved at another image size: resample the position tables (bicubic, like timm);
        # RoPE tables are recomputed for our grid, never loaded (official EVA-02 files store them)
        for name in self.position_tables:
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                state_dict[key] = resize_pos_embed(state_dict[key], self.grid_size, self.num_prefix_tokens)
        for key in [k for k in state_dict if k.startswith(prefix) and _is_rope_table(k[len(prefix) :])]:
            del state_dict[key]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _is_rope_table(name: str) -> bool:
    """RoPE buffers under any name they are saved with: ours, official EVA-02's `rope.freqs_*`."""
    return name in ("rope_sin", "rope_cos") or name.startswith("rope.") or ".rope." in name


class EvaForMIM(EVA):
    """EVA-01 masked image modeling: masked patches become `mask_token` in the encoder; the final
    norm -> `lm_head` Linear(D -> teacher_dim) predicts the teacher's features at masked patches."""

    def __init__(self, cfg: EvaConfig, img_size: int | None, teacher_dim: int, drop_path_rate: float = 0.0):
        super().__init__(cfg, img_size, drop_path_rate)
        self.mask_token = _trunc_normal_param(1, 1, cfg.embed_dim)
        self.lm_head = InitLinear(cfg.embed_dim, teacher_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """With mask: (M, teacher_dim) predictions at masked patches, row-major order of `mask`
        (M = mask.sum()). Without: the pooled backbone feature (B, D), e.g. for kNN monitoring."""
        if mask is None:
            return super().forward(x)
        tokens = self.forward_features(x, mask, self.mask_token)  # (B, 1+N, D)
        return self.lm_head(tokens[:, 1:][mask])  # (M, teacher_dim)
