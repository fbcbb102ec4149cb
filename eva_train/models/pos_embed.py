"""Position embeddings: resizing learned absolute tables and building EVA-02's 2D RoPE tables."""
import math
from typing import Tuple

import torch
import torch.nn.functional as F


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resize of a (1, prefix + g*g, D) table to (1, prefix + new_grid**2, D), like timm's
    `resample_abs_pos_embed`; prefix (cls) rows are kept as they are."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(patches.shape[1])
    if old_grid * old_grid != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch rows, not a square grid; "
                         f"check num_prefix_tokens={num_prefix_tokens}")
    if old_grid == new_grid:
        return pos_embed
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def rope_sin_cos(grid: int, head_dim: int, ref_grid: int, temperature: float = 10000.0,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """EVA-02 2D RoPE tables, each (grid*grid, head_dim), row-major patches.

    timm `RotaryEmbeddingCat(in_pixels=False, ref_feat_shape)` layout: head_dim/4 frequencies
    1/T^(i/(head_dim/4)); per patch the row angles then the column angles (head_dim/2 values),
    each repeated twice for the pairwise-interleaved rotation. Positions are rescaled so the grid
    spans `ref_grid` (the pretraining grid), which keeps angles stable across image sizes.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}; change embed_dim/num_heads")
    num_bands = head_dim // 4
    bands = 1.0 / temperature ** (torch.arange(num_bands, dtype=torch.float32, device=device) / num_bands)
    pos = torch.arange(grid, dtype=torch.float32, device=device) / grid * ref_grid        # (g,)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")                                  # (g, g) each
    coords = torch.stack([rows, cols], dim=-1).reshape(grid * grid, 2)                   # (N, 2)
    angles = (coords[:, :, None] * bands).reshape(grid * grid, 2 * num_bands)            # (N, hd/2)
    angles = angles.repeat_interleave(2, dim=-1)                                          # (N, hd)
    return angles.sin(), angles.cos()
