"""Bytes of one indexed image: a whole file under a folder root, or one positioned read from a
tar shard / blob file through a small per-process cache of open descriptors."""

import os
from collections import OrderedDict


class HandleCache:
    """Open file descriptors by path, least recently used closed first. Created lazily in each
    worker (after fork), so no descriptor is shared between processes."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._fds = OrderedDict()
        self._pid = None

    def fd(self, path: str) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to reuse
            self._fds, self._pid = OrderedDict(), os.getpid()
        if path in self._fds:
            self._fds.move_to_end(path)
            return self._fds[path]
        fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        if len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()


def read_image_bytes(location, handles: HandleCache) -> bytes:
    """`location` = IndexReader.image_location(row). Raises OSError when the bytes are unavailable."""
    kind, container, path, offset, size = location
    if kind == "dir":
        with open(os.path.join(container, path), "rb") as f:
            return f.read()
    data = os.pread(handles.fd(container), size, offset)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes (shard truncated?)")
    return data
