"""Position embeddings: resampling learned absolute tables and building EVA-02's 2D RoPE tables,
for any (rows, cols) patch grid."""

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Union

import torch
import torch.nn.functional as F

Grid = Union[int, tuple[int, int]]


def as_hw(size: Grid) -> tuple[int, int]:
    """An int (square) or (h, w) pair -> (h, w) of ints."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: Grid, num_prefix_tokens: int = 1, old_grid: Grid | None = None
) -> torch.Tensor:
    """Resample a (1, prefix + h*w, D) table to the `new_grid` (rows, cols): bicubic with
    antialiasing in fp32, like timm's `resample_abs_pos_embed`; prefix (cls) rows are kept as
    they are. `old_grid` defaults to `infer_grid(rows, like=new_grid)`. The one resize used
    by the model (dynamic sizes, `set_input_size`, state-dict loading) and the weight importer."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    new_h, new_w = as_hw(new_grid)
    if old_grid is None:
        old_h, old_w = infer_grid(patches.shape[1], (new_h, new_w), num_prefix_tokens)
    else:
        old_h, old_w = as_hw(old_grid)
    if old_h * old_w != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch rows, not a {old_h}x{old_w} grid")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def infer_grid(num_patch_rows: int, like: Grid, num_prefix_tokens: int = 1) -> tuple[int, int]:
    """The (rows, cols) grid a table of `num_patch_rows` rows was saved at: square if it can be,
    else the aspect of `like` (weights saved after `set_input_size` to a non-square size)."""
    side = math.isqrt(num_patch_rows)
    if side * side == num_patch_rows:
        return side, side
    h, w = as_hw(like)
    unit_h, unit_w = h // math.gcd(h, w), w // math.gcd(h, w)
    scale = math.isqrt(num_patch_rows // (unit_h * unit_w))
    if unit_h * unit_w * scale * scale == num_patch_rows:
        return unit_h * scale, unit_w * scale
    aspect = f" nor a {h}:{w} one" if h != w else ""
    raise ValueError(
        f"pos_embed has {num_patch_rows} patch rows, not a square grid{aspect}; check "
        f"num_prefix_tokens={num_prefix_tokens}, or build the model at the size the weights were "
        f"saved at, load them, then call set_input_size"
    )


def rope_sin_cos(
    grid: Grid, head_dim: int, ref_grid: Grid, temperature: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02 2D RoPE tables for a (rows, cols) grid, each (rows*cols, head_dim), row-major patches.

    timm `RotaryEmbeddingCat(in_pixels=False, ref_feat_shape)` layout: head_dim/4 frequencies
    1/T^(i/(head_dim/4)); per patch the row angles then the column angles (head_dim/2 values),
    each repeated twice for the pairwise-interleaved rotation. Each axis is rescaled to span the
    `ref_grid` (the pretraining grid), which keeps angles stable across image sizes and aspects.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}; change embed_dim/num_heads")
    (rows, cols), (ref_rows, ref_cols) = as_hw(grid), as_hw(ref_grid)
    num_bands = head_dim // 4
    bands = 1.0 / temperature ** (torch.arange(num_bands, dtype=torch.float32, device=device) / num_bands)
    row_pos = torch.arange(rows, dtype=torch.float32, device=device) / rows * ref_rows  # (rows,)
    col_pos = torch.arange(cols, dtype=torch.float32, device=device) / cols * ref_cols  # (cols,)
    r, c = torch.meshgrid(row_pos, col_pos, indexing="ij")  # (rows, cols) each
    coords = torch.stack([r, c], dim=-1).reshape(rows * cols, 2)  # (N, 2)
    angles = (coords[:, :, None] * bands).reshape(rows * cols, 2 * num_bands)  # (N, hd/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (N, hd)
    return angles.sin(), angles.cos()


class GridCache:
    """Values computed per patch grid (resampled tables, RoPE tables), each reused while the
    `stamp` it was computed from (device, dtype, weight version) still holds; the `max_grids`
    most recently used grids are kept."""

    def __init__(self, max_grids: int = 8):
        self.max_grids = max_grids
        self._entries: OrderedDict[tuple[int, int], tuple[Hashable, object]] = OrderedDict()

    def get(self, grid: tuple[int, int], stamp: Hashable, compute: Callable[[], object]):
        entry = self._entries.get(grid)
        if entry is None or entry[0] != stamp:
            entry = (stamp, compute())
            self._entries[grid] = entry
        self._entries.move_to_end(grid)
        while len(self._entries) > self.max_grids:
            self._entries.popitem(last=False)
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
