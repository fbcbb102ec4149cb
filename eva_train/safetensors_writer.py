"""A safetensors file written in pieces, at known offsets, without holding the tensors in memory.

The header (names, shapes, dtypes, offsets) is fixed first; the data region is preallocated
(zero-filled by the filesystem) and every piece is `pwrite`n straight to its place, so peak memory
is the largest piece, not the output. Written to `PATH.tmp`, fsynced, renamed by `commit()`; a
crash or an error leaves no file at PATH.
"""
import json
import math
import os
import struct
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class StreamingSafetensorsWriter:
    def __init__(self, path: str, specs: "OrderedDict[str, Tuple[Tuple[int, ...], torch.dtype]]",
                 metadata: Optional[Dict[str, str]] = None):
        self.path = os.fspath(path)
        self.tmp_path = self.path + ".tmp"
        self.specs = specs
        self.offsets: Dict[str, int] = {}      # name -> byte offset of its data in the file
        self.written_elems: Dict[str, int] = {name: 0 for name in specs}
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

    def _header(self, metadata: Dict[str, str]) -> bytes:
        entries, cursor = {}, 0
        for name, (shape, dtype) in self.specs.items():
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                             "data_offsets": [cursor, cursor + nbytes]}
            self.offsets[name] = cursor
            cursor += nbytes
        self.total_bytes = cursor
        if metadata:
            entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(entries, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned

    def write(self, name: str, elem_offset: int, values: torch.Tensor) -> None:
        """Write the flat `values` into tensor `name` starting at element `elem_offset`."""
        shape, dtype = self.specs[name]
        values = values.reshape(-1).to(dtype).contiguous()
        if elem_offset < 0 or elem_offset + values.numel() > math.prod(shape):
            raise ValueError(f"piece [{elem_offset}, {elem_offset + values.numel()}) is outside {name} {tuple(shape)}")
        raw = values.view(torch.uint8).numpy() if values.numel() else b""
        os.pwrite(self.fd, memoryview(raw), self.data_start + self.offsets[name] + elem_offset * values.element_size())
        self.written_elems[name] += values.numel()

    def commit(self) -> str:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp_path, self.path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)
