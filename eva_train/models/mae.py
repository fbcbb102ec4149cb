"""MAE-style EVA (mmpretrain `eva-mae-style`): the encoder sees only visible patches, a light
decoder fills in a mask token at masked positions and regresses the teacher's features there.

The encoder is the EVA backbone (same state-dict names); every MAE-only tensor starts with
`decoder`, so a timm filter drops them like EVA-01's `mask_token`/`lm_head`. Differences from MAE:
the decoder position table is learned (MAE fixes it to 2D sin-cos) and the decoder blocks use
EVA's init; the sizes and so the parameter count are MAE's.
"""

import dataclasses

import torch
import torch.nn as nn

from eva_train.models.blocks import Block, InitLinear, LayerNorm
from eva_train.models.eva import EVA, _trunc_normal_param
from eva_train.models.variants import EvaConfig


def decoder_config(encoder: EvaConfig, width: int, depth: int, num_heads: int) -> EvaConfig:
    """MAE decoder blocks: plain ViT blocks (GELU MLP x4, full qkv bias)."""
    if width % num_heads:
        raise ValueError(f"model.decoder_width={width} is not divisible by model.decoder_heads={num_heads}")
    return dataclasses.replace(
        encoder,
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        mlp_hidden_dim=4 * width,
        qkv_bias=False,
        k_bias=True,
        qkv_fused=True,
        swiglu=False,
        sub_ln=False,
        rope=False,
        scale_attn_inner=False,
    )


class EvaForMAE(EVA):
    position_tables = ("pos_embed", "decoder_pos_embed")

    def __init__(
        self,
        cfg: EvaConfig,
        img_size: int | None,
        teacher_dim: int,
        drop_path_rate: float = 0.0,
        decoder_depth: int = 8,
        decoder_width: int = 512,
        decoder_heads: int = 16,
    ):
        if cfg.rope:
            raise ValueError(
                "model.mode=mae does not support RoPE variants (EVA-02); use an EVA-01 variant "
                "such as eva_mae_b16 or model.mode=mim"
            )
        super().__init__(cfg, img_size, drop_path_rate)
        dec = decoder_config(cfg, decoder_width, decoder_depth, decoder_heads)
        self.decoder_embed = InitLinear(cfg.embed_dim, decoder_width)
        self.decoder_mask_token = _trunc_normal_param(1, 1, decoder_width)
        self.decoder_pos_embed = _trunc_normal_param(1, 1 + self.num_patches, decoder_width)
        self.decoder_blocks = nn.ModuleList([Block(dec, i, 0.0) for i in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_width, cfg.norm_eps)
        self.decoder_pred = InitLinear(decoder_width, teacher_dim)

    def _encode_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, N, D)
        visible = tokens[keep].view(B, -1, self.embed_dim)  # (B, Nv, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(visible.dtype).expand(B, -1, -1)
        return self.norm(self.run_blocks(torch.cat([cls, visible], dim=1)))  # (B, 1+Nv, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """With mask (B, N) bool holding the same count per sample: (M, teacher_dim) predictions
        at masked patches, row-major order of `mask`. Without: pooled backbone feature (B, D)."""
        if mask is None:
            return super().forward(x)
        B = x.shape[0]
        if self.patch_embed.grid_for(*x.shape[-2:]) != self.grid_size:
            raise ValueError(
                f"MAE pretraining takes images of the model's size {self.img_size[0]}x{self.img_size[1]}, "
                f"got {tuple(x.shape[-2:])}; crop to that size or call set_input_size first"
            )
        if mask.shape != (B, self.num_patches):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({B}, {self.num_patches})")
        masked_per_sample = mask.sum(dim=1)
        if bool((masked_per_sample != masked_per_sample[0]).any()):
            raise ValueError(
                "model.mode=mae needs the same number of masked patches in every sample; use mask.strategy=random"
            )
        keep = ~mask
        h = self.decoder_embed(self._encode_visible(x, keep))  # (B, 1+Nv, Dd)
        width = h.shape[-1]
        full = self.decoder_mask_token.to(h.dtype).expand(B, self.num_patches, width)
        full = full.masked_scatter(keep.unsqueeze(-1), h[:, 1:])  # visible rows in row-major order
        full = torch.cat([h[:, :1], full], dim=1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        for block in self.decoder_blocks:
            full = block(full)
        return self.decoder_pred(self.decoder_norm(full)[:, 1:][mask])  # (M, teacher_dim)
