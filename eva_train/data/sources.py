"""Readers that turn one unit of a source (class folder, tar shard, parquet file) into index rows.

Each returns an Arrow table in index.SCHEMA with `container` and `source` set to 0 (the builder
assigns the real ids) and the list of entries it skipped, as (reason, path) pairs (see skips.py):
one unreadable file or tar member never stops a build. Rows are built from numpy arrays and Arrow
buffers; per-row Python work is limited to what one file or shard holds.
"""

import hashlib
import io
import os
import posixpath
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from eva_train.data import skips
from eva_train.data.errors import DataError
from eva_train.data.index import SCHEMA
from eva_train.runtime.fsio import atomic_path

# the one list of file extensions taken for images (index builder, eval folders, feature extraction)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS = ("txt", "caption")
IMAGE_BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
IMAGE_PATH_COLUMNS = ("path", "image_path", "filepath", "file", "filename")
CAPTION_COLUMNS = ("caption", "txt", "text")
LABEL_COLUMNS = ("label", "cls")


def _table(paths, offsets, sizes, labels, captions=None, jsons=None, widths=None, heights=None) -> pa.Table:
    n = len(sizes)
    minus_one = np.full(n, -1, np.int32)
    return pa.table(
        {
            "path": pa.array(paths, pa.large_string()) if not isinstance(paths, pa.Array) else paths,
            "container": pa.array(np.zeros(n, np.int32)),
            "offset": pa.array(np.asarray(offsets, np.int64)),
            "size": pa.array(np.asarray(sizes, np.int64)),
            "label": pa.array(np.asarray(labels, np.int32)),
            "caption": captions
            if isinstance(captions, pa.Array)
            else pa.array(captions or [None] * n, pa.large_string()),
            "json": jsons if isinstance(jsons, pa.Array) else pa.array(jsons or [None] * n, pa.large_string()),
            "width": pa.array(minus_one if widths is None else np.asarray(widths, np.int32)),
            "height": pa.array(minus_one if heights is None else np.asarray(heights, np.int32)),
            "source": pa.array(np.zeros(n, np.int16)),
        }
    ).cast(SCHEMA)


def is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def probe_size(fileobj) -> (int, int):
    """(width, height) from the image header; (-1, -1) if it cannot be read (kept: the loader decides)."""
    try:
        with Image.open(fileobj) as img:
            return img.size
    except Exception:  # any unreadable file is indexed anyway and counted as bad when loaded
        return -1, -1


def index_folder(root: str, subdir: str, label: int, probe: bool) -> tuple[pa.Table, list[skips.Skip]]:
    """Images under root/subdir (recursively), paths relative to root, sorted; unreadable entries skipped."""
    paths, sizes, skipped = [], [], []
    on_error = lambda exc: skipped.append((f"{skips.UNREADABLE} folder ({exc.strerror})", exc.filename))  # noqa: E731
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, subdir), onerror=on_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if subdir else []
        for name in sorted(filenames):
            if is_image_name(name) and not name.startswith("."):
                full = os.path.join(dirpath, name)
                reason = skips.check_file(full)
                if reason is not None:
                    skipped.append((reason, full))
                    continue
                paths.append(os.path.relpath(full, root))
                sizes.append(os.path.getsize(full))
    order = np.argsort(np.array(paths, dtype=object), kind="stable") if paths else []
    paths = [paths[i] for i in order]
    sizes = [sizes[i] for i in order]
    widths = heights = None
    if probe:
        dims = np.array([probe_size(os.path.join(root, p)) for p in paths], np.int32).reshape(-1, 2)
        widths, heights = dims[:, 0], dims[:, 1]
    table = _table(paths, np.zeros(len(paths)), sizes, np.full(len(paths), label), widths=widths, heights=heights)
    return table, skipped


def _split_key(name: str) -> (str, str):
    """webdataset convention: key = dir + basename up to its first dot; ext = the rest."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _member_text(tar: tarfile.TarFile, member: tarfile.TarInfo, shard_bytes: int):
    """A small metadata member's text, or None when its data lies past the end of the shard."""
    if member.offset_data + member.size > shard_bytes:
        return None
    return tar.extractfile(member).read().decode("utf-8", "replace")


def _add_member(tar, member, group: dict, shard_bytes: int, skipped: list, where: str) -> None:
    """File one member into its sample's fields (image location, caption, json, label)."""
    _, ext = _split_key(member.name)
    last_ext = ext.rsplit(".", 1)[-1]
    if last_ext in IMAGE_EXTS and "image" not in group:
        if member.offset_data + member.size > shard_bytes:
            skipped.append((skips.TRUNCATED_MEMBER, where))
        elif member.size == 0:
            skipped.append((skips.EMPTY, where))
        else:
            group["image"] = (member.name, member.offset_data, member.size)
    elif last_ext in CAPTION_EXTS + ("json",):
        group["json" if last_ext == "json" else "caption"] = _member_text(tar, member, shard_bytes)
    elif last_ext == "cls":
        text = (_member_text(tar, member, shard_bytes) or "").strip()
        try:
            group["label"] = int(text or -1)
        except ValueError:
            skipped.append((skips.BAD_LABEL, where))


def _trailing_garbage_at(path: str, offset: int) -> bool:
    """True if bytes other than the zero end-of-archive blocks follow `offset`: tarfile stops
    silently at a header it cannot parse, and whatever comes after it is lost."""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return True
    return False


def _tar_groups(path: str) -> tuple[dict, list[skips.Skip]]:
    groups, skipped = {}, []  # key -> fields, in shard order (dicts keep insertion order)
    shard_bytes = os.path.getsize(path)
    with tarfile.open(path, "r:") as tar:
        try:
            for member in tar:
                if member.isfile():
                    key, _ = _split_key(member.name)
                    _add_member(tar, member, groups.setdefault(key, {}), shard_bytes, skipped, f"{path}:{member.name}")
        except tarfile.ReadError:
            pass  # "unexpected end of data": the last member read runs past the end, already skipped
        stopped_at = tar.offset
    if stopped_at < shard_bytes and _trailing_garbage_at(path, stopped_at):
        skipped.append((skips.CORRUPT_TAR, f"{path}@{stopped_at}"))
    return groups, skipped


def index_tar(path: str, probe: bool) -> tuple[pa.Table, list[skips.Skip]]:
    found, skipped = _tar_groups(path)
    groups = [g for g in found.values() if "image" in g]
    names = [g["image"][0] for g in groups]
    offsets = [g["image"][1] for g in groups]
    sizes = [g["image"][2] for g in groups]
    widths = heights = None
    if probe:
        with open(path, "rb") as f:
            dims = np.array(
                [probe_size(io.BytesIO(os.pread(f.fileno(), s, o))) for o, s in zip(offsets, sizes)], np.int32
            ).reshape(-1, 2)
        widths, heights = dims[:, 0], dims[:, 1]
    table = _table(
        names,
        offsets,
        sizes,
        [g.get("label", -1) for g in groups],
        [g.get("caption") for g in groups],
        [g.get("json") for g in groups],
        widths,
        heights,
    )
    return table, skipped


def _pick(names, candidates):
    lowered = {n.lower(): n for n in names}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _image_bytes_column(table: pa.Table):
    name = _pick(table.column_names, IMAGE_BYTES_COLUMNS)
    if name is None:
        return None
    col = table.column(name).combine_chunks()
    if pa.types.is_struct(col.type):  # Hugging Face style {"bytes": ..., "path": ...}
        col = col.field("bytes")
    return col.cast(pa.large_binary()) if pa.types.is_binary(col.type) else col


def _optional_string(table: pa.Table, candidates):
    name = _pick(table.column_names, candidates)
    if name is None:
        return pa.nulls(table.num_rows, pa.large_string())
    return table.column(name).combine_chunks().cast(pa.large_string())


def _optional_int(table: pa.Table, candidates, default: int = -1) -> np.ndarray:
    name = _pick(table.column_names, candidates)
    if name is None:
        return np.full(table.num_rows, default, np.int32)
    return table.column(name).combine_chunks().fill_null(default).to_numpy().astype(np.int32)


def _write_blob(images: pa.Array, blob_path: str) -> (np.ndarray, np.ndarray):
    """Concatenate the image bytes into one file (one positioned read per sample later)."""
    _, offsets_buf, data_buf = images.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[images.offset : images.offset + len(images) + 1]
    with atomic_path(blob_path) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(data_buf)[offsets[0] : offsets[-1]])
    return offsets[:-1] - offsets[0], np.diff(offsets)


def index_parquet(path: str, blob_dir: str, probe: bool) -> tuple[pa.Table, str, list[skips.Skip]]:
    """Rows of a parquet file; image bytes are extracted into a blob file. Returns (rows, container
    path, skipped): null image cells and path rows whose file cannot be read are skipped."""
    table = pq.read_table(path)
    images = _image_bytes_column(table)
    labels = _optional_int(table, LABEL_COLUMNS)
    captions = _optional_string(table, CAPTION_COLUMNS)
    jsons = _optional_string(table, ("json",))
    if images is not None:
        keep = pc.is_valid(images)
        images, labels = images.filter(keep), labels[keep.to_numpy(zero_copy_only=False)]
        captions, jsons = captions.filter(keep), jsons.filter(keep)
        blob_path = os.path.join(blob_dir, blob_name(path))
        offsets, sizes = _write_blob(images, blob_path)
        keys = _optional_string(table, ("key",)).filter(keep).fill_null("")
        dims = _parquet_dims(table, keep, probe, images)
        skipped = [(skips.EMPTY, f"{path}:row {row}") for row in np.flatnonzero(~keep.to_numpy(zero_copy_only=False))]
        return _table(keys, offsets, sizes, labels, captions, jsons, *dims), blob_path, skipped
    path_col = _pick(table.column_names, IMAGE_PATH_COLUMNS)
    if path_col is None:
        raise DataError(
            f"parquet file {path} has neither an image bytes column ({', '.join(IMAGE_BYTES_COLUMNS)}) "
            f"nor an image path column ({', '.join(IMAGE_PATH_COLUMNS)}); rename the column"
        )
    paths = table.column(path_col).combine_chunks().cast(pa.large_string()).fill_null("")
    root = os.path.dirname(path)
    reasons = [skips.check_file(os.path.join(root, p)) if p else skips.EMPTY for p in paths.to_pylist()]
    skipped = [(r, os.path.join(root, p)) for r, p in zip(reasons, paths.to_pylist()) if r is not None]
    keep = pa.array([r is None for r in reasons])
    labels = labels[keep.to_numpy(zero_copy_only=False)]
    paths, captions, jsons = paths.filter(keep), captions.filter(keep), jsons.filter(keep)
    return _table(paths, np.zeros(len(paths)), np.full(len(paths), -1), labels, captions, jsons), root, skipped


def _parquet_dims(table: pa.Table, keep, probe: bool, images: pa.Array):
    if "width" in table.column_names and "height" in table.column_names:
        w = _optional_int(table.filter(keep), ("width",))
        h = _optional_int(table.filter(keep), ("height",))
        return w, h
    if not probe:
        return None, None
    dims = np.array([probe_size(io.BytesIO(images[i].as_py())) for i in range(len(images))], np.int32).reshape(-1, 2)
    return dims[:, 0], dims[:, 1]


def blob_name(parquet_path: str) -> str:
    """File name of the blob extracted from `parquet_path` (unique per absolute path)."""
    digest = hashlib.sha1(os.path.abspath(parquet_path).encode()).hexdigest()[:16]
    return f"{Path(parquet_path).stem}-{digest}.bin"
