"""Labeled images for evaluation: sources, transforms and rank-consistent loaders.

A source is an image folder (one sub-folder per class, like torchvision's ImageFolder) or an
Arrow index from `tools/build_index.py` (rows with labels). Images are decoded by the data
pipeline's decoders (`load_rgb`: EXIF orientation, 16-bit scaling, transparency on white) and
evaluated through its one `EvalTransform`. Evaluation loaders give every rank the same number of
equally sized batches: the sample list is padded to a multiple of the world size with repeats
flagged `valid=False`, so under ZeRO-3 every rank runs the same forwards and nothing is dropped or
counted twice.
"""

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from eva_train.data.decode import DEFAULT_MAX_PIXELS, decode_full, load_rgb, read_header
from eva_train.data.index import open_index
from eva_train.data.reading import HandleCache, read_image_bytes
from eva_train.data.sources import is_image_name


class LabeledImages(Dataset):
    """Images with integer labels; `__getitem__` -> {"images": uint8 (3,H,W), "label": int64}.
    `load_image(i)` gives image i as upright RGB uint8 (3, H, W)."""

    def __init__(
        self,
        load_image: Callable[[int], torch.Tensor],
        labels: np.ndarray,
        class_names: list[str],
        transform: Callable | None = None,
        origin: str = "",
    ):
        self.load_image = load_image
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = class_names
        self.transform = transform
        self.origin = origin

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = self.load_image(i)
        if self.transform is not None:
            image = self.transform(image)
        return {"images": image, "label": torch.tensor(self.labels[i])}

    def with_transform(self, transform: Callable) -> "LabeledImages":
        return LabeledImages(self.load_image, self.labels, self.class_names, transform, self.origin)


class _FileImages:
    """i -> image file i, decoded; paths in one numpy buffer, not a list of Python strings that
    forked workers would copy page by page."""

    def __init__(self, paths: np.ndarray):
        self.paths = paths

    def __call__(self, i: int) -> torch.Tensor:
        return load_rgb(str(self.paths[i]))


class _IndexImages:
    """row -> decoded image; one descriptor cache per process (HandleCache resets itself after fork)."""

    def __init__(self, reader):
        self.reader, self.handles = reader, HandleCache()

    def __call__(self, row: int) -> torch.Tensor:
        data = read_image_bytes(self.reader.image_location(row), self.handles)
        return decode_full(read_header(data, DEFAULT_MAX_PIXELS))


def image_folder(root: str) -> LabeledImages:
    """One sub-folder per class; classes are the sorted sub-folder names."""
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (Path(root) / name).rglob("*") if is_image_name(p.name) and p.is_file())
        files += [str(p) for p in found]
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"no images found in class sub-folders of '{root}'; expected ROOT/CLASS/IMAGE.jpg")
    return LabeledImages(_FileImages(np.array(files)), np.array(labels), classes, origin=root)


def index_images(paths: Sequence[str]) -> LabeledImages:
    """All rows of the index files, with their labels and the source's class names.

    Evaluation needs every image to be readable: a bad one is an error (with its location), not a
    silent replacement as in pretraining."""
    reader = open_index(list(paths))
    labels = reader.labels()
    if len(labels) == 0:
        raise ValueError(f"index {list(paths)} has no rows; build it from a labeled image folder")
    if labels.min() < 0:
        row = int(np.argmax(labels < 0))
        raise ValueError(
            f"index {list(paths)} has unlabeled rows (first: {reader.record(row).location}); "
            f"evaluation needs labels: index class folders or shards with .cls files"
        )
    class_lists = {tuple(s.classes) for s in reader.sources}
    if len(class_lists) > 1:
        raise ValueError(
            f"index files {list(paths)} come from sources with different classes; evaluate one labeled set at a time"
        )
    classes = list(next(iter(class_lists))) or [f"class_{i}" for i in range(int(labels.max()) + 1)]
    return LabeledImages(_IndexImages(reader), labels, classes, origin=",".join(map(str, paths)))


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
    return index_images(sources)


def train_transform(img_size: int, min_crop_scale: float) -> Callable:
    """Fine-tune / probe training augmentation on uint8 tensors (torchvision's, drawing from torch's
    RNG, seeded per rank by the runner)."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                img_size, scale=(min_crop_scale, 1.0), antialias=True, interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
        ]
    )


class PaddedView(Dataset):
    """Positions [0, padded_len): position p is sample p % len, `valid` only for p < len."""

    def __init__(self, dataset: Dataset, world_size: int):
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.padded_len = math.ceil(self.num_samples / world_size) * world_size

    def __len__(self) -> int:
        return self.padded_len

    def __getitem__(self, p: int) -> dict[str, torch.Tensor]:
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


def eval_loader(
    dataset: LabeledImages, batch_size: int, rank: int, world_size: int, num_workers: int = 0
) -> DataLoader:
    """Ordered, padded, sharded batches with `images`, `label`, `valid`; see `unshard`."""
    padded = PaddedView(dataset, world_size)
    return DataLoader(
        padded,
        batch_size=batch_size,
        sampler=StridedPositions(len(padded), rank, world_size),
        num_workers=num_workers,
        persistent_workers=False,
    )


def train_loader(
    dataset: LabeledImages, batch_size: int, rank: int, world_size: int, seed: int, num_workers: int = 0
) -> DataLoader:
    """Shuffled per epoch (call `loader.sampler.set_epoch`), tail dropped so ranks stay in step."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(
            f"{len(dataset)} training images give {len(sampler)} per rank, fewer than one "
            f"batch of {batch_size}; lower the batch size or add images"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=num_workers > 0,
    )
