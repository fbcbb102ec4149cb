"""Crash-safe file primitives shared by everything that marks progress on disk: fsync a file or a
folder, and write a small file atomically (temp in the same folder -> fsync -> rename -> fsync the
folder), so a crash leaves either the old content or the new one under the final name."""
import os
from pathlib import Path


def fsync_path(path) -> None:
    """fsync a file or a folder (a folder: so a rename or a new entry in it survives a crash)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
