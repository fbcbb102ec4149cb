"""One flat table: variant name -> architecture.

Kept free of torch so that `eva_train.config.validate` can import it cheaply. Numbers follow the
EVA (EVA-01) and EVA-02 papers as defined in timm's `eva.py`; the parameter counts are pinned
by tests/test_models.py.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class EvaConfig:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden_dim: int
    default_img_size: int = 224
    qkv_bias: bool = True  # learned q and v biases (k bias fixed at zero), EVA/BEiT style
    k_bias: bool = False  # a full learned qkv bias instead (`attn.qkv.bias`: timm VisionTransformer keys)
    qkv_fused: bool = True  # one qkv Linear; False = q_proj/k_proj/v_proj (timm's EVA-02 B/L layout)
    swiglu: bool = False  # SwiGLU MLP (EVA-02) instead of GELU
    sub_ln: bool = False  # LayerNorm inside the SwiGLU before fc2 (EVA-02 B/L)
    rope: bool = False  # 2D RoPE on patch tokens (EVA-02)
    scale_attn_inner: bool = False  # LayerNorm `attn.norm` before attn.proj (EVA02-CLIP towers; timm's name)
    rope_temperature: float = 10000.0
    rope_ref_img_size: int = 0  # image size whose grid RoPE positions span; 0 = default_img_size (see below)
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def rope_ref_grid(self) -> int:
        # EVA-02 scales RoPE positions so any grid spans the pretraining grid (timm `ref_feat_shape`);
        # EVA02-CLIP B/16 keeps the 14-px model's 16x16 reference at patch 16 (rope_ref_img_size=256)
        return (self.rope_ref_img_size or self.default_img_size) // self.patch_size


def num_checkpointed_blocks(fraction: float, depth: int) -> int:
    """Blocks run under activation checkpointing for a fraction of the depth (round half up)."""
    return int(fraction * depth + 0.5)


def _eva02(embed_dim: int, depth: int, num_heads: int, large: bool, **kw) -> EvaConfig:
    """EVA-02: SwiGLU with hidden = embed * 4 * 2/3 (truncated, as timm's int()), RoPE; B/L add
    sub-LN and separate q/k/v projections."""
    kw.setdefault("patch_size", 14)
    return EvaConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_hidden_dim=int(embed_dim * 4 * 2 / 3),
        swiglu=True,
        rope=True,
        sub_ln=large,
        qkv_fused=not large,
        **kw,
    )


VARIANTS: dict[str, EvaConfig] = {
    # EVA-01 (BEiT-style ViT, GELU MLP, q/v bias, learned absolute position embedding)
    "eva_g_p14": EvaConfig(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_hidden_dim=6144),
    "eva_g_p16": EvaConfig(patch_size=16, embed_dim=1408, depth=40, num_heads=16, mlp_hidden_dim=6144),
    # EVA-L/14 (mmpretrain `eva-l`, layer_cfgs bias=True): full qkv bias, so 303.18M, not 303.15M
    "eva_l_p14": EvaConfig(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096, qkv_bias=False, k_bias=True
    ),
    "eva_b_p16": EvaConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072),
    # EVA-02
    "eva02_ti_p14": _eva02(192, 12, 3, large=False),
    "eva02_s_p14": _eva02(384, 12, 6, large=False),
    "eva02_b_p14": _eva02(768, 12, 12, large=True),
    "eva02_l_p14": _eva02(1024, 24, 16, large=True),
    # MAE-style EVA (mmpretrain eva-mae-style): a plain ViT-B/16 encoder, full qkv bias
    "eva_mae_b16": EvaConfig(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072, qkv_bias=False, k_bias=True
    ),
    # debug sizes: the CPU demo (trains in minutes on 2 cores) and unit tests
    "eva_demo_p8": EvaConfig(
        patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_hidden_dim=512, default_img_size=64
    ),
    "eva02_demo_p8": _eva02(128, 4, 4, large=True, patch_size=8, default_img_size=64),
    "eva_debug_p4": EvaConfig(
        patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=128, default_img_size=16
    ),
    "eva02_debug_p4": _eva02(32, 2, 2, large=True, patch_size=4, default_img_size=16),
}
