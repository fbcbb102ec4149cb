"""Consolidation benchmark: our streaming reader against DeepSpeed's zero_to_fp32, and the
maker of the real ZeRO checkpoints it (and tests/test_consolidate.py) reads.

  # 1) a real ZeRO-3 checkpoint of EVA-L (2 CPU ranks, one AdamW step, bf16, optimizer state included)
  DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tools/bench_consolidate.py \
      make --model eva_l_p14 --stages 3 --precision bf16 --img-size 112 --out /tmp/bench_eva_l
  # 2) time the tools, each in a fresh process (wall time, peak RSS), with the checkpoint out of
  #    the page cache (as after a training run) and in it, and compare the tensors: zero_to_fp32,
  #    ours, and ours with torch.load(mmap=True, weights_only=True) as the reader (why torch_zip stays)
  python tools/bench_consolidate.py run /tmp/bench_eva_l/checkpoints --repeats 2 [--cache cold|warm|both]

`make` runs under torch.distributed (RANK/WORLD_SIZE set); it writes OUT/checkpoints/<tag>/ with
a COMPLETE marker and OUT/checkpoints/latest, the layout of the eva-train contract.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# -------------------------------------------------------------------------------- make (workers)


def _toy_model():
    """A model that is not ours: embedding tied to the output head, odd sizes (padding across
    ranks), a frozen parameter and a buffer."""
    import torch
    import torch.nn as nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(37, 12)
            self.body = nn.Sequential(nn.Linear(12, 13), nn.GELU(), nn.Linear(13, 12))
            self.norm = nn.LayerNorm(12)
            self.head = nn.Linear(12, 37, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.frozen_scale = nn.Parameter(torch.full((5,), 0.5), requires_grad=False)
            self.register_buffer("step_count", torch.arange(3, dtype=torch.int64))

        def forward(self, ids):
            h = self.norm(self.body(self.emb(ids))) * self.frozen_scale.mean()
            return self.head(h)

    return Toy()


def _make_batch(model_name, img_size, generator):
    import torch

    if model_name == "toy":
        return torch.randint(0, 37, (2, 5), generator=generator)
    return torch.randn(1, 3, img_size, img_size, generator=generator)


def _build(model_name, img_size):
    if model_name == "toy":
        return _toy_model()
    from eva_train.config import ModelConfig
    from eva_train.models import build_model

    cfg = ModelConfig(variant=model_name, img_size=img_size, drop_path_rate=0.0, checkpoint_fraction=0.0)
    return build_model(cfg, teacher_dim=16)


def _default_img_size(model_name: str) -> int:
    if model_name == "toy":
        return 0
    from eva_train.models.variants import VARIANTS

    return VARIANTS[model_name].default_img_size


def _ds_config(stage, precision):
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1_000_000,
    }


def _param_groups(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]


def make_checkpoints(args) -> None:
    """One process per rank; one checkpoint per model in --model and ZeRO stage in --stages
    (OUT[/<model>][/zero<stage>]/checkpoints, the optional parts when several are given), in one
    launch to save start-up time."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    stages = [int(s) for s in str(args.stages).split(",")]
    models = args.model.split(",")
    for model in models:
        for stage in stages:
            out = Path(args.out)
            out = out / model if len(models) > 1 else out
            out = out / f"zero{stage}" if len(stages) > 1 else out
            make_checkpoint(args, model, stage, out)


def make_checkpoint(args, model_name: str, stage: int, out: Path) -> None:
    """Build, run `steps` AdamW steps, save the way the engine does."""
    import deepspeed
    import torch

    from eva_train.runtime.fsio import atomic_write_text

    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    ds_config = _ds_config(stage, args.precision)
    with deepspeed.zero.Init(enabled=stage == 3, config_dict_or_path=ds_config):
        model = _build(model_name, args.img_size or _default_img_size(model_name))
    optimizer = torch.optim.AdamW(_param_groups(model), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    generator = torch.Generator().manual_seed(1 + rank)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    for _ in range(args.steps):
        batch = _make_batch(model_name, args.img_size or _default_img_size(model_name), generator)
        batch = batch.to(dtype) if batch.is_floating_point() else batch
        loss = engine(batch).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    root = out / "checkpoints"
    tag = f"step_{args.steps:08d}"
    img_size = args.img_size or _default_img_size(model_name)
    config = {"model": {"variant": model_name, "img_size": img_size, "mode": "mim"}} if model_name != "toy" else {}
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": args.steps, "config": config}, save_latest=False)
    torch.distributed.barrier()
    if rank == 0:
        atomic_write_text(
            root / tag / "COMPLETE", json.dumps({"step": args.steps, "world_size": world_size, "time": time.time()})
        )
        atomic_write_text(root / "latest", tag)
    torch.distributed.barrier()


# -------------------------------------------------------------------------------- run (benchmark)

_OURS = """
import sys
from eva_train.export.consolidate import consolidate
consolidate(sys.argv[1], sys.argv[2], progress=False)
"""

# The same consolidation with torch's own reader in place of eva_train.runtime.torch_zip: torch.load
# with mmap=True, weights_only=True and DeepSpeed's classes allow-listed as the same inert placeholders
# (no DeepSpeed import), tensors handed on as numpy views of the map (bf16 as BF16Array bit patterns).
_TORCH_LOAD = """
import sys
import numpy as np
import torch
from eva_train.runtime import torch_zip
from eva_train.export.consolidate import consolidate
SAFE = [(torch_zip.ALLOWED_GLOBALS[key], ".".join(key)) for key in torch_zip._DEEPSPEED_OBJECTS]
def as_numpy(obj):
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        if obj.dtype == torch.bfloat16:
            return obj.view(torch.int16).numpy().view(np.uint16).view(torch_zip.BF16Array)
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, as_numpy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_numpy(v) for v in obj)
    return obj
def load(path):
    with torch.serialization.safe_globals(SAFE):
        return as_numpy(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
torch_zip.load = load
consolidate(sys.argv[1], sys.argv[2], progress=False)
"""

_THEIRS = """
import sys
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
convert_zero_checkpoint_to_fp32_state_dict(sys.argv[1], sys.argv[2], safe_serialization=True)
"""


_DURABLE = """
import os, sys, time
start = time.perf_counter()
for root, _, files in os.walk(sys.argv[2]) if os.path.isdir(sys.argv[2]) else [("", [], [sys.argv[2]])]:
    for name in files:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
print("FSYNC_S", time.perf_counter() - start, file=sys.stderr)
"""


def _timed_child(code: str, ckpt: str, out: str) -> tuple:
    """(wall seconds until the tool returned, wall seconds until its output was on disk, peak RSS
    bytes) of a fresh python running `code` and then fsyncing what it wrote (ours already has)."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    wrapper = (
        code + "\nimport resource, sys\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n" + _DURABLE
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, ckpt, out], env=env, capture_output=True, text=True)
    durable_s = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    report = {
        line.split()[0]: float(line.split()[1])
        for line in proc.stderr.splitlines()
        if line.startswith(("PEAK_RSS_KB", "FSYNC_S"))
    }
    return durable_s - report["FSYNC_S"], durable_s, report["PEAK_RSS_KB"] * 1024


def _evict(paths) -> None:
    """Drop files from the page cache (clean pages only: no privilege needed), as after days of
    training when the checkpoint is long out of memory."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _identical(ours: str, theirs_dir: str) -> bool:
    from safetensors import safe_open

    theirs = os.path.join(theirs_dir, "model.safetensors")
    with safe_open(ours, "pt") as a, safe_open(theirs, "pt") as b:
        if set(a.keys()) != set(b.keys()):
            return False
        return all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())


def run_benchmark(args) -> None:
    from eva_train.export.consolidate import resolve_checkpoint

    tag_dir = resolve_checkpoint(args.ckpt, None)
    shard_files = [str(p) for p in tag_dir.iterdir() if p.suffix == ".pt"]
    theirs_code = _THEIRS.replace("sys.argv[1], sys.argv[2]", f"sys.argv[1], sys.argv[2], tag={tag_dir.name!r}")
    caches = ("cold", "warm") if args.cache == "both" else (args.cache,)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        ours_file, theirs_dir = os.path.join(scratch, "ours.safetensors"), os.path.join(scratch, "theirs")
        torch_file = os.path.join(scratch, "torch_load.safetensors")
        for _ in range(args.repeats):
            for cache in caches:
                # zero_to_fp32 takes the tag dir's parent plus the tag
                for name, code, ckpt, out in (
                    ("zero_to_fp32", theirs_code, str(tag_dir.parent), theirs_dir),
                    ("eva_train.export.consolidate", _OURS, str(tag_dir), ours_file),
                    ("same+torch.load(mmap)", _TORCH_LOAD, str(tag_dir), torch_file),
                ):
                    _remove(out)  # freeing a previous output's blocks is not part of either tool's time
                    os.sync()
                    if cache == "cold":
                        _evict(shard_files)
                    rows.append((name, cache, *_timed_child(code, ckpt, out)))
        same = _identical(ours_file, theirs_dir) and _identical(torch_file, theirs_dir)
        out_bytes = os.path.getsize(ours_file)
    _print_table(rows, out_bytes, same)


def _print_table(rows, out_bytes, same) -> None:
    best = {}
    for name, cache, wall_s, durable_s, rss in rows:
        prev = best.get((name, cache))
        best[(name, cache)] = (
            tuple(min(a, b) for a, b in zip(prev, (wall_s, durable_s, rss))) if prev else (wall_s, durable_s, rss)
        )
    print(f"output: {out_bytes / 2**30:.2f} GiB; tensors identical: {same}")
    print(
        "'returned': wall time until the tool exits (zero_to_fp32 leaves its output in the page cache; ours has "
        "fsynced it); 'on disk': until the output is durable (zero_to_fp32's fsynced after it returns)"
    )
    print(
        f"{'tool':<24}{'checkpoint':>11}{'returned s':>12}{'on disk s':>11}{'peak RSS GiB':>14}"
        f"{'x ref returned':>16}{'x ref on disk':>15}{'x ref RSS':>11}"
    )
    for (name, cache), (wall_s, durable_s, rss) in best.items():
        ref = best[("zero_to_fp32", cache)]
        print(
            f"{name:<24}{cache:>11}{wall_s:>12.2f}{durable_s:>11.2f}{rss / 2**30:>14.2f}"
            f"{wall_s / ref[0]:>16.2f}{durable_s / ref[1]:>15.2f}{rss / ref[2]:>11.2f}"
        )
    print(
        "all runs (returned / on disk s, RSS GiB): "
        + ", ".join(f"{n} {c} {w:.2f}/{d:.2f}/{r / 2**30:.2f}" for n, c, w, d, r in rows)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write a real ZeRO checkpoint (run under torch.distributed)")
    make.add_argument("--model", default="toy", help="toy and/or eva_train variant names, comma-separated")
    make.add_argument("--stages", default="3", help="ZeRO stages, e.g. 3 or 1,2,3")
    make.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    make.add_argument("--img-size", type=int, default=0, help="0 = the variant's default")
    make.add_argument("--steps", type=int, default=1)
    make.add_argument("--out", required=True)
    run = sub.add_parser("run", help="time our consolidation against zero_to_fp32")
    run.add_argument("ckpt", help="OUT/checkpoints or a tag dir")
    run.add_argument("--repeats", type=int, default=2)
    run.add_argument("--scratch", default=None, help="folder for the outputs (default: system temp)")
    run.add_argument(
        "--cache",
        choices=("cold", "warm", "both"),
        default="both",
        help="checkpoint files evicted from the page cache before each run (cold), or not",
    )
    args = parser.parse_args(argv)
    if args.command == "make":
        make_checkpoints(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
