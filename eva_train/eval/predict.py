"""Top-k class names and probabilities from a classifier file (tools/finetune.py or
tools/linear_probe.py output); for a pretrained backbone file use `eva_train.export.inference`
(`get_model` + `extract_feat`).

    predictor = Predictor("outputs/finetune/classifier.safetensors")
    predictor(["cat.jpg", "dog.png"], top_k=3)   # [[("cat", 0.91), ("lynx", 0.05), ...], ...]
"""

from collections.abc import Sequence
from typing import Union

import torch
from PIL import Image

from eva_train.data.transforms import normalize_images
from eva_train.eval.checkpoints import load_classifier
from eva_train.export.inference import preprocess_groups

ImageLike = Union[str, Image.Image, torch.Tensor]


def images_to_uint8(images: Sequence[ImageLike], img_size: int) -> torch.Tensor:
    """Files / PIL images / uint8 (3,H,W) tensors -> uint8 (B,3,img,img) through `EvalTransform`,
    exactly like the evaluation loaders (what `Predictor` does without keep_aspect)."""
    return preprocess_groups(images, img_size, patch_size=1)[0][1]  # square crops: one group


class Predictor:
    def __init__(self, checkpoint: str, device: str | torch.device = "cpu"):
        model, self.class_names, self.spec = load_classifier(checkpoint)
        self.device = torch.device(device)
        self.model = model.to(self.device)

    @torch.no_grad()
    def __call__(
        self, images: Sequence[ImageLike], top_k: int = 5, img_size=None, keep_aspect: bool = False
    ) -> list[list[tuple[str, float]]]:
        """`img_size` (int or (H, W); default the classifier's) and `keep_aspect` as in `extract_feat`."""
        groups = preprocess_groups(
            images, img_size or self.spec["img_size"], self.model.backbone.patch_size, keep_aspect
        )
        rows = [None] * len(images)
        for indices, pixels in groups:  # one group per input size
            probs = self.model(normalize_images(pixels, torch.float32, self.device)).softmax(dim=-1)  # (b, C)
            for index, row in zip(indices, probs.cpu()):
                rows[index] = row
        probs = torch.stack(rows)
        scores, classes = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [
            [(self.class_names[c], float(s)) for c, s in zip(row_c.tolist(), row_s.tolist())]
            for row_c, row_s in zip(classes, scores)
        ]


def predict(
    images: Sequence[ImageLike],
    checkpoint: str,
    top_k: int = 5,
    device: str | torch.device = "cpu",
    img_size=None,
    keep_aspect: bool = False,
) -> list[list[tuple[str, float]]]:
    """One call: load the classifier file and return top-k (class name, probability) per image."""
    return Predictor(checkpoint, device)(images, top_k, img_size, keep_aspect)
