"""The EVA ViT backbone (EVA-01 and EVA-02 options) and its MIM pretraining model.

State-dict names equal timm's `Eva` (num_classes=0, global_pool='token'), so a timm model of the
same dims loads our backbone with strict=True; MIM-only tensors are `mask_token` and `lm_head.*`,
as in official EVA-01 checkpoints.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from eva_train.models.blocks import INIT_STD, Block, InitLinear, LayerNorm
from eva_train.models.pos_embed import resize_pos_embed, rope_sin_cos
from eva_train.models.variants import EvaConfig, num_checkpointed_blocks


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, 3, H, W) -> (B, N, D)."""

    def __init__(self, patch_size: int, embed_dim: int, img_size: int):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"images are {tuple(x.shape[-2:])} but the model was built for "
                             f"{self.img_size}x{self.img_size}; set model.img_size to match the data")
        return self.proj(x).flatten(2).transpose(1, 2)


def _trunc_normal_param(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape))
    nn.init.trunc_normal_(param, std=INIT_STD)
    return param


class EVA(nn.Module):
    """EVA ViT: cls token + learned absolute position embedding, pre-LN blocks, final norm."""

    def __init__(self, cfg: EvaConfig, img_size: Optional[int] = None, drop_path_rate: float = 0.0):
        super().__init__()
        img_size = img_size or cfg.default_img_size
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.grid_size = img_size // cfg.patch_size
        self.num_patches = self.grid_size ** 2
        self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = 1
        self.checkpoint_blocks = 0

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim, img_size)
        self.cls_token = _trunc_normal_param(1, 1, cfg.embed_dim)
        self.pos_embed = _trunc_normal_param(1, 1 + self.num_patches, cfg.embed_dim)
        if cfg.rope:
            sin, cos = self._rope_tables()
            self.register_buffer("rope_sin", sin, persistent=False)  # (N, head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
        rates = torch.linspace(0, drop_path_rate, cfg.depth, device="cpu").tolist()  # stochastic depth rule
        self.blocks = nn.ModuleList([Block(cfg, i, rates[i]) for i in range(cfg.depth)])
        self.norm = LayerNorm(cfg.embed_dim, cfg.norm_eps)

    def _rope_tables(self, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        return rope_sin_cos(self.grid_size, self.cfg.head_dim, self.cfg.rope_ref_grid,
                            self.cfg.rope_temperature, device=device)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the RoPE tables (needed after `to_empty()` from the meta device)."""
        if self.cfg.rope:
            sin, cos = self._rope_tables(device=self.rope_sin.device)
            self.rope_sin.copy_(sin)
            self.rope_cos.copy_(cos)

    def _apply(self, fn, *args, **kwargs):
        # .to(bf16) / .half() (e.g. by DeepSpeed) would round the RoPE angles' sin/cos; keep them fp32
        module = super()._apply(fn, *args, **kwargs)
        if self.cfg.rope and self.rope_sin.dtype != torch.float32 and self.rope_sin.device.type != "meta":
            self.rope_sin, self.rope_cos = self._rope_tables(device=self.rope_sin.device)
        return module

    def set_grad_checkpointing(self, fraction: float = 1.0) -> None:
        """Run the first round(fraction * depth) blocks under activation checkpointing in training."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"grad checkpointing fraction {fraction} must lie in [0, 1]")
        self.checkpoint_blocks = num_checkpointed_blocks(fraction, len(self.blocks))

    def _rope(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        return (self.rope_sin, self.rope_cos) if self.cfg.rope else None

    def run_blocks(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        checkpointing = self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if checkpointing and i < self.checkpoint_blocks:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return x

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: normalized images (B, 3, H, W); mask: bool (B, N), True = replace by mask_token.
        Returns tokens after the final norm, (B, 1 + N, D)."""
        x = self.patch_embed(x)                                               # (B, N, D)
        B = x.shape[0]
        if mask is not None:
            if mask.shape != (B, self.num_patches):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({B}, {self.num_patches})")
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.to(x.dtype).expand(B, -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.run_blocks(x, self._rope()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature: the cls token after the final norm, (B, D)."""
        return self.forward_features(x)[:, 0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # weights saved at another image size: resize the position table on load (bicubic, like timm)
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = resize_pos_embed(state_dict[key], self.grid_size, self.num_prefix_tokens)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def no_weight_decay_names(self) -> List[str]:
        """Parameter names that take no weight decay: biases, norms, tokens and position tables."""
        return [name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token"))]


class EvaForMIM(EVA):
    """EVA-01 masked image modeling: masked patches become `mask_token` in the encoder; the final
    norm -> `lm_head` Linear(D -> teacher_dim) predicts the teacher's features at masked patches."""

    def __init__(self, cfg: EvaConfig, img_size: Optional[int], teacher_dim: int, drop_path_rate: float = 0.0):
        super().__init__(cfg, img_size, drop_path_rate)
        self.mask_token = _trunc_normal_param(1, 1, cfg.embed_dim)
        self.lm_head = InitLinear(cfg.embed_dim, teacher_dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With mask: (M, teacher_dim) predictions at masked patches, row-major order of `mask`
        (M = mask.sum()). Without: the pooled backbone feature (B, D), e.g. for kNN monitoring."""
        if mask is None:
            return super().forward(x)
        tokens = self.forward_features(x, mask, self.mask_token)            # (B, 1+N, D)
        return self.lm_head(tokens[:, 1:][mask])                            # (M, teacher_dim)
