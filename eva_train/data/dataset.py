"""Map-style dataset: (epoch, sample id) -> one training sample, decoded and masked in the worker.

Every random choice (crop, flip, mask, replacement of a bad image) comes from an RNG seeded by
(seed, epoch, sample id), so a sample is the same whatever worker makes it, and a resumed run
sees exactly the batches the interrupted one would have.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from eva_train.data.decode import (
    DEFAULT_JPEG_DECODER,
    DEFAULT_MAX_PIXELS,
    BadImageError,
    decode_crop,
    decode_full,
    read_header,
)
from eva_train.data.errors import DataError
from eva_train.data.index import IndexReader
from eva_train.data.reading import HandleCache, read_image_bytes
from eva_train.data.transforms import EvalTransform, random_resized_crop_box

log = logging.getLogger(__name__)
MAX_REPLACEMENTS = 16
VAL_STREAM = 0xE7A1  # RNG domain for validation samples (mask seeded by index only)


@dataclass
class SampleSpec:
    img_size: int
    min_crop_scale: float = 0.2
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    train: bool = True
    seed: int = 0
    jpeg_decoder: str = DEFAULT_JPEG_DECODER  # "simplejpeg" or "pillow" (EVA_JPEG_DECODER sets the default)


class MaskedImageDataset(torch.utils.data.Dataset):
    def __init__(self, reader: IndexReader, spec: SampleSpec, mask_generator):
        self.reader, self.spec, self.mask_generator = reader, spec, mask_generator
        self.handles = HandleCache()
        self._logged_bad = set()  # per worker: each bad path is logged once

    def __len__(self) -> int:
        return self.reader.epoch_length

    def sample_rng(self, epoch: int, sample_id: int) -> np.random.Generator:
        if self.spec.train:
            return np.random.default_rng([self.spec.seed, epoch, sample_id])
        return np.random.default_rng([self.spec.seed, VAL_STREAM, sample_id])

    def __getitem__(self, key):
        epoch, sample_id = key if isinstance(key, tuple) else (0, int(key))
        rng = self.sample_rng(epoch, sample_id)
        row = self.reader.virtual_to_row(sample_id, epoch)
        for bad in range(MAX_REPLACEMENTS + 1):
            try:
                image = self.load_image(row, rng)
                break
            except (BadImageError, OSError) as exc:
                self._log_bad(row, exc)
                row = replacement_row(row, bad, len(self.reader))
        else:
            raise DataError(
                f"{MAX_REPLACEMENTS + 1} images in a row failed to load (last: row {row}); the "
                f"data is mostly unreadable: check the index with tools/build_index.py --check"
            )
        return {
            "images": image,  # (3, H, W) uint8
            "mask": torch.from_numpy(self.mask_generator(rng)),
            "label": self.reader.label(row),
            "index": row,
            "bad": bad,
        }

    def load_image(self, row: int, rng: np.random.Generator) -> torch.Tensor:
        """Read, header, crop box, decode + crop + resize, flip: one (3, S, S) uint8 image; raises
        BadImageError / OSError for a bad one (the caller replaces it). Validation samples take the
        evaluation preprocessing every eval tool uses (EvalTransform on the full decode)."""
        data = read_image_bytes(self.reader.image_location(row), self.handles)
        image = read_header(data, self.spec.max_image_pixels, self.spec.jpeg_decoder)
        if not self.spec.train:
            return EvalTransform(self.spec.img_size)(decode_full(image))
        width, height = image.upright_size
        box = random_resized_crop_box(width, height, (self.spec.min_crop_scale, 1.0), rng)
        flip = bool(rng.random() < 0.5)
        return decode_crop(image, box, self.spec.img_size, flip)

    def _log_bad(self, row: int, exc: Exception) -> None:
        if row in self._logged_bad:
            return
        self._logged_bad.add(row)
        location = self.reader.record(row).location
        log.warning("bad sample (replaced) row %d at %s: %s [pid %d]", row, location, exc, os.getpid())


def replacement_row(row: int, attempt: int, num_rows: int) -> int:
    """A deterministic other row for a bad one (hash of row and attempt)."""
    x = (row * 0x9E3779B97F4A7C15 + attempt * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    candidate = x % num_rows
    return int(candidate if candidate != row or num_rows == 1 else (row + 1) % num_rows)
