"""Crop geometry: RandomResizedCrop parameters (torchvision's algorithm, our RNG) and the val crop.

Boxes are (left, top, right, bottom) in pixels of the upright (EXIF-rotated) image. They are
chosen from the header's size before decoding so the JPEG decoder can be told how much it may
downscale (draft mode) without losing resolution inside the crop.
"""
import math

import numpy as np

RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
VAL_CROP_FRACTION = 0.875  # resize-then-center-crop as in the usual 224/256 evaluation


def random_resized_crop_box(width: int, height: int, scale_range, rng: np.random.Generator):
    area = width * height
    log_ratio = (math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale_range)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * ratio)))
        h = int(round(math.sqrt(target_area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # fallback: the largest centered crop whose aspect lies in the ratio range
    in_ratio = width / height
    if in_ratio < RATIO_RANGE[0]:
        w, h = width, int(round(width / RATIO_RANGE[0]))
    elif in_ratio > RATIO_RANGE[1]:
        w, h = int(round(height * RATIO_RANGE[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, crop_fraction: float = VAL_CROP_FRACTION):
    side = max(1, int(round(min(width, height) * crop_fraction)))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side
