"""A safetensors file written in pieces, at known offsets, without holding the tensors in memory.

The header (names, shapes, dtypes, offsets) is fixed first; the data region is preallocated
(zero-filled by the filesystem) and every piece is `pwrite`n straight to its place, so peak memory
is the largest piece, not the output. Written to `PATH.tmp`, fsynced, renamed by `commit()`; a
crash or an error leaves no file at PATH. Every WRITEBACK_BYTES written, the kernel is asked to
start writing the dirty pages out (Linux sync_file_range, asynchronous), so the disk works while
the shards are still being read and the final fsync has little left to wait for.
"""

import ctypes
import ctypes.util
import json
import math
import os
import struct
from collections import OrderedDict

import numpy as np
from safetensors import safe_open

from eva_train.runtime.fsio import fsync_path
from eva_train.runtime.torch_zip import BF16Array, float32_to_bf16, to_float32

WRITEBACK_BYTES = 64 << 20


def read_metadata(path: str) -> dict[str, str]:
    """A weights file's safetensors metadata ({} for .pt/.pth files, which carry none); torch-free.
    A missing file is a one-line ValueError naming the fix."""
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint '{path}' does not exist; pass a .safetensors file "
            f"(consolidate a training run with tools/consolidate.py)"
        )
    if not str(path).endswith(".safetensors"):
        return {}
    with safe_open(path, framework="np") as f:
        return dict(f.metadata() or {})


SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    """libc's sync_file_range, or None (not Linux / not found): then writeback waits for the fsync."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()

SAFETENSORS_NAMES = {
    np.dtype(t): name
    for t, name in [
        (np.float64, "F64"),
        (np.float32, "F32"),
        (np.float16, "F16"),
        (np.int64, "I64"),
        (np.int32, "I32"),
        (np.int16, "I16"),
        (np.int8, "I8"),
        (np.uint8, "U8"),
        (np.bool_, "BOOL"),
    ]
}
NUMPY_DTYPES = {name: dtype for dtype, name in SAFETENSORS_NAMES.items()}
ITEMSIZE = {**{name: dtype.itemsize for name, dtype in NUMPY_DTYPES.items()}, "BF16": 2}


def convert(values: np.ndarray, dtype: str) -> np.ndarray:
    """Flat contiguous `values` in safetensors dtype `dtype` (floats round to nearest even)."""
    if dtype == "BF16":
        out = values if isinstance(values, BF16Array) else float32_to_bf16(to_float32(values))
    elif isinstance(values, BF16Array):
        out = to_float32(values).astype(NUMPY_DTYPES[dtype], copy=False)
    else:
        out = values.astype(NUMPY_DTYPES[dtype], copy=False)
    return np.ascontiguousarray(out).reshape(-1)


class StreamingSafetensorsWriter:
    def __init__(
        self, path: str, specs: "OrderedDict[str, tuple[tuple[int, ...], str]]", metadata: dict[str, str] | None = None
    ):
        self.path = os.fspath(path)
        self.tmp_path = self.path + ".tmp"
        self.specs = specs
        self.offsets: dict[str, int] = {}  # name -> byte offset of its data in the file
        self.written_elems: dict[str, int] = {name: 0 for name in specs}
        self._unflushed = 0  # bytes written since writeback was last started
        header = self._header(metadata or {})
        self.data_start = 8 + len(header)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(header)) + header, 0)
        os.ftruncate(self.fd, self.data_start + self.total_bytes)
        try:  # reserve the blocks in one call instead of one allocation per written page
            os.posix_fallocate(self.fd, 0, self.data_start + self.total_bytes)
        except OSError:
            pass  # filesystems without fallocate: the sparse file still reads back zeros

    def _header(self, metadata: dict[str, str]) -> bytes:
        entries, cursor = {}, 0
        for name, (shape, dtype) in self.specs.items():
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
            self.offsets[name] = cursor
            cursor += nbytes
        self.total_bytes = cursor
        if metadata:
            entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(entries, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned

    def write(self, name: str, elem_offset: int, values: np.ndarray) -> None:
        """Write the flat `values` into tensor `name` starting at element `elem_offset`."""
        shape, dtype = self.specs[name]
        values = convert(values.reshape(-1), dtype)
        if elem_offset < 0 or elem_offset + values.size > math.prod(shape):
            raise ValueError(f"piece [{elem_offset}, {elem_offset + values.size}) is outside {name} {tuple(shape)}")
        if values.size:
            os.pwrite(
                self.fd,
                memoryview(values.view(np.uint8)),
                self.data_start + self.offsets[name] + elem_offset * ITEMSIZE[dtype],
            )
        self.written_elems[name] += values.size
        self._unflushed += values.nbytes
        if self._unflushed >= WRITEBACK_BYTES:
            self.start_writeback()

    def start_writeback(self) -> None:
        """Start (not wait for) writing this file's dirty pages to disk."""
        self._unflushed = 0
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # best effort: errors surface at fsync

    def commit(self) -> str:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp_path, self.path)
        fsync_path(os.path.dirname(os.path.abspath(self.path)))
        return self.path

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)
