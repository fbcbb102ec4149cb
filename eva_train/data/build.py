"""Build an index (see index.py) from image folders, tar shards and parquet files.

A SOURCE expands to units of work (one per class folder, tar shard or parquet file); units run
in parallel processes and each returns a small Arrow table, concatenated in a fixed order so the
same sources always give the same index. `incremental=True` reuses the rows of shards and
parquet files already in the previous index (same size and mtime) and only reads new ones.
"""

import glob
import logging
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from eva_train.data import sources as src_readers
from eva_train.data.errors import DataError
from eva_train.data.index import SCHEMA, read_metadata, write_index_atomic
from eva_train.data.skips import UNREADABLE_SHARD, Skip, SkipReport

log = logging.getLogger(__name__)


@dataclass
class Unit:
    kind: str  # "dir" (files under root/subdir), "tar", "parquet"
    path: str  # the folder root, shard or parquet file
    subdir: str = ""  # dir: class folder ("" = flat folder)
    label: int = -1
    probe: bool = False
    blob_dir: str = ""  # parquet with image bytes: where extracted blobs go


@dataclass
class Source:
    spec: str
    name: str
    weight: float
    units: list[Unit] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def _expand_files(spec: str) -> list[str]:
    if any(ch in spec for ch in "*?["):
        return sorted(glob.glob(spec, recursive=True))
    if os.path.isdir(spec):
        entries = sorted(os.listdir(spec))
        return [os.path.join(spec, e) for e in entries if e.endswith((".tar", ".parquet"))]
    return [spec] if os.path.isfile(spec) else []


def _folder_units(root: str, probe: bool) -> (list[Unit], list[str]):
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if subdirs:
        return [Unit("dir", root, d, label, probe) for label, d in enumerate(subdirs)], subdirs
    return [Unit("dir", root, "", -1, probe)], []


def plan_source(spec: str, weight: float, name: str, probe: bool, blob_dir: str) -> Source:
    source = Source(spec, name or spec, weight)
    files = _expand_files(spec)
    shard_like = [f for f in files if f.endswith((".tar", ".parquet"))]
    if shard_like:
        source.units = [
            Unit("tar" if f.endswith(".tar") else "parquet", os.path.abspath(f), probe=probe, blob_dir=blob_dir)
            for f in shard_like
        ]
    elif os.path.isdir(spec):
        source.units, source.classes = _folder_units(os.path.abspath(spec), probe)
    if not source.units:
        raise DataError(
            f"source '{spec}' holds no image folder, .tar shard or .parquet file; "
            f"pass a folder of images, a folder/glob of .tar shards, or .parquet files"
        )
    return source


def run_unit(unit: Unit) -> tuple[pa.Table, dict | None, list[Skip]]:
    """Rows of one unit (container column = 0, source = 0), its container entry and what it skipped.
    A shard or parquet file that cannot be read at all gives no rows and no container."""
    try:
        return _read_unit(unit)
    except DataError:
        raise  # a problem of the whole source (e.g. a parquet schema) that the user must fix
    except (OSError, EOFError, tarfile.TarError, pa.ArrowException) as exc:
        return SCHEMA.empty_table(), None, [(f"{UNREADABLE_SHARD} ({type(exc).__name__}: {exc})", unit.path)]


def _read_unit(unit: Unit):
    if unit.kind == "dir":
        table, skipped = src_readers.index_folder(unit.path, unit.subdir, unit.label, unit.probe)
        return table, {"kind": "dir", "path": unit.path}, skipped
    if unit.kind == "tar":
        table, skipped = src_readers.index_tar(unit.path, unit.probe)
        return table, container_entry("tar", unit.path), skipped
    table, container_path, skipped = src_readers.index_parquet(unit.path, unit.blob_dir, unit.probe)
    kind = "blob" if container_path != os.path.dirname(unit.path) else "dir"
    return table, container_entry(kind, container_path, origin=unit.path), skipped


def container_entry(kind: str, path: str, origin: str | None = None) -> dict:
    stat = os.stat(origin or path)
    entry = {"kind": kind, "path": path, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if origin:
        entry["origin"] = origin
    return entry


class _PreviousIndex:
    """Rows of an existing index, by the shard/parquet file they came from (for incremental builds)."""

    def __init__(self, path: str):
        self.table, self.by_origin = None, {}
        if not os.path.isfile(path):
            return
        with pa.memory_map(path, "r") as source:
            reader = pa.ipc.open_file(source)
            meta = read_metadata(reader.schema, path)
            self.table = reader.read_all()
        for cid, c in enumerate(meta["containers"]):
            if c["kind"] != "dir" or "origin" in c:
                self.by_origin[c.get("origin", c["path"])] = (cid, c)

    def reuse(self, unit: Unit):
        if unit.kind == "dir" or unit.path not in self.by_origin:
            return None
        cid, entry = self.by_origin[unit.path]
        try:
            stat = os.stat(unit.path)
        except OSError:
            return None  # gone or unreadable now: read it again, which reports why
        if (stat.st_size, stat.st_mtime_ns) != (entry.get("bytes"), entry.get("mtime_ns")):
            return None
        if entry["kind"] == "blob" and not os.path.isfile(entry["path"]):
            return None
        rows = self.table.filter(pc.equal(self.table["container"], cid))
        return rows, entry, []  # its skips were reported when it was first read


def _run_units(units: list[Unit], previous: _PreviousIndex, num_workers: int, progress: bool):
    results = [previous.reuse(u) for u in units]
    todo = [i for i, r in enumerate(results) if r is None]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="indexing", unit="file", disable=not progress)
    if num_workers <= 1 or len(todo) <= 1:
        mapped = (run_unit(units[i]) for i in todo)
        executor = None
    else:
        executor = ProcessPoolExecutor(max_workers=num_workers)
        mapped = executor.map(run_unit, [units[i] for i in todo], chunksize=1)
    try:
        for i, result in zip(todo, mapped):
            results[i] = result
            bar.update(1)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown()
    return results


def _assemble(sources: list[Source], results) -> (pa.Table, dict):
    containers, container_ids, tables, source_meta, row = [], {}, [], [], 0
    it = iter(results)
    for source_id, source in enumerate(sources):
        start_row = row
        for _ in source.units:
            table, entry, _ = next(it)
            if entry is None:  # unreadable unit: no rows, no container
                continue
            key = (entry["kind"], entry["path"], entry.get("origin"))
            if key not in container_ids:
                container_ids[key] = len(containers)
                containers.append(entry)
            n = table.num_rows
            table = table.set_column(
                table.schema.get_field_index("container"),
                "container",
                pa.array(np.full(n, container_ids[key], np.int32)),
            )
            table = table.set_column(
                table.schema.get_field_index("source"), "source", pa.array(np.full(n, source_id, np.int16))
            )
            tables.append(table.cast(SCHEMA))
            row += n
        source_meta.append(
            {
                "name": source.name,
                "spec": source.spec,
                "weight": source.weight,
                "start_row": start_row,
                "num_rows": row - start_row,
                "classes": source.classes,
            }
        )
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return table, {"containers": containers, "sources": source_meta}


def build_index(
    specs: Sequence[str],
    out_path: str,
    *,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    probe: bool = False,
    incremental: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    skips: SkipReport | None = None,
) -> str:
    """Index every SOURCE in `specs` into one Arrow file at `out_path` (atomically); returns the path.
    Unreadable entries are left out and recorded in `skips` (if given; else logged as a warning)."""
    weights = list(weights) if weights else [1.0] * len(specs)
    names = list(names) if names else [""] * len(specs)
    if len(weights) != len(specs) or len(names) != len(specs):
        raise DataError(f"got {len(specs)} sources but {len(weights)} weights and {len(names)} names; give one each")
    if any(w <= 0 for w in weights):
        raise DataError(f"source weights must be > 0, got {weights}")
    blob_dir = blob_dir_for(out_path)
    sources = [plan_source(s, w, n, probe, blob_dir) for s, w, n in zip(specs, weights, names)]
    units = [u for s in sources for u in s.units]
    previous = _PreviousIndex(out_path) if incremental else _PreviousIndex("")
    workers = num_workers or min(len(units), os.cpu_count() or 1)
    results = _run_units(units, previous, workers, progress)
    table, meta = _assemble(sources, results)
    report = skips if skips is not None else SkipReport()
    for _, _, unit_skips in results:
        report.extend(unit_skips)
    if skips is None and report.total:
        log.warning("%s", report.summary())
    if table.num_rows == 0:
        raise DataError(
            f"sources {list(specs)} hold no readable images (extensions "
            f"{', '.join(src_readers.IMAGE_EXTS)}); {report.summary()}"
        )
    write_index_atomic(table, meta, out_path)
    return out_path


def blob_dir_for(out_path: str) -> str:
    out = Path(out_path).absolute()
    return str(out.with_name(out.name + ".blobs"))
