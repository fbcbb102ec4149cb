"""The sample index: one Arrow IPC file, one row per sample, memory-mapped by every worker.

Row fields (see SCHEMA): `container` points into a small table of containers kept in the
schema metadata (an image folder root, a tar shard, or a blob file extracted from parquet);
`path` is the file under a folder root or the member name in a shard; `offset`/`size` locate
the image bytes so a tar sample is one positioned read. Several index files open as one
(`open_index`), rows concatenated, each source keeping its repeat weight.

Lookups go through numpy views of the Arrow buffers: no per-row Python objects exist, so a
30M-row index costs forked workers nothing that copy-on-read could duplicate.
"""

import bisect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from eva_train.data.errors import DataError
from eva_train.runtime.fsio import atomic_path

INDEX_FORMAT_VERSION = 1
METADATA_KEY = b"eva_index"
CONTAINER_KINDS = ("dir", "tar", "blob")

SCHEMA = pa.schema(
    [
        ("path", pa.large_string()),  # file under a dir root, or member name in a tar shard
        ("container", pa.int32()),  # index into metadata["containers"]
        ("offset", pa.int64()),  # byte offset of the image in its container (0 for dir files)
        ("size", pa.int64()),  # bytes of the image
        ("label", pa.int32()),  # class id within its source, -1 when unlabeled
        ("caption", pa.large_string()),  # null when absent
        ("json", pa.large_string()),  # null when absent
        ("width", pa.int32()),  # -1 unless probed
        ("height", pa.int32()),
        ("source", pa.int16()),  # index into metadata["sources"]
    ]
)


@dataclass
class SourceInfo:
    name: str
    weight: float  # repeat weight per epoch (2.0 = every row twice, 0.5 = half the rows)
    start_row: int  # first row in the (merged) index
    num_rows: int
    classes: list[str]


@dataclass
class IndexRecord:
    row: int
    source: int
    container_kind: str
    container_path: str
    path: str
    offset: int
    size: int
    label: int
    caption: str | None
    json: str | None
    width: int
    height: int

    @property
    def location(self) -> str:
        """Human-readable place of the image, for error messages."""
        if self.container_kind == "dir":
            return os.path.join(self.container_path, self.path)
        return f"{self.container_path}[{self.path or 'offset'}@{self.offset}]"


def read_metadata(table_schema: pa.Schema, path: str) -> dict:
    raw = (table_schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DataError(f"{path} is an Arrow file but not an eva-train index; rebuild it with tools/build_index.py")
    meta = json.loads(raw)
    if meta.get("version") != INDEX_FORMAT_VERSION:
        raise DataError(
            f"{path} has index format version {meta.get('version')}, this code reads "
            f"{INDEX_FORMAT_VERSION}; rebuild it with tools/build_index.py"
        )
    return meta


def _open_arrow(path: str):
    if not os.path.isfile(path):
        raise DataError(
            f"data index '{path}' does not exist; build it with `python tools/build_index.py SOURCE --out {path}`"
        )
    try:
        return pa.ipc.open_file(pa.memory_map(path, "r"))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"data index '{path}' is not a readable Arrow IPC file ({exc}); rebuild it with tools/build_index.py"
        ) from None


def _check_schema(schema: pa.Schema, path: str) -> None:
    for field in SCHEMA:
        if schema.get_field_index(field.name) < 0 or schema.field(field.name).type != field.type:
            raise DataError(
                f"data index '{path}' lacks column {field.name}: {field.type}; rebuild it with tools/build_index.py"
            )


class _Chunk:
    """Zero-copy views over one record batch's buffers in the memory map. The hot-path columns
    are memoryviews: indexing one gives a Python int several times faster than a numpy scalar."""

    def __init__(self, batch: pa.RecordBatch):
        self.container = self._view(batch.column("container"), "i")
        self.offset = self._view(batch.column("offset"), "q")
        self.size = self._view(batch.column("size"), "q")
        self.label = self._view(batch.column("label"), "i")
        self.width = self._view(batch.column("width"), "i")
        self.height = self._view(batch.column("height"), "i")
        self.source = self._view(batch.column("source"), "h")
        path = batch.column("path")
        _, offsets, data = path.buffers()
        self.path_offsets = memoryview(offsets).cast("q")[path.offset : path.offset + len(path) + 1]
        self.path_bytes = memoryview(data) if data is not None else memoryview(b"")
        self.num_rows = len(path)
        self.batch = batch  # keeps the buffers alive; captions/json are read through Arrow (cold path)

    @staticmethod
    def _view(array: pa.Array, fmt: str) -> memoryview:
        if array.null_count:
            raise DataError(f"index column of type {array.type} has nulls; rebuild the index with tools/build_index.py")
        data = array.buffers()[1]
        return memoryview(data).cast(fmt)[array.offset : array.offset + len(array)]

    def path(self, i: int) -> str:
        return str(self.path_bytes[self.path_offsets[i] : self.path_offsets[i + 1]], "utf-8")


class _IndexFile:
    def __init__(self, path: str, first_row: int, first_source: int, first_container: int):
        self.path = path
        reader = _open_arrow(path)
        _check_schema(reader.schema, path)
        self.meta = read_metadata(reader.schema, path)
        self.chunks = [_Chunk(reader.get_batch(i)) for i in range(reader.num_record_batches)]
        sizes = [c.num_rows for c in self.chunks]
        self.chunk_starts = (np.cumsum([0] + sizes)[:-1] + first_row).tolist()
        self.num_rows = int(sum(sizes))
        self.first_row = first_row
        self.first_source = first_source
        self.first_container = first_container


class IndexReader:
    """Rows of one or several index files, opened lazily after unpickling (one map per process)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise DataError("no index given; pass --data.index=PATH (build one with tools/build_index.py)")
        self._open()

    def _open(self) -> None:
        self.files: list[_IndexFile] = []
        self.containers: list[dict] = []
        self.sources: list[SourceInfo] = []
        row = 0
        for path in self.paths:
            f = _IndexFile(path, row, len(self.sources), len(self.containers))
            self.files.append(f)
            self.containers.extend(f.meta["containers"])
            self._add_sources(f, row)
            row += f.num_rows
        self.num_rows = row
        self._container_pairs = [(c["kind"], c["path"]) for c in self.containers]
        self._virtual_counts = np.array([int(round(s.num_rows * s.weight)) for s in self.sources], dtype=np.int64)
        self._virtual_starts = [0] + np.cumsum(self._virtual_counts).tolist()
        self._affine_cache = {}  # (epoch, source) -> (a, b); a few entries per epoch
        self.chunk_starts = [s for f in self.files for s in f.chunk_starts]
        self.chunks = [c for f in self.files for c in f.chunks]
        self.chunk_files = [f for f in self.files for _ in f.chunks]

    def _add_sources(self, f: _IndexFile, first_row: int) -> None:
        for s in f.meta["sources"]:
            self.sources.append(
                SourceInfo(
                    s["name"], float(s["weight"]), first_row + s["start_row"], s["num_rows"], list(s.get("classes", []))
                )
            )

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.paths = state["paths"]
        self._open()

    def __len__(self) -> int:
        return self.num_rows

    def locate(self, row: int):
        """(chunk, row within chunk, file) of a global row."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} out of range for an index of {self.num_rows} rows")
        k = bisect.bisect_right(self.chunk_starts, row) - 1
        return self.chunks[k], row - self.chunk_starts[k], self.chunk_files[k]

    def image_location(self, row: int):
        """(container kind, container path, path, offset, size): all a read needs (hot path)."""
        chunk, i, f = self.locate(row)
        kind, path = self._container_pairs[f.first_container + chunk.container[i]]
        return kind, path, chunk.path(i), chunk.offset[i], chunk.size[i]

    def label(self, row: int) -> int:
        chunk, i, _ = self.locate(row)
        return chunk.label[i]

    def labels(self) -> np.ndarray:
        """Every row's label as one int64 array (8 bytes a row: for evaluation sets, not 30M rows)."""
        if not self.chunks:
            return np.zeros(0, np.int64)
        return np.concatenate([np.asarray(c.label) for c in self.chunks]).astype(np.int64)

    def record(self, row: int) -> IndexRecord:
        chunk, i, f = self.locate(row)
        kind, container_path, path, offset, size = self.image_location(row)
        return IndexRecord(
            row=row,
            source=f.first_source + int(chunk.source[i]),
            container_kind=kind,
            container_path=container_path,
            path=path,
            offset=offset,
            size=size,
            label=int(chunk.label[i]),
            caption=chunk.batch.column("caption")[i].as_py(),
            json=chunk.batch.column("json")[i].as_py(),
            width=int(chunk.width[i]),
            height=int(chunk.height[i]),
        )

    # Repeat weights: an epoch is a sequence of "virtual" ids; source s owns round(rows * weight)
    # of them, mapped onto its rows by an affine bijection mod rows that changes every epoch, so
    # weight 2 shows each row twice and weight 0.5 a different half each epoch.
    @property
    def epoch_length(self) -> int:
        return int(self._virtual_starts[-1])

    def virtual_to_row(self, vid: int, epoch: int) -> int:
        s = bisect.bisect_right(self._virtual_starts, vid) - 1
        if not 0 <= s < len(self.sources) or vid >= self._virtual_starts[-1]:
            raise IndexError(f"virtual id {vid} out of range for an epoch of {self.epoch_length} samples")
        src, j = self.sources[s], int(vid - self._virtual_starts[s])
        if src.weight == 1.0:
            return src.start_row + j
        a, b = self._affine(epoch, s)
        return src.start_row + (a * j + b) % src.num_rows

    def _affine(self, epoch: int, s: int):
        if (epoch, s) not in self._affine_cache:
            n = self.sources[s].num_rows
            rng = np.random.default_rng([epoch, s, 0x5EED])
            a = int(rng.integers(1, max(2, n)))
            while math.gcd(a, n) != 1:
                a += 1
            self._affine_cache[(epoch, s)] = (a, int(rng.integers(0, n)))
        return self._affine_cache[(epoch, s)]


def open_index(paths) -> IndexReader:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return IndexReader([str(p) for p in paths])


def _sample_rows(num_rows: int, count: int) -> np.ndarray:
    return np.unique(np.linspace(0, max(0, num_rows - 1), num=min(count, num_rows)).astype(np.int64))


def check_index(paths, sample_files: int = 16) -> IndexReader:
    """Start-up check: files exist and are indexes, every shard/root exists, sampled files exist."""
    reader = open_index(paths)
    for c in reader.containers:
        exists = os.path.isdir(c["path"]) if c["kind"] == "dir" else os.path.isfile(c["path"])
        if not exists:
            raise DataError(
                f"index references missing {c['kind']} '{c['path']}'; restore it or rebuild the "
                f"index with tools/build_index.py"
            )
    for row in _sample_rows(len(reader), sample_files):
        kind, root, path, _, _ = reader.image_location(int(row))
        if kind == "dir" and not os.path.isfile(os.path.join(root, path)):
            raise DataError(
                f"index row {row} points to missing file '{os.path.join(root, path)}'; "
                f"the image folder changed since indexing: rebuild with tools/build_index.py"
            )
    if reader.epoch_length == 0:
        raise DataError(f"index {reader.paths} has no samples; check the SOURCE folders given to tools/build_index.py")
    return reader


def write_index_atomic(table: pa.Table, meta: dict, out_path: str, max_chunk_rows: int = 1 << 20) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash never leaves a half index."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, version=INDEX_FORMAT_VERSION)
    table = table.select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
    table = table.combine_chunks()  # one batch per shard would mean thousands of tiny chunks to open
    with atomic_path(out) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max_chunk_rows)
