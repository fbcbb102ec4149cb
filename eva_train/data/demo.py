"""Demo data made on first use.

`ensure_demo_data` writes procedural JPEGs in class folders (ROOT/train/<class>/, ROOT/val/<class>/)
and indexes them with the same builder as tools/build_index.py. Concurrency: callers take an
exclusive `flock` on ROOT/.lock; the first one generates and writes ROOT/READY (atomically, last),
the others wait on the lock and then find READY and reuse. A crashed generation leaves no READY,
so the next caller starts over.
"""

import fcntl
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from eva_train.data.build import build_index
from eva_train.data.errors import DataError
from eva_train.data.procedural import CLASS_NAMES, NUM_CLASSES, make_image

JPEG_QUALITY = 90


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def class_folder(label: int) -> str:
    """Numbered so that sorted folder order (the index's labels) equals the generator's labels."""
    return f"{label:02d}_{CLASS_NAMES[label]}"


def _write_split(folder: Path, num_images: int, img_size: int, rng: np.random.Generator) -> None:
    for label in range(NUM_CLASSES):
        (folder / class_folder(label)).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        label = i % NUM_CLASSES
        path = folder / class_folder(label) / f"{i:06d}.jpg"
        path.write_bytes(_jpeg_bytes(make_image(label, img_size, rng)))


def _generate(root: Path, params: dict) -> None:
    for split in ("train", "val"):
        shutil.rmtree(root / split, ignore_errors=True)  # leftovers of a crashed generation
    rng = np.random.default_rng(params["seed"])
    _write_split(root / "train", params["num_train"], params["img_size"], rng)
    _write_split(root / "val", params["num_val"], params["img_size"], rng)
    build_index([str(root / "train")], str(root / "train.arrow"), names=["demo_train"], num_workers=1)
    build_index([str(root / "val")], str(root / "val.arrow"), names=["demo_val"], num_workers=1)
    tmp = root / ".READY.tmp"
    tmp.write_text(json.dumps(params))
    os.replace(tmp, root / "READY")


def ensure_demo_data(root, img_size: int = 64, num_train: int = 2000, num_val: int = 400, seed: int = 0):
    """Returns (train_index_path, val_index_path), generating the data on first use."""
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    params = {"img_size": img_size, "num_train": num_train, "num_val": num_val, "seed": seed, "version": 1}
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on a crash
        ready = root / "READY"
        if ready.exists():
            found = json.loads(ready.read_text())
            if found != params:
                raise DataError(
                    f"demo data in {root} was made with {found}, not {params}; "
                    f"delete {root} or pass another --data.demo_root"
                )
        else:
            _generate(root, params)
    return str(root / "train.arrow"), str(root / "val.arrow")
