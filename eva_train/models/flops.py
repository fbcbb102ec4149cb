"""Analytic FLOPs per image (a multiply-add counts 2 FLOPs), used for MFU (eva_train/plan/gpus.py).

Counted: patch embedding, qkv / proj, the two attention matmuls (q k^T and attn v), the MLP or
SwiGLU matmuls and the heads. Not counted: norms, softmax, activations, RoPE, biases (under 1% at
EVA sizes). mmpretrain's "Flops (G)" are multiply-adds: EVA-g/14 at 224 is 267.2 GMACs = 534 GFLOPs.
A training step costs the forward 3x (forward + backward twice its size), plus one more forward of
the checkpointed blocks (recomputed in backward), plus the teacher's forward.
"""

from eva_train.models.variants import VARIANTS, EvaConfig, num_checkpointed_blocks


def mlp_macs_per_token(cfg: EvaConfig) -> int:
    matmuls = 3 if cfg.swiglu else 2  # SwiGLU: gate, value, out
    return matmuls * cfg.embed_dim * cfg.mlp_hidden_dim


def block_flops(num_tokens: int, width: int, mlp_macs: int) -> float:
    """One pre-LN transformer block over `num_tokens` tokens."""
    linear_macs = num_tokens * (4 * width * width + mlp_macs)  # qkv (3 D^2) + proj (D^2) + MLP
    attention_macs = 2 * num_tokens * num_tokens * width  # q k^T and attn v, all heads
    return 2.0 * (linear_macs + attention_macs)


def patch_embed_flops(num_patches: int, patch_size: int, width: int, in_chans: int = 3) -> float:
    return 2.0 * num_patches * in_chans * patch_size * patch_size * width


def transformer_forward_flops(
    num_patches: int, num_prefix_tokens: int, width: int, depth: int, mlp_macs: int, patch_size: int
) -> float:
    """Patch embedding + `depth` blocks over all patches and the prefix (cls) tokens."""
    return patch_embed_flops(num_patches, patch_size, width) + depth * block_flops(
        num_patches + num_prefix_tokens, width, mlp_macs
    )


def forward_flops(
    variant: str, img_size: int | None = None, num_masked_patches: int = 0, teacher_dim: int = 0
) -> float:
    """Backbone forward FLOPs per image, plus the MIM head on the masked patches when teacher_dim > 0."""
    cfg = VARIANTS[variant]
    grid = (img_size or cfg.default_img_size) // cfg.patch_size
    body = transformer_forward_flops(grid * grid, 1, cfg.embed_dim, cfg.depth, mlp_macs_per_token(cfg), cfg.patch_size)
    return body + 2.0 * num_masked_patches * cfg.embed_dim * teacher_dim


def _mae_forward_flops(model_cfg, cfg: EvaConfig, grid: int, num_masked: int, teacher_dim: int) -> float:
    n = grid * grid
    visible_tokens = 1 + n - num_masked
    width = model_cfg.decoder_width
    encoder = patch_embed_flops(n, cfg.patch_size, cfg.embed_dim) + cfg.depth * block_flops(
        visible_tokens, cfg.embed_dim, mlp_macs_per_token(cfg)
    )
    decoder = (
        2.0 * visible_tokens * cfg.embed_dim * width
        + model_cfg.decoder_depth * block_flops(1 + n, width, 2 * width * 4 * width)
        + 2.0 * num_masked * width * teacher_dim
    )
    return encoder + decoder


def student_forward_flops(model_cfg, teacher_dim: int, num_masked_patches: int) -> float:
    """Forward FLOPs per image of `build_model(model_cfg, teacher_dim)` with that many masked patches."""
    cfg = VARIANTS[model_cfg.variant]
    grid = model_cfg.img_size // cfg.patch_size
    if model_cfg.mode == "mae":
        return _mae_forward_flops(model_cfg, cfg, grid, num_masked_patches, teacher_dim)
    return forward_flops(model_cfg.variant, model_cfg.img_size, num_masked_patches, teacher_dim)


def recompute_flops(model_cfg, num_masked_patches: int) -> float:
    """The extra forward of the checkpointed blocks that backward recomputes."""
    cfg = VARIANTS[model_cfg.variant]
    grid = model_cfg.img_size // cfg.patch_size
    tokens = 1 + grid * grid - (num_masked_patches if model_cfg.mode == "mae" else 0)
    checkpointed = num_checkpointed_blocks(model_cfg.checkpoint_fraction, cfg.depth)
    return checkpointed * block_flops(tokens, cfg.embed_dim, mlp_macs_per_token(cfg))


def train_flops_per_image(model_cfg, teacher_forward_flops: float, teacher_dim: int, num_masked_patches: int) -> float:
    """Model FLOPs of one training image: 3x the student forward + recomputation + the teacher
    forward (`Teacher.forward_flops_per_image()`)."""
    student = student_forward_flops(model_cfg, teacher_dim, num_masked_patches)
    return 3.0 * student + recompute_flops(model_cfg, num_masked_patches) + teacher_forward_flops
