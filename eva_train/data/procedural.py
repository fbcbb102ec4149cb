"""Procedural labeled images for the demo: 10 classes of distinct structure with random colors,
phases, frequencies and positions, so a MIM loss falls and a kNN on features beats chance."""

import numpy as np

NUM_CLASSES = 10
CLASS_NAMES = (
    "grating_0",
    "grating_45",
    "grating_90",
    "grating_135",
    "checkerboard",
    "rings",
    "blobs",
    "disk",
    "pinwheel",
    "smooth_noise",
)


def _grid(size: int, rng: np.random.Generator):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    return x, y, x - cx, y - cy


def _pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) field in [0, 1] with the structure of class `label`."""
    x, y, dx, dy = _grid(size, rng)
    freq, phase = rng.uniform(3.0, 7.0), rng.uniform(0, 2 * np.pi)
    if label < 4:  # oriented gratings, +-10 degrees around 0/45/90/135
        angle = np.deg2rad(45 * label + rng.uniform(-10, 10))
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    if label == 4:
        cells = rng.integers(3, 7)
        return ((np.floor(x * cells + phase) + np.floor(y * cells + phase)) % 2).astype(np.float32)
    if label == 5:
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(dx, dy) + phase)
    if label == 6:
        field = np.zeros_like(x)
        for cx, cy in rng.uniform(0.1, 0.9, size=(int(rng.integers(3, 7)), 2)):
            field += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * rng.uniform(0.03, 0.08) ** 2))
        return np.clip(field, 0, 1)
    if label == 7:
        return (np.hypot(dx, dy) < rng.uniform(0.15, 0.3)).astype(np.float32)
    if label == 8:
        return 0.5 + 0.5 * np.sign(np.sin(int(rng.integers(3, 8)) * np.arctan2(dy, dx) + phase))
    coarse = rng.uniform(0, 1, size=(5, 5)).astype(np.float32)  # smooth noise: bilinear upsampled
    idx = np.linspace(0, 4, size)
    i0 = np.minimum(idx.astype(int), 3)
    t = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - t) + coarse[i0 + 1] * t
    return rows[:, i0] * (1 - t.T) + rows[:, i0 + 1] * t.T


def make_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: the class pattern blended between two random colors, plus noise."""
    field = _pattern(label, size, rng)[..., None]
    color_a, color_b = rng.uniform(0, 255, size=(2, 3))
    image = color_a * (1 - field) + color_b * field + rng.normal(0, 6, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)
