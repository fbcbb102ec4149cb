#!/usr/bin/env python
"""Check the planner's memory model against real DeepSpeed runs (`tools/plan.py --validate`).

`validate()` starts this file once per rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT set); each rank builds
the recipe's real DeepSpeed engine and teacher for every configuration in turn, runs a few training
steps on synthetic batches and writes its peak tensor memory to OUT/rank{R}.json; `validate()` then
prints predicted vs measured. On CPU: eva_demo_p8 at 128 px on 2 ranks, ZeRO 1/2/3, several micro
batches and checkpoint fractions; on a GPU: EVA-02-L and EVA-g bf16 under ZeRO-3 on one card.

What is measured: bytes of live tensors, the quantity the planner predicts.
- CUDA: `torch.cuda.max_memory_allocated` (the caching allocator's own count of live blocks).
- CPU (DS_ACCELERATOR=cpu): there is no caching allocator to ask, and RSS mixes in glibc's free
  lists, untouched `torch.empty` pages and the Python heap. torch's profiler with profile_memory
  reports every CPU tensor allocation and free with the running total of bytes allocated since it
  started; started before the engine and teacher exist, its maximum is the CPU analogue of
  max_memory_allocated. Buffers that gloo/NCCL allocate themselves are outside both counts.

    python tools/plan_measure.py OUT RUNS.json      # one rank (what validate() starts)
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from eva_train.config import build_config  # noqa: E402
from eva_train.data.masking import scaled_patch_count  # noqa: E402
from eva_train.models.variants import VARIANTS  # noqa: E402
from eva_train.runtime.distributed import init_process_group, world_from_env  # noqa: E402

MEASURED_STEPS = 2
TOLERANCE = 0.15
SMALL_BUCKET = 1_000_000  # reduce_bucket_size of the CPU runs: the default 5e8 would dwarf a tiny model
# (stage, checkpoint fraction, micro batch): every ZeRO stage, three fractions, two micro batches
CPU_RUNS = ((1, 0.0, 8), (2, 0.0, 8), (3, 0.0, 8), (3, 1.0, 16), (2, 0.5, 16), (1, 1.0, 16))
CPU_RECIPE, CPU_OVERRIDES, CPU_WORLD = "demo", ("--model.img_size=128",), 2
GPU_RUNS = (("eva02_l_p14", 1.0, 32), ("eva_g_p14_m30m", 1.0, 32))  # the recipes' own micro batch and fraction


def synthetic_batch(cfg, generator: torch.Generator) -> dict:
    """A loader-shaped micro batch: uint8 images and exactly the recipe's masked-patch count per image."""
    b, px = cfg.train.micro_batch_size, cfg.model.img_size
    grid = px // VARIANTS[cfg.model.variant].patch_size
    masked = scaled_patch_count(cfg.mask.num_masking_patches, (grid, grid))
    images = torch.randint(0, 256, (b, 3, px, px), generator=generator, dtype=torch.uint8)
    mask = torch.rand(b, grid * grid, generator=generator).argsort(1) < masked
    return {"images": images, "mask": mask, "bad": torch.zeros(b, dtype=torch.bool)}


def run_steps(cfg, world, device) -> None:
    from eva_train.models.teacher import build_teacher
    from eva_train.train.engine import Trainer, build_ds_config, build_engine

    ds_config = build_ds_config(cfg, world.world_size)
    grid = cfg.model.img_size // VARIANTS[cfg.model.variant].patch_size
    teacher = build_teacher(cfg.teacher, grid, device)
    engine, optimizer = build_engine(cfg, ds_config, teacher.out_dim, device)
    trainer = Trainer(engine, teacher, optimizer, device, cfg.train.precision, lambda step: cfg.optim.lr)
    generator = torch.Generator().manual_seed(world.rank)
    for step in range(MEASURED_STEPS):
        trainer.train_step(step, [synthetic_batch(cfg, generator)])
    engine.destroy()  # its ZeRO hooks and buffers would otherwise live on into the next run's measurement


def cpu_peak_bytes(cfg, world, device) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_steps(cfg, world, device)
    stack, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
    return int(peak)


def measure(cfg, world, device) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        run_steps(cfg, world, device)
        return torch.cuda.max_memory_allocated(device)
    return cpu_peak_bytes(cfg, world, device)


def measure_run(run: dict, world, out: Path) -> None:
    os.environ["MASTER_PORT"] = str(run["port"])
    device = init_process_group(world, 1800)
    cfg = build_config(run["recipe"], run["overrides"])
    cfg.teacher.random_init = True  # the tower's shape is what costs memory; its weights do not matter
    peak = measure(cfg, world, device)
    method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocations"
    (out / f"run{run['index']}_rank{world.rank}.json").write_text(json.dumps({"peak_bytes": peak, "method": method}))


def measure_in_child(run: dict, world, out: Path) -> int:
    """Measure one run in a forked child: every run starts from a fresh heap and process group (runs in
    one process inflate each other's peaks by up to 50% here), without paying the imports again."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            measure_run(run, world, out)
            code = 0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main(argv=None) -> int:
    """argv: OUT RUNS.json, RUNS.json = [{"index", "recipe", "overrides", "port"}, ...]; this rank
    measures each run in turn, each in its own forked child; a single run (the GPU's way: CUDA cannot
    be used in a child forked after the parent touched it) in this process."""
    out, runs_file = (Path(a) for a in (sys.argv[1:] if argv is None else argv))
    world, runs = world_from_env(), json.loads(runs_file.read_text())
    if len(runs) == 1:
        measure_run(runs[0], world, out)
        return 0
    import deepspeed  # noqa: F401 - imported once here, before the forks, so each child starts warm

    from eva_train.models import teacher  # noqa: F401 - open_clip, likewise
    from eva_train.train import engine  # noqa: F401

    for run in runs:
        code = measure_in_child(run, world, out)
        if code:
            return code
    return 0


def cpu_runs(tmp: Path) -> list[tuple[str, list[str]]]:
    runs = []
    for stage, fraction, micro in CPU_RUNS:
        ds = tmp / f"zero{stage}.json"
        base = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
        base["zero_optimization"]["reduce_bucket_size"] = SMALL_BUCKET
        ds.write_text(json.dumps(base))
        runs.append(
            (
                CPU_RECIPE,
                [
                    *CPU_OVERRIDES,
                    f"--train.deepspeed_config={ds}",
                    f"--model.checkpoint_fraction={fraction}",
                    f"--train.micro_batch_size={micro}",
                    f"--train.global_batch_size={micro * CPU_WORLD}",
                ],
            )
        )
    return runs


def gpu_runs() -> list[tuple[str, list[str]]]:
    return [
        (
            recipe,
            [
                "--train.precision=bf16",
                "--train.deepspeed_config=ds_configs/zero3.json",
                f"--model.checkpoint_fraction={fraction}",
                f"--train.micro_batch_size={micro}",
                f"--train.global_batch_size={micro}",
            ],
        )
        for recipe, fraction, micro in GPU_RUNS
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    runs: Sequence[tuple[str, list[str]]], world: int, out: Path, timeout_s: float, fork: bool = True
) -> list[int]:
    """Measured peak bytes per run (the largest over ranks): one process per rank, a fork per run
    (fork=False: a process per run)."""
    spec = [
        {"index": i, "recipe": recipe, "overrides": overrides, "port": free_port()}
        for i, (recipe, overrides) in enumerate(runs)
    ]
    for group in [spec] if fork else [[run] for run in spec]:
        start_ranks(group, world, out, timeout_s)
    return [
        max(json.loads((out / f"run{i}_rank{r}.json").read_text())["peak_bytes"] for r in range(world))
        for i in range(len(runs))
    ]


def start_ranks(spec: list[dict], world: int, out: Path, timeout_s: float) -> None:
    (out / "runs.json").write_text(json.dumps(spec))
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec[0]["port"]))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out), str(out / "runs.json")],
            cwd=REPO,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.DEVNULL,
            stderr=open(out / f"log_rank{r}.txt", "a"),
        )
        for r in range(world)
    ]
    try:
        codes = [p.wait(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if codes != [0] * world:
        tail = (out / "log_rank0.txt").read_text()[-2000:]
        raise RuntimeError(f"measurement ranks exited with {codes}:\n{tail}")


def compare(runs, world: int, measured: list[int], on_gpu: bool) -> list[dict]:
    from eva_train.plan.memory import ZeroSettings
    from eva_train.plan.report import predict_memory, read_ds_config
    from eva_train.plan.shapes import recipe_shapes

    rows = []
    for (recipe, overrides), peak in zip(runs, measured):
        cfg = build_config(recipe, overrides)
        zero = ZeroSettings.from_ds_config(read_ds_config(cfg.train.deepspeed_config))
        shapes = recipe_shapes(cfg, zero.persistence_threshold)
        predicted = predict_memory(shapes, zero, world, cfg.train.micro_batch_size, cfg.train.precision, on_gpu).peak
        rows.append(
            {
                "variant": cfg.model.variant,
                "zero": zero.stage,
                "fraction": cfg.model.checkpoint_fraction,
                "micro_batch": cfg.train.micro_batch_size,
                "world": world,
                "predicted": predicted,
                "measured": peak,
                "error": predicted / peak - 1,
            }
        )
    return rows


def validate(gpu: bool = False, timeout_s: float = 900.0) -> list[dict]:
    """Predicted vs measured rows (CPU runs, or the GPU runs on one card)."""
    runs, world = (gpu_runs(), 1) if gpu else (None, CPU_WORLD)
    with tempfile.TemporaryDirectory(prefix="plan_validate_") as tmp:
        runs = runs or cpu_runs(Path(tmp))
        measured = launch(runs, world, Path(tmp), timeout_s, fork=not gpu)
        return compare(runs, world, measured, on_gpu=gpu)


def format_rows(rows: list[dict], method: str) -> str:
    lines = [
        f"peak memory per rank, predicted (eva_train/plan/memory.py) vs measured ({method}); tolerance {TOLERANCE:.0%}",
        f"{'variant':<16}{'ZeRO':>5}{'ckpt':>6}{'micro':>6}{'ranks':>6}{'predicted MiB':>15}{'measured MiB':>14}"
        f"{'error':>8}  ok",
    ]
    for r in rows:
        ok = "yes" if abs(r["error"]) <= TOLERANCE else "NO"
        lines.append(
            f"{r['variant']:<16}{r['zero']:>5}{r['fraction']:>6.2f}{r['micro_batch']:>6}{r['world']:>6}"
            f"{r['predicted'] / 2**20:>15.1f}{r['measured'] / 2**20:>14.1f}{r['error']:>+8.1%}  {ok}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
