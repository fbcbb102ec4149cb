"""Patch masks for masked image modeling, made in the data workers (as DINOv2 does).

`BlockMaskGenerator` follows BEiT's block-wise scheme: rectangles of random area and aspect are
added until the target count is reached. BEiT can stop a few patches short when no rectangle
fits; we top up with random single patches so every mask has exactly `num_masking_patches`
(static shapes on the device: B * num_masking_patches predictions every step).
"""

import math

import numpy as np

REFERENCE_GRID_PATCHES = 256  # the config's mask counts are given for a 16x16 grid (224/14)
BLOCK_ATTEMPTS = 10


class BlockMaskGenerator:
    def __init__(self, grid_hw, num_masking_patches, min_block_patches=16, min_aspect=0.3):
        self.height, self.width = grid_hw
        num_patches = self.height * self.width
        if not 0 < num_masking_patches < num_patches:
            raise ValueError(f"num_masking_patches={num_masking_patches} must lie in (0, {num_patches})")
        self.num_masking_patches = int(num_masking_patches)
        self.min_block_patches = max(1, int(min_block_patches))
        self.log_aspect_range = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try to mask one rectangle adding 1..max_new patches; return how many were added."""
        draws = rng.random((BLOCK_ATTEMPTS, 4)).tolist()  # one RNG call: per-call overhead dominates here
        low, high = self.min_block_patches, max(self.min_block_patches, max_new)
        log_low, log_high = self.log_aspect_range
        for u_area, u_aspect, u_top, u_left in draws:
            target_area = low + (high - low) * u_area
            aspect = math.exp(log_low + (log_high - log_low) * u_aspect)
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = int(u_top * (self.height - h + 1))
            left = int(u_left * (self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_new:
                block[...] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            added = self._add_block(mask, self.num_masking_patches - count, rng)
            if added == 0:
                break
            count += added
        mask = mask.reshape(-1)
        if count < self.num_masking_patches:  # top up (see module docstring)
            free = np.flatnonzero(~mask)
            mask[rng.choice(free, self.num_masking_patches - count, replace=False)] = True
        return mask


class RandomMaskGenerator:
    """Exactly `num_masking_patches` patches chosen uniformly (MAE-style)."""

    def __init__(self, grid_hw, num_masking_patches):
        self.num_patches = grid_hw[0] * grid_hw[1]
        if not 0 < num_masking_patches < self.num_patches:
            raise ValueError(f"num_masking_patches={num_masking_patches} must lie in (0, {self.num_patches})")
        self.num_masking_patches = int(num_masking_patches)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.choice(self.num_patches, self.num_masking_patches, replace=False)] = True
        return mask


def scaled_patch_count(count_at_reference: int, grid_hw) -> int:
    """A patch count given for a 16x16 grid, scaled by area to `grid_hw` (at least 1)."""
    num_patches = grid_hw[0] * grid_hw[1]
    return max(1, min(num_patches - 1, int(round(count_at_reference * num_patches / REFERENCE_GRID_PATCHES))))


def build_mask_generator(mask_cfg, grid_hw):
    num_masking = scaled_patch_count(mask_cfg.num_masking_patches, grid_hw)
    if mask_cfg.strategy == "block":
        min_block = scaled_patch_count(mask_cfg.min_block_patches, grid_hw)
        return BlockMaskGenerator(grid_hw, num_masking, min_block, mask_cfg.min_aspect)
    if mask_cfg.strategy == "random":
        return RandomMaskGenerator(grid_hw, num_masking)
    raise ValueError(f"mask.strategy '{mask_cfg.strategy}' is unknown; use block or random")
