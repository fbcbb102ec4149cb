"""Feature extraction API: a consolidated file -> eval-mode backbone -> patch and pooled features.

model = get_model("eva.safetensors", device="cuda")
feats = extract_feat(model, ["a.jpg", "b.png"])        # or a uint8 (B, 3, H, W) tensor, any size
feats["pooled"]  # (B, D): cls token after the final norm (EVA.forward)
feats["patch"]   # (B, N, D): patch tokens after the final norm, row-major grid
feats["grid"]    # (B, 2): (rows, cols) of each image's patch grid
extract_feat(model, files, img_size=336, keep_aspect=True)  # no square crop; "patch" a list
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.nn as nn

from eva_train.data.decode import load_rgb
from eva_train.data.sources import is_image_name
from eva_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, normalize_images  # noqa: F401 (MEAN/STD: public here too)
from eva_train.export.safetensors_writer import read_metadata
from eva_train.export.weights import load_weights, read_state_dict
from eva_train.models import build_backbone
from eva_train.models.variants import VARIANTS

ImageInput = Union[torch.Tensor, Sequence[Union[str, "PIL.Image.Image"]]]  # noqa: F821


def get_model(
    path: str,
    variant: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The EVA backbone in eval mode with the file's weights (any layout `eva_train.export.weights` reads).
    `variant` / `img_size` (int or (H, W)) default to the file's eva-train config metadata, else the
    size its square position table was saved at; a table of another size is resampled on load. The
    model runs at any size either way (`extract_feat`)."""
    config = _file_model_config(path)
    variant = variant or config.get("variant")
    if not variant:
        raise ValueError(f"{path} has no eva-train config metadata; pass variant= (e.g. eva02_l_p14)")
    state_dict = read_state_dict(path)
    if not (img_size or config.get("img_size")) and variant in VARIANTS:
        img_size = saved_img_size(state_dict, VARIANTS[variant].patch_size)
    model = build_backbone(variant, img_size or config.get("img_size"))
    report = load_weights(model, state_dict)
    if report.missing or report.mismatched or report.unexpected:
        raise ValueError(f"{path} does not fit {variant}: {report.summary()}")
    return model.to(device=device, dtype=dtype).eval()


def saved_img_size(state_dict: dict[str, torch.Tensor], patch_size: int) -> int | None:
    """The image side a file's backbone position table (any layout's `...pos_embed`, (1, 1 + g*g, D))
    was saved at, or None when there is none or it is not square."""
    for key, table in state_dict.items():
        if key.endswith("pos_embed") and "decoder" not in key and table.ndim == 3:
            side = math.isqrt(table.shape[1] - 1)
            return side * patch_size if side * side == table.shape[1] - 1 else None
    return None


def _file_model_config(path: str) -> dict:
    metadata = read_metadata(path)
    return json.loads(metadata["config"]).get("model", {}) if "config" in metadata else {}


@torch.no_grad()
def extract_feat(
    model: nn.Module,
    images: ImageInput,
    batch_size: int = 64,
    img_size: int | tuple[int, int] | None = None,
    keep_aspect: bool = False,
) -> dict[str, Any]:
    """Features on the model's device in fp32: "pooled" (B, D), "patch" (B, N, D) (row-major grid)
    and "grid" (B, 2), each image's (rows, cols) of patches.

    `images`: a uint8 (B, 3, H, W) tensor or float one in [0, 1], used at its own size (any H, W
    that are multiples of the patch size); or a list of image files / PIL images / uint8 (3, H, W)
    tensors, brought through `EvalTransform` (the preprocessing of every eval tool) to `img_size`,
    an int or (H, W) (default: the model's set-up size). `keep_aspect=True` keeps each image's
    aspect instead: shorter side resized to `img_size` (one int; default the model's shorter side),
    the sides center-cropped down to multiples of the patch size; images of one size are batched
    together and "patch" is a list of (N_i, D)."""
    if isinstance(images, torch.Tensor):
        groups = [(list(range(images.shape[0])), _tensor_pixels(images))]
    else:
        default = min(model.img_size) if keep_aspect else tuple(model.img_size)
        groups = preprocess_groups(images, img_size or default, model.patch_size, keep_aspect)
    param = next(model.parameters())
    count = sum(len(indices) for indices, _ in groups)
    pooled, patches, grids = [None] * count, [None] * count, [None] * count
    for indices, pixels in groups:
        grid = model.patch_embed.grid_for(*pixels.shape[-2:])
        for start in range(0, len(indices), batch_size):
            batch = normalize_images(pixels[start : start + batch_size], param.dtype, param.device)
            tokens = model.forward_features(batch).float()  # (b, 1 + N, D)
            for row, index in enumerate(indices[start : start + batch_size]):
                pooled[index], patches[index] = tokens[row, 0], tokens[row, model.num_prefix_tokens :]
                grids[index] = grid
    return {
        "pooled": torch.stack(pooled),
        "patch": patches if keep_aspect else torch.stack(patches),
        "grid": torch.tensor(grids, dtype=torch.long).view(count, 2),
    }


def _tensor_pixels(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images tensor has shape {tuple(images.shape)}; expected (B, 3, H, W)")
    return images if images.dtype == torch.uint8 else images.float() * 255.0


def preprocess_groups(
    images: Sequence, size: int | tuple[int, int], patch_size: int, keep_aspect: bool = False
) -> list[tuple[list[int], torch.Tensor]]:
    """Image files / PIL images / uint8 (3, H, W) tensors through `EvalTransform` as `extract_feat`
    describes -> [(indices into `images`, uint8 (b, 3, H, W))], one group per output size."""
    if not images:
        raise ValueError("no images given")
    sides = (size,) if isinstance(size, int) else tuple(size)
    if any(not isinstance(side, int) or side < patch_size or side % patch_size for side in sides) or (
        keep_aspect and len(sides) != 1
    ):
        raise ValueError(
            f"img_size={size!r}: give {'one int, the shorter side' if keep_aspect else 'an int or (H, W)'}"
            f" made of multiples of the patch size {patch_size}"
        )
    if not keep_aspect:
        transform = EvalTransform(size)
        return [(list(range(len(images))), torch.stack([transform(load_rgb(item)) for item in images]))]
    by_size: dict[tuple[int, int], list] = {}
    for index, item in enumerate(images):
        pixels = load_rgb(item)
        target = aspect_kept_size(*pixels.shape[-2:], size, patch_size)
        # crop_pct=1: the whole image is kept; the crop only trims the sides to patch multiples
        by_size.setdefault(target, []).append((index, EvalTransform(target, crop_pct=1.0)(pixels)))
    return [([i for i, _ in group], torch.stack([p for _, p in group])) for group in by_size.values()]


def aspect_kept_size(height: int, width: int, short_side: int, patch_size: int) -> tuple[int, int]:
    """(H, W) for a `height` x `width` image with its shorter side scaled to `short_side` and the
    longer one scaled alike, then floored to a multiple of the patch size."""
    scaled_long = int(max(height, width) * short_side / min(height, width))
    long_side = max(patch_size, scaled_long // patch_size * patch_size)
    return (short_side, long_side) if height <= width else (long_side, short_side)


def list_image_files(folder: str) -> list[str]:
    """Image files in a folder (sorted), for `extract_feat(model, list_image_files(dir))`."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_image_name(f))
