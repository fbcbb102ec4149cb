"""Crop geometry for training and the ONE evaluation preprocessing, with the input normalization.

Training: RandomResizedCrop parameters (torchvision's algorithm, our RNG). Boxes are (left, top,
right, bottom) in pixels of the upright (EXIF-rotated) image, chosen from the header's size before
decoding so the JPEG decoder can be told how much it may downscale (draft mode) without losing
resolution inside the crop. Our own code here because torchvision draws from torch's global RNG
and needs the decoded image; we need a per-sample RNG and the box before decoding.

Evaluation (`EvalTransform`): pretraining validation, the kNN monitor, linear probe, fine-tune
evaluation, `predict` and `extract_feat` all call it, so one checkpoint scores the same in every
tool. It is torchvision's Resize(floor(size / crop_pct), bicubic, antialias) + CenterCrop(size) on
uint8 tensors (deterministic; timm's and MAE's evaluation crop).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
EVAL_CROP_PCT = 0.875  # 224 of 256: the usual ImageNet evaluation crop
# The student's input normalization (ImageNet statistics, as timm's EVA models); the teacher applies
# its own CLIP statistics inside models/teacher.py.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """uint8 (3, H, W) upright RGB -> uint8 (3, size, size): shorter side resized to
    floor(size / crop_pct) (bicubic, antialiased), then the center size x size crop. A (height, width)
    size: the image is scaled (aspect kept) to just cover floor(height / crop_pct) x floor(width /
    crop_pct), then center-cropped to height x width."""

    size: int | tuple[int, int]
    crop_pct: float = EVAL_CROP_PCT

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = (self.size, self.size) if isinstance(self.size, int) else self.size
        cover_h, cover_w = math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)
        if height == width:
            resize_to = [cover_h]  # torchvision's shorter-side resize
        else:
            scale = max(cover_h / image.shape[-2], cover_w / image.shape[-1])
            resize_to = [max(cover_h, round(image.shape[-2] * scale)), max(cover_w, round(image.shape[-1] * scale))]
        resized = TF.resize(image, resize_to, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(resized, [height, width]).contiguous()


def normalize_images(
    images: torch.Tensor, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """(B, 3, H, W) pixel values in [0, 255] (uint8 or float) -> ImageNet-normalized `dtype` on
    `device` (default: where the images are), computed in fp32."""
    x = images.to(device if device is not None else images.device, non_blocking=True).float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x - mean) / std).to(dtype)


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
