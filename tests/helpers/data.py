"""Small labeled image sets written to disk for the data and eval tests (imported as tests.helpers.data)."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from eva_train.data.procedural import CLASS_NAMES, NUM_CLASSES, make_image

CLASS_COLORS = [(220, 40, 40), (40, 200, 60), (50, 60, 230), (230, 210, 40)]


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_class_folder(root: Path, per_class: int, size: int = 16, num_classes: int = 3, seed: int = 0) -> Path:
    """ROOT/class_k/i.png: class k is a noisy patch of color k with stripes whose direction is k % 2."""
    rng = np.random.default_rng(seed)
    for k in range(num_classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.array(CLASS_COLORS[k], np.float32) * rng.uniform(0.6, 1.0)
            img = np.broadcast_to(img, (size, size, 3)).copy()
            stripes = (
                (np.arange(size) // 2 % 2 * 40.0)[:, None] if k % 2 else (np.arange(size) // 2 % 2 * 40.0)[None, :]
            )
            img += stripes[..., None] + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"class_{k}" / f"{i}.png")
    return root


def write_tar_shards(
    out_dir, num_samples: int = 64, num_shards: int = 2, img_size: int = 64, seed: int = 0
) -> list[str]:
    """Tiny webdataset shards: per sample KEY.jpg, KEY.cls, KEY.txt, KEY.json. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(num_shards):
        path = out / f"shard-{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(shard, num_samples, num_shards):
                label = i % NUM_CLASSES
                key = f"{i:08d}"
                members = {
                    "jpg": jpeg_bytes(make_image(label, img_size, rng)),
                    "cls": str(label).encode(),
                    "txt": f"a {CLASS_NAMES[label]} picture".encode(),
                    "json": json.dumps({"key": key, "label": label}).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths
