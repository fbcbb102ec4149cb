"""Top-k class names and probabilities from a classifier file (tools/finetune.py or
tools/linear_probe.py output); for a pretrained backbone file use `eva_train.export.inference`
(`get_model` + `extract_feat`).

    predictor = Predictor("outputs/finetune/classifier.safetensors")
    predictor(["cat.jpg", "dog.png"], top_k=3)   # [[("cat", 0.91), ("lynx", 0.05), ...], ...]
"""
from typing import List, Sequence, Tuple, Union

import torch
from PIL import Image

from eva_train.data.decode import load_rgb
from eva_train.data.transforms import EvalTransform, normalize_images
from eva_train.eval.checkpoints import load_classifier

ImageLike = Union[str, Image.Image, torch.Tensor]


def images_to_uint8(images: Sequence[ImageLike], img_size: int) -> torch.Tensor:
    """Files / PIL images / uint8 (3,H,W) tensors -> uint8 (B,3,img,img) through `EvalTransform`,
    exactly like the evaluation loaders."""
    if not images:
        raise ValueError("no images given")
    transform = EvalTransform(img_size)
    return torch.stack([transform(load_rgb(item)) for item in images])


class Predictor:
    def __init__(self, checkpoint: str, device: Union[str, torch.device] = "cpu"):
        model, self.class_names, self.spec = load_classifier(checkpoint)
        self.device = torch.device(device)
        self.model = model.to(self.device)

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageLike], top_k: int = 5) -> List[List[Tuple[str, float]]]:
        pixels = images_to_uint8(images, self.spec["img_size"])
        probs = self.model(normalize_images(pixels, torch.float32, self.device)).softmax(dim=-1)  # (B, C)
        scores, classes = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [[(self.class_names[c], float(s)) for c, s in zip(row_c.tolist(), row_s.tolist())]
                for row_c, row_s in zip(classes, scores)]


def predict(images: Sequence[ImageLike], checkpoint: str, top_k: int = 5,
            device: Union[str, torch.device] = "cpu") -> List[List[Tuple[str, float]]]:
    """One call: load the classifier file and return top-k (class name, probability) per image."""
    return Predictor(checkpoint, device)(images, top_k)
