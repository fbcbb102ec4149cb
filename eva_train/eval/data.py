"""Labeled images for evaluation: sources, transforms and rank-consistent loaders.

A source is an image folder (one sub-folder per class, like torchvision's ImageFolder) or an
Arrow index from `tools/build_index.py` (rows with labels). Evaluation loaders give every rank
the same number of equally sized batches: the sample list is padded to a multiple of the world
size with repeats flagged `valid=False`, so under ZeRO-3 every rank runs the same forwards and
nothing is dropped or counted twice.
"""
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EVAL_CROP_FRACTION = 0.875     # resize the short side to img_size / 0.875, center crop img_size


class LabeledImages(Dataset):
    """Images with integer labels; `__getitem__` -> {"images": uint8 (3,H,W), "label": int64}."""

    def __init__(self, load_image: Callable[[int], Image.Image], labels: np.ndarray,
                 class_names: List[str], transform: Optional[Callable] = None, origin: str = ""):
        self.load_image = load_image
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = class_names
        self.transform = transform
        self.origin = origin

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        image = T.functional.pil_to_tensor(self.load_image(i).convert("RGB"))   # uint8 (3,H,W)
        if self.transform is not None:
            image = self.transform(image)
        return {"images": image, "label": torch.tensor(self.labels[i])}

    def with_transform(self, transform: Callable) -> "LabeledImages":
        return LabeledImages(self.load_image, self.labels, self.class_names, transform, self.origin)


def image_folder(root: str) -> LabeledImages:
    """One sub-folder per class; classes are the sorted sub-folder names."""
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (Path(root) / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += [str(p) for p in found]
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"no images found in class sub-folders of '{root}'; expected ROOT/CLASS/IMAGE.jpg")
    paths = np.array(files)   # one numpy buffer, not a list of Python strings shared by forked workers
    return LabeledImages(lambda i: Image.open(paths[i]), np.array(labels), classes, origin=root)


def open_labeled(sources: Sequence[str]) -> LabeledImages:
    """An image folder or an Arrow index (one path, or several index files merged)."""
    sources = list(sources)
    if not sources:
        raise ValueError("no labeled data given; pass an image folder (ROOT/CLASS/*.jpg) or an index .arrow file")
    for src in sources:
        if not os.path.exists(src):
            raise ValueError(f"labeled data '{src}' does not exist; pass an image folder or an index .arrow file")
    if len(sources) == 1 and os.path.isdir(sources[0]):
        return image_folder(sources[0])
    from eva_train.eval.index_source import index_images   # needs the data package's index reader
    return index_images(sources)


def eval_transform(img_size: int) -> Callable:
    return T.Compose([T.Resize(int(math.floor(img_size / EVAL_CROP_FRACTION)), antialias=True),
                      T.CenterCrop(img_size)])


def train_transform(img_size: int, min_crop_scale: float) -> Callable:
    return T.Compose([T.RandomResizedCrop(img_size, scale=(min_crop_scale, 1.0), antialias=True,
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip()])


class PaddedView(Dataset):
    """Positions [0, padded_len): position p is sample p % len, `valid` only for p < len."""

    def __init__(self, dataset: Dataset, world_size: int):
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.padded_len = math.ceil(self.num_samples / world_size) * world_size

    def __len__(self) -> int:
        return self.padded_len

    def __getitem__(self, p: int) -> Dict[str, torch.Tensor]:
        item = dict(self.dataset[p % self.num_samples])
        item["valid"] = torch.tensor(p < self.num_samples)
        return item


class StridedPositions(Sampler):
    """Rank r takes positions r, r + world, r + 2 world, ... (all ranks get the same count)."""

    def __init__(self, padded_len: int, rank: int, world_size: int):
        self.positions = range(rank, padded_len, world_size)

    def __iter__(self):
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def eval_loader(dataset: LabeledImages, batch_size: int, rank: int, world_size: int,
                num_workers: int = 0) -> DataLoader:
    """Ordered, padded, sharded batches with `images`, `label`, `valid`; see `unshard`."""
    padded = PaddedView(dataset, world_size)
    return DataLoader(padded, batch_size=batch_size, sampler=StridedPositions(len(padded), rank, world_size),
                      num_workers=num_workers, persistent_workers=False)


def train_loader(dataset: LabeledImages, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0) -> DataLoader:
    """Shuffled per epoch (call `loader.sampler.set_epoch`), tail dropped so ranks stay in step."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(f"{len(dataset)} training images give {len(sampler)} per rank, fewer than one "
                         f"batch of {batch_size}; lower the batch size or add images")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, persistent_workers=num_workers > 0)
