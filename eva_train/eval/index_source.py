"""Labeled images from Arrow index files (tools/build_index.py) through the data package's reader."""
from typing import Sequence

import numpy as np

from eva_train.config import DataConfig
from eva_train.data.decode import open_image
from eva_train.data.index import open_index
from eva_train.data.reading import HandleCache, read_image_bytes
from eva_train.eval.data import LabeledImages


class _IndexImageLoader:
    """row -> PIL image; one descriptor cache per process (HandleCache resets itself after fork)."""

    def __init__(self, reader, max_pixels: int):
        self.reader, self.max_pixels, self.handles = reader, max_pixels, HandleCache()

    def __call__(self, row: int):
        data = read_image_bytes(self.reader.image_location(row), self.handles)
        return open_image(data, self.max_pixels)


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
        raise ValueError(f"index {list(paths)} has unlabeled rows (first: {reader.record(row).location}); "
                         f"evaluation needs labels: index class folders or shards with .cls files")
    class_lists = {tuple(s.classes) for s in reader.sources}
    if len(class_lists) > 1:
        raise ValueError(f"index files {list(paths)} come from sources with different classes; "
                         f"evaluate one labeled set at a time")
    classes = list(next(iter(class_lists))) or [f"class_{i}" for i in range(int(labels.max()) + 1)]
    loader = _IndexImageLoader(reader, DataConfig().max_image_pixels)
    return LabeledImages(loader, labels, classes, origin=",".join(map(str, paths)))
