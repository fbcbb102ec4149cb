"""Feature extraction API: a consolidated file -> eval-mode backbone -> patch and pooled features.

  model = get_model("eva.safetensors", device="cuda")
  feats = extract_feat(model, ["a.jpg", "b.png"])        # or a uint8 (B, 3, H, W) tensor
  feats["pooled"]  # (B, D): cls token after the final norm (EVA.forward)
  feats["patch"]   # (B, N, D): patch tokens after the final norm, row-major grid
"""
import json
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from eva_train.data.decode import load_rgb
from eva_train.data.sources import is_image_name
from eva_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, normalize_images  # noqa: F401 (MEAN/STD: public here too)

ImageInput = Union[torch.Tensor, Sequence[Union[str, "PIL.Image.Image"]]]  # noqa: F821


def get_model(path: str, variant: Optional[str] = None, img_size: Optional[int] = None,
              device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The EVA backbone in eval mode with the file's weights (any layout `eva_train.export.weights` reads).
    `variant` / `img_size` default to the file's eva-train config metadata."""
    from eva_train.models import build_backbone
    from eva_train.export.weights import load_weights, read_state_dict

    config = _file_model_config(path)
    variant = variant or config.get("variant")
    if not variant:
        raise ValueError(f"{path} has no eva-train config metadata; pass variant= (e.g. eva02_l_p14)")
    model = build_backbone(variant, img_size or config.get("img_size"))
    report = load_weights(model, read_state_dict(path))
    if report.missing or report.mismatched:
        raise ValueError(f"{path} does not fit {variant}: {report.summary()}")
    return model.to(device=device, dtype=dtype).eval()


def _file_model_config(path: str) -> dict:
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata["config"]).get("model", {}) if "config" in metadata else {}


@torch.no_grad()
def extract_feat(model: nn.Module, images: ImageInput, batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """Patch (B, N, D) and pooled (B, D) features, on the model's device, in fp32.
    `images`: uint8 (B, 3, H, W) at the model's size, float (B, 3, H, W) in [0, 1], or a list
    of image files / PIL images (through `EvalTransform`, the preprocessing of every eval tool)."""
    param = next(model.parameters())
    img_size = model.patch_embed.img_size
    pixels = _to_pixels(images, img_size)                                     # (B, 3, H, W) in [0, 255]
    patches, pooled = [], []
    for start in range(0, pixels.shape[0], batch_size):
        batch = normalize_images(pixels[start:start + batch_size], param.dtype, param.device)
        tokens = model.forward_features(batch).float()                        # (b, 1 + N, D)
        pooled.append(tokens[:, 0])
        patches.append(tokens[:, model.num_prefix_tokens:])
    return {"patch": torch.cat(patches), "pooled": torch.cat(pooled)}


def _to_pixels(images: ImageInput, img_size: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images tensor has shape {tuple(images.shape)}; expected (B, 3, H, W)")
        if tuple(images.shape[-2:]) != (img_size, img_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model takes {img_size}x{img_size}; "
                             f"pass files/PIL images to resize them, or resize first")
        return images if images.dtype == torch.uint8 else images.float() * 255.0
    transform = EvalTransform(img_size)
    return torch.stack([transform(load_rgb(item)) for item in images])


def list_image_files(folder: str) -> List[str]:
    """Image files in a folder (sorted), for `extract_feat(model, list_image_files(dir))`."""
    import os

    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_image_name(f))
