"""Crash-safe file primitives shared by everything that marks progress on disk: fsync a file or a
folder, and write a small file atomically (temp in the same folder -> fsync -> rename -> fsync the
folder), so a crash leaves either the old content or the new one under the final name."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """For writers that want a path, not text (Arrow, safetensors, raw bytes): yields a temp path in
    the same folder; a clean exit fsyncs it, renames it to `path` and fsyncs the folder; an error
    (or a kill signal turned into an exception) removes it and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
