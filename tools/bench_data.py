"""Data pipeline benchmark: prints a table (timings are machine- and load-dependent; not a test).

  python tools/bench_data.py [--rows 30000000] [--list-rows 3000000] [--workers 8] [--images 300]

1. Index at --rows synthetic rows: write time, file size, open time, random lookup latency,
   per-worker USS/PSS over an epoch's worth of lookups (forked workers, like DataLoader's),
   next to a Python-list-of-paths dataset (measured at --list-rows, extrapolated linearly).
2. Decode + RandomResizedCrop + flip (and the whole sample: + block mask) per core on
   ImageNet-like JPEGs (500x375 q90) and larger ones (1024x768, where decode-time downscaling
   applies) against a plain `PIL.Image.open(p).convert('RGB')` loop over the same files.
3. Reads from tar shards: random positioned reads through the index vs a sequential tar scan.
"""

import argparse
import io
import multiprocessing as mp
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import torch
from PIL import Image

from eva_train.config import MaskConfig
from eva_train.data.build import build_index
from eva_train.data.dataset import MaskedImageDataset, SampleSpec
from eva_train.data.decode import DEFAULT_JPEG_DECODER, channels_last, read_header, resize_pixels, simplejpeg
from eva_train.data.index import open_index, write_index_atomic
from eva_train.data.masking import build_mask_generator
from eva_train.data.reading import HandleCache, read_image_bytes
from eva_train.data.transforms import random_resized_crop_box

MIB = 1024 * 1024
LIMIT = "plain PIL open().convert(RGB)"


def synthetic_paths(n: int) -> pa.Array:
    """'n%08d/%010d.JPEG' for row i, built from digit arrays (no per-row Python objects)."""
    width = 25
    chars = np.empty((n, width), np.uint8)
    rows = np.arange(n, dtype=np.int64)
    chars[:, 0] = ord("n")
    for value, digits, at in ((rows // 1300, 8, 1), (rows, 10, 10)):
        for d in range(digits):
            chars[:, at + digits - 1 - d] = ord("0") + (value // 10**d) % 10
    chars[:, 9] = ord("/")
    chars[:, 20:] = np.frombuffer(b".JPEG", np.uint8)[None, :]
    offsets = np.arange(n + 1, dtype=np.int64) * width
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def write_synthetic_index(path: str, n: int) -> float:
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "path": synthetic_paths(n),
            "container": np.zeros(n, np.int32),
            "offset": np.zeros(n, np.int64),
            "size": rng.integers(20_000, 200_000, n),
            "label": (np.arange(n) // 1300).astype(np.int32),
            "caption": pa.nulls(n, pa.large_string()),
            "json": pa.nulls(n, pa.large_string()),
            "width": np.full(n, -1, np.int32),
            "height": np.full(n, -1, np.int32),
            "source": np.zeros(n, np.int16),
        }
    )
    meta = {
        "containers": [{"kind": "dir", "path": "/nonexistent/imagenet"}],
        "sources": [{"name": "synthetic", "weight": 1.0, "start_row": 0, "num_rows": n, "classes": []}],
    }
    write_index_atomic(table, meta, path)
    return time.perf_counter() - start


def lookup_latency_us(lookup, n: int, count: int = 200_000):
    """Microseconds per random lookup, (CPU time, wall time), for a first pass (pages of the map
    touched for the first time in this process: minor faults) and a second pass over the same
    rows (steady state)."""
    rows = np.random.default_rng(1).integers(0, n, count).tolist()
    passes = []
    for _ in range(2):
        cpu, wall = time.process_time(), time.perf_counter()
        for row in rows:
            lookup(row)
        passes.append(((time.process_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6))
    return passes


def _memory_mib(proc: psutil.Process):
    info = proc.memory_full_info()
    return info.uss / MIB, info.pss / MIB


def _worker(lookup, n, count, worker_id, queue):
    rng = np.random.default_rng(worker_id)
    proc = psutil.Process()
    marks = [_memory_mib(proc)]
    for _quarter in range(4):
        for row in rng.integers(0, n, count // 4).tolist():
            lookup(row)
        marks.append(_memory_mib(proc))
    queue.put(marks)


def worker_memory(lookup, n: int, workers: int, lookups_per_worker: int):
    """[(uss, pss) at 0, 25, 50, 75, 100% of the lookups] averaged over forked workers."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(lookup, n, lookups_per_worker, w, queue)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return np.mean(np.array(results), axis=0)  # (5, 2)


def bench_index(rows: int, list_rows: int, workers: int, tmp: Path):
    path = str(tmp / "synthetic.arrow")
    write_s = write_synthetic_index(path, rows)
    start = time.perf_counter()
    reader = open_index([path])
    open_s = time.perf_counter() - start
    per_worker = rows // workers
    arrow_lookup = reader.image_location
    arrow_us = lookup_latency_us(arrow_lookup, rows)
    arrow_mem = worker_memory(arrow_lookup, rows, workers, per_worker)
    start = time.perf_counter()
    paths = [f"n{i // 1300:08d}/{i:010d}.JPEG" for i in range(list_rows)]
    labels = [i // 1300 for i in range(list_rows)]
    list_build_s = time.perf_counter() - start
    list_lookup = lambda i: (paths[i], labels[i])  # noqa: E731  what a list-based Dataset.__getitem__ touches
    list_us = lookup_latency_us(list_lookup, list_rows)
    list_mem = worker_memory(list_lookup, list_rows, workers, list_rows // workers)
    scale = rows / list_rows
    print(f"\n## Index: {rows:,} rows, {workers} forked workers, each doing rows/workers random lookups (one epoch)")
    print(f"{'':34} {'Arrow index (ours)':>22} {'Python list':>22}")
    print(f"{'build / create (s)':34} {write_s:>22.2f} {list_build_s * scale:>16.2f} (extr.)")
    print(f"{'file size (MiB)':34} {os.path.getsize(path) / MIB:>22.1f} {'-':>22}")
    print(f"{'open (s)':34} {open_s:>22.4f} {'-':>22}")
    for name, a, b in (("first touch", arrow_us[0], list_us[0]), ("warm", arrow_us[1], list_us[1])):
        print(
            f"{f'random lookup, {name}, cpu / wall (us)':34} {a[0]:>12.2f} / {a[1]:>7.2f} {b[0]:>12.2f} / {b[1]:>7.2f}"
        )
    for k, pct in enumerate((0, 25, 50, 75, 100)):
        a, b = arrow_mem[k], list_mem[k]
        growth = (b[0] - list_mem[0][0]) * scale
        print(
            f"{f'worker USS / PSS at {pct:3d}% (MiB)':34} {a[0]:>10.1f} / {a[1]:>9.1f} "
            f"{b[0]:>10.1f} / {b[1]:>9.1f}  (+{growth:.0f} USS extr.)"
        )
    print(f"(Python list measured at {list_rows:,} rows; 'extr.' = scaled linearly to {rows:,})")


def photo_like_jpegs(folder: Path, count: int, width: int = 500, height: int = 375):
    """q90 JPEGs with smooth shapes plus texture (compress like photos: ~90 KB at 500x375)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        base = np.stack(
            [
                128 + 100 * np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 80))
                for _ in range(3)
            ],
            -1,
        )
        pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def _cpu_ms_interleaved(loops: dict, rounds: int = 7) -> dict:
    """{name: (fn, items)} -> {name: CPU ms per item}, best of `rounds` passes, the loops taking
    turns so that a slow spell of the machine hits all of them alike (process time: robust to
    other jobs on the machine)."""
    best = {name: float("inf") for name in loops}
    for _ in range(rounds):
        for name, (fn, items) in loops.items():
            start = time.process_time()
            for item in items:
                fn(item)
            best[name] = min(best[name], (time.process_time() - start) / len(items) * 1e3)
    return best


def bench_decode(paths, tmp: Path, label: str, out_size: int = 224):
    torch.set_num_threads(1)  # per core, as in a DataLoader worker
    index = build_index([str(paths[0].parent)], str(tmp / f"jpegs_{label}.arrow"), num_workers=1)
    decoders = ["pillow"] + (["simplejpeg"] if simplejpeg else [])
    datasets = {
        decoder: MaskedImageDataset(
            open_index([index]),
            SampleSpec(img_size=out_size, jpeg_decoder=decoder),
            build_mask_generator(MaskConfig(), (16, 16)),
        )
        for decoder in decoders
    }
    dataset = datasets[DEFAULT_JPEG_DECODER]
    rows, rng = range(len(paths)), np.random.default_rng(0)
    datas = [p.read_bytes() for p in paths]
    headers = [read_header(d, 1 << 40) for d in datas]
    boxes = [random_resized_crop_box(*h.upright_size, (0.2, 1.0), rng) for h in headers]
    decoded = [
        simplejpeg.decode_jpeg(d, "RGB") if simplejpeg else np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
        for d in datas
    ]
    mask = build_mask_generator(MaskConfig(), (16, 16))
    loops = {
        LIMIT: (lambda p: Image.open(p).convert("RGB"), paths),
        # what the issue times: read, header, RandomResizedCrop box, decode, crop + resize, flip
        **{
            f"ours: decode + crop + flip ({decoder})": (lambda i, d=datasets[decoder]: d.load_image(i, rng), rows)
            for decoder in decoders
        },
        f"ours: whole sample, dataset[i] (+ mask; {DEFAULT_JPEG_DECODER})": (lambda i: dataset[(0, i)], rows),
        "  stage: read file": (lambda p: p.read_bytes(), paths),
        "  stage: header + crop box": (
            lambda d: random_resized_crop_box(*read_header(d, 1 << 40).upright_size, (0.2, 1.0), rng),
            datas,
        ),
        "  stage: Pillow decode (load)": (lambda d: Image.open(io.BytesIO(d)).load(), datas),
        **({"  stage: simplejpeg decode": (lambda d: simplejpeg.decode_jpeg(d, "RGB"), datas)} if simplejpeg else {}),
        "  stage: crop + resize + flip": (
            lambda i: resize_pixels(
                channels_last(decoded[i][boxes[i][1] : boxes[i][3], boxes[i][0] : boxes[i][2]]), out_size, True
            ),
            rows,
        ),
        "  stage: block mask 105/256": (lambda _: mask(rng), rows),
        "  stage: per-sample RNG": (lambda i: np.random.default_rng([0, 1, i]), rows),
    }
    ms = _cpu_ms_interleaved(loops)
    plain = ms[LIMIT]
    mean_kb = np.mean([p.stat().st_size for p in paths]) / 1024
    print(
        f"\n## Decode per core (CPU time, best of 7 interleaved): {len(paths)} JPEGs {label} q90 (~{mean_kb:.0f} KB) "
        f"-> {out_size}x{out_size}"
    )
    for name, value in ms.items():
        share = (
            "  (the limit)"
            if name == LIMIT
            else ""
            if name.startswith("  ")
            else f"  = {plain / value:.0%} of the limit"
        )
        rate = "" if name.startswith("  ") else f"{1e3 / value:>8.0f} img/s"
        print(f"{name:52} {rate:>14} {value:>7.3f} ms{share}")


def bench_tar(paths, tmp: Path, num_shards: int = 4):
    shard_dir = tmp / "shards"
    shard_dir.mkdir()
    for s in range(num_shards):
        with tarfile.open(shard_dir / f"{s:05d}.tar", "w") as tar:
            for i in range(s, len(paths), num_shards):
                tar.add(paths[i], arcname=f"{i:08d}.jpg")
    reader = open_index([build_index([str(shard_dir)], str(tmp / "tar.arrow"), num_workers=1)])
    total = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    for shard in sorted(shard_dir.iterdir()):
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                tar.extractfile(member).read()
    seq_s = time.perf_counter() - start
    rows = list(range(len(reader)))
    random.Random(0).shuffle(rows)
    handles = HandleCache()
    start = time.perf_counter()
    for row in rows:
        read_image_bytes(reader.image_location(row), handles)
    rand_s = time.perf_counter() - start
    print(f"\n## Tar shards: {len(paths)} samples in {num_shards} shards ({total / MIB:.1f} MiB), page cache warm")
    print(
        f"{'sequential tar scan (tarfile)':40} {len(paths) / seq_s:>10.0f} samples/s {total / MIB / seq_s:>8.0f} MiB/s"
    )
    print(
        f"{'random positioned reads via index':40} {len(paths) / rand_s:>10.0f} samples/s "
        f"{total / MIB / rand_s:>8.0f} MiB/s"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=30_000_000)
    p.add_argument("--list-rows", type=int, default=3_000_000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--skip-index", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        if not args.skip_index:
            bench_index(args.rows, min(args.list_rows, args.rows), args.workers, tmp)
        paths = photo_like_jpegs(tmp / "jpegs" / "all", args.images)
        bench_decode(paths, tmp, "500x375")
        bench_decode(photo_like_jpegs(tmp / "large" / "all", args.images // 4, 1024, 768), tmp, "1024x768")
        bench_tar(paths, tmp)


if __name__ == "__main__":
    main()
