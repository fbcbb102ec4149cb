"""The plan of a pretraining recipe on a cluster: memory per GPU, largest micro batch that fits,
ZeRO traffic, throughput, wall-clock and GPU-hours; as a dict and as the text the tools print."""

import json
from dataclasses import dataclass
from pathlib import Path

from eva_train.config import Config, derived_grad_accum
from eva_train.optim.schedule import recipe_steps
from eva_train.plan import comm, memory
from eva_train.plan.gpus import GpuSpec
from eva_train.plan.shapes import RecipeShapes, recipe_shapes

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MFU = 0.40  # assumed when no measurement is given: between NeMo's CLIP-g (~20%) and our 50% goal
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MAX_MICRO_BATCH = 4096


@dataclass(frozen=True)
class Throughput:
    mfu: float
    mfu_source: str  # "assumed" or where the measurement came from


def read_ds_config(path: str) -> dict:
    """The recipe's DeepSpeed JSON (as given, or relative to the repository)."""
    candidate = Path(path)
    if not candidate.is_file():
        candidate = REPO_ROOT / path
    return json.loads(candidate.read_text())


def predict_memory(
    shapes: RecipeShapes, zero: memory.ZeroSettings, world: int, micro_batch: int, precision: str, on_gpu: bool = True
) -> memory.MemoryBreakdown:
    return memory.predict(shapes.student, shapes.teacher, zero, world, micro_batch, DTYPE_BYTES[precision], on_gpu)


def largest_micro_batch(
    shapes: RecipeShapes, zero: memory.ZeroSettings, world: int, precision: str, gpu: GpuSpec
) -> int:
    """Largest micro batch whose predicted peak stays within the card less the workspace (0: none)."""
    budget = gpu.memory_bytes * (1 - memory.WORKSPACE_FRACTION)
    low, high = 0, MAX_MICRO_BATCH
    while low < high:  # memory grows with the micro batch: bisect
        mid = (low + high + 1) // 2
        if predict_memory(shapes, zero, world, mid, precision).peak <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def build_plan(
    cfg: Config,
    world: int,
    gpu: GpuSpec,
    nodes: int,
    dataset_size: int,
    throughput: Throughput,
    ds_config: dict | None = None,
) -> dict:
    ds_config = ds_config if ds_config is not None else read_ds_config(cfg.train.deepspeed_config)
    zero = memory.ZeroSettings.from_ds_config(ds_config)
    shapes = recipe_shapes(cfg, zero.persistence_threshold)
    micro, precision = cfg.train.micro_batch_size, cfg.train.precision
    mem = predict_memory(shapes, zero, world, micro, precision)
    accum = derived_grad_accum(cfg, world)
    images_per_s = gpu.peak_flops * throughput.mfu / shapes.train_flops_per_image
    compute_s = accum * micro / images_per_s
    link = gpu.link_gbs if nodes > 1 else gpu.nvlink_gbs
    traffic = comm.plan_comm(zero.stage, shapes.student.params, DTYPE_BYTES[precision], world, accum, link, compute_s)
    total, _ = recipe_steps(cfg, dataset_size)
    step_s = max(compute_s, traffic.seconds_per_step)  # collectives overlap compute; the slower one sets the pace
    wall_s = total * step_s
    return {
        "recipe": cfg.recipe,
        "gpu": gpu.name,
        "world_size": world,
        "nodes": nodes,
        "zero_stage": zero.stage,
        "offload_optimizer": zero.offload_optimizer,
        "precision": precision,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "checkpointed_blocks": shapes.student.checkpointed_blocks,
        "depth": shapes.student.arch.depth,
        "student_params": shapes.student.params,
        "teacher_params": shapes.teacher.params if shapes.teacher else 0,
        "memory_bytes": mem.items,
        "memory_phases_bytes": mem.phases,
        "peak_bytes": mem.peak,
        "usable_bytes": gpu.memory_bytes * (1 - memory.WORKSPACE_FRACTION),
        "gpu_bytes": gpu.memory_bytes,
        "fits": mem.peak <= gpu.memory_bytes * (1 - memory.WORKSPACE_FRACTION),
        "largest_micro_batch": largest_micro_batch(shapes, zero, world, precision, gpu),
        "comm_bytes_per_step": traffic.bytes_per_step,
        "comm_seconds_per_step": traffic.seconds_per_step,
        "compute_seconds_per_step": compute_s,
        "comm_hidden": traffic.hidden,
        "link_gbs": link,
        "train_flops_per_image": shapes.train_flops_per_image,
        "mfu": throughput.mfu,
        "mfu_source": throughput.mfu_source,
        "images_per_s_per_gpu": images_per_s * compute_s / step_s,
        "dataset_size": dataset_size,
        "global_batch_size": cfg.train.global_batch_size,
        "total_steps": total,
        "step_seconds": step_s,
        "wall_clock_hours": wall_s / 3600,
        "gpu_hours": wall_s * world / 3600,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:7.2f} GiB"


MEMORY_ROWS = (
    ("parameters", "parameters (compute dtype)"),
    ("gathered", "ZeRO-3 gathered layers"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer (fp32 master + AdamW moments)"),
    ("buckets", "DeepSpeed reduce buckets"),
    ("teacher_weights", "teacher weights (fp32, whole)"),
    ("teacher_targets", "teacher targets (fp32)"),
    ("teacher_forward", "teacher forward (no_grad, transient)"),
    ("activations", "student activations"),
    ("batch", "input batch (uint8)"),
)


def format_plan(p: dict) -> str:
    """The text both tools/plan.py and `pretrain.py --dry-run` print."""
    mem = p["memory_bytes"]
    lines = [
        f"plan: {p['recipe']} on {p['world_size']} x {p['gpu']} ({p['nodes']} node(s)), ZeRO-{p['zero_stage']}"
        f"{' + optimizer offload' if p['offload_optimizer'] else ''}, {p['precision']}, micro batch "
        f"{p['micro_batch_size']} x accumulation {p['gradient_accumulation_steps']}, activation checkpointing "
        f"{p['checkpointed_blocks']}/{p['depth']} blocks",
        f"  student {p['student_params'] / 1e6:.2f}M params, teacher {p['teacher_params'] / 1e6:.2f}M",
        "  memory per GPU (predicted peak of live tensors):",
    ]
    lines += [f"    {label:<42}{_gib(mem[key])}" for key, label in MEMORY_ROWS]
    for phase, value in p["memory_phases_bytes"].items():
        lines.append(f"    peak in {phase:<34}{_gib(value)}")
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    lines += [
        f"    {'peak':<42}{_gib(p['peak_bytes'])}  of {_gib(p['usable_bytes']).strip()} usable "
        f"({memory.WORKSPACE_FRACTION:.0%} of {_gib(p['gpu_bytes']).strip()} kept for workspace): {verdict}",
        f"  largest micro batch that fits: {p['largest_micro_batch']}"
        f"{' (the most it tries)' if p['largest_micro_batch'] == MAX_MICRO_BATCH else ''}",
        f"  ZeRO traffic per step: {p['comm_bytes_per_step'] / 1e9:.1f} GB per GPU = "
        f"{p['comm_seconds_per_step']:.3f} s at {p['link_gbs']:g} GB/s vs {p['compute_seconds_per_step']:.3f} s "
        f"compute: {'hidden under compute' if p['comm_hidden'] else 'NOT hidden: communication-bound'}",
        f"  throughput at {p['mfu']:.0%} MFU ({p['mfu_source']}): {p['train_flops_per_image'] / 1e9:.0f} "
        f"GFLOP per image -> {p['images_per_s_per_gpu']:.1f} images/s per GPU, "
        f"{p['images_per_s_per_gpu'] * p['world_size']:.0f} images/s in all",
        f"  whole recipe: {p['total_steps']} steps x {p['global_batch_size']} images ({p['dataset_size']} "
        f"per epoch) -> {p['wall_clock_hours']:.1f} h wall-clock ({p['wall_clock_hours'] / 24:.1f} days), "
        f"{p['gpu_hours']:.0f} GPU-hours",
    ]
    return "\n".join(lines)


def format_finetune_fits(rows: list[dict]) -> str:
    lines = ["fine-tune recipes on one 80 GB card (predicted peak at the recipe's micro batch):"]
    for r in rows:
        lines.append(f"  {r['recipe']:<28}{r['detail']}")
    return "\n".join(lines)


def dry_run_text(cfg: Config, world: int, dataset_size: int) -> str:
    """What `pretrain.py --dry-run` (and so `slurm/eva_g.sh --dry-run`) prints: the plan on the card named
    by $EVA_PLAN_GPU (default h100), GPUS_PER_NODE ranks per node (default 8), at the assumed MFU."""
    import os

    from eva_train.plan.gpus import GPUS

    name = os.environ.get("EVA_PLAN_GPU", "h100").lower()
    if name not in GPUS:
        raise ValueError(f"EVA_PLAN_GPU={name} is unknown; use one of {', '.join(GPUS)}")
    per_node = int(os.environ.get("GPUS_PER_NODE") or 8) or 8
    nodes = max(1, -(-world // per_node))
    plan = build_plan(cfg, world, GPUS[name], nodes, dataset_size, Throughput(DEFAULT_MFU, "assumed"))
    return format_plan(plan) + "\n  (tools/plan.py: other cards, a measured MFU, fine-tune recipes)"
