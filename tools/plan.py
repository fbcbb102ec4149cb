#!/usr/bin/env python
"""Plan a pretraining run before it is queued: per-GPU memory by ZeRO stage, the largest micro batch
that fits, ZeRO traffic and whether it hides under compute, images/s, wall-clock and GPU-hours.

    python tools/plan.py --recipe eva_g_p14_m30m --nodes 16 --gpus-per-node 8 --gpu h100
    python tools/plan.py --recipe eva02_l_p14 --world-size 64 --gpu a100-40gb --train.micro_batch_size=16
    python tools/plan.py --gpu-mem 94 --gpu-tflops 700 --link-gbps 25 ...   # any card
    python tools/plan.py ... --measured bench.csv      # MFU measured by tools/bench_step.py on that card
    python tools/plan.py --finetune                    # every fine-tune recipe: fits on an 80 GB card?
    python tools/plan.py --validate                    # predicted vs measured peak memory (real DeepSpeed)

Any other argument is a recipe override, as for pretrain.py (--section.key=value).
"""

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eva_train.config import ConfigError, build_config  # noqa: E402
from eva_train.plan.gpus import GPUS, custom_spec, spec_for_device  # noqa: E402
from eva_train.plan.report import DEFAULT_MFU, Throughput  # noqa: E402

ASSUMED_DATASET_SIZE = 30_000_000  # Merged-30M, by its name, when no index is given


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="other arguments: recipe overrides --section.key=value"
    )
    p.add_argument("--recipe", default="eva_g_p14_m30m")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--world-size", type=int, default=None, help="ranks in all (default nodes x gpus-per-node)")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)}")
    p.add_argument("--gpu-mem", type=float, default=None, help="device memory, GiB")
    p.add_argument("--gpu-tflops", type=float, default=None, help="dense bf16 peak, TFLOP/s")
    p.add_argument("--link-gbps", type=float, default=None, help="inter-node bandwidth per GPU, GB/s (bytes)")
    p.add_argument("--mfu", type=float, default=None, help=f"assumed MFU (default {DEFAULT_MFU:.0%})")
    p.add_argument("--measured", default=None, help="CSV of tools/bench_step.py --csv on this card: its MFU")
    p.add_argument(
        "--dataset-size",
        type=int,
        default=None,
        help=f"images per epoch (default: the recipe's index, else {ASSUMED_DATASET_SIZE:,})",
    )
    p.add_argument(
        "--finetune",
        nargs="*",
        default=None,
        metavar="RECIPE",
        help="fine-tune recipes to check on an 80 GB card (none named: all of eva_train/eval/recipes)",
    )
    p.add_argument("--validate", action="store_true", help="predicted vs measured peak memory of real runs")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p.parse_known_args(argv)


def world_and_nodes(args) -> tuple:
    if args.world_size is not None and args.nodes is not None and args.world_size != args.nodes * args.gpus_per_node:
        raise ConfigError(
            f"--world-size {args.world_size} != --nodes {args.nodes} x --gpus-per-node "
            f"{args.gpus_per_node}; give one of them"
        )
    world = args.world_size or (args.nodes or 1) * args.gpus_per_node
    nodes = args.nodes or max(1, -(-world // args.gpus_per_node))
    if world < 1 or nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--world-size, --nodes and --gpus-per-node must be positive")
    return world, nodes


def gpu_spec(args):
    if args.gpu not in GPUS:
        raise ConfigError(
            f"--gpu {args.gpu} is unknown; use one of {', '.join(GPUS)} or give --gpu-mem, --gpu-tflops and --link-gbps"
        )
    explicit = (args.gpu_mem, args.gpu_tflops, args.link_gbps)
    if any(v is not None and v <= 0 for v in explicit):
        raise ConfigError("--gpu-mem, --gpu-tflops and --link-gbps must be positive")
    return custom_spec(GPUS[args.gpu], *explicit) if any(v is not None for v in explicit) else GPUS[args.gpu]


def measured_throughput(path: str, gpu, variant: str) -> Throughput:
    """MFU of our implementation's row in a tools/bench_step.py CSV, taken on the card planned for.
    bench_step times the student's step without the teacher; its MFU is applied to the whole step
    (teacher forward included: the same dense bf16 matmuls, so about the same utilisation)."""
    try:
        rows = list(csv.DictReader(open(path, newline="")))
    except OSError as error:
        raise ConfigError(
            f"--measured {path}: cannot read it ({error.strerror}); give the CSV that tools/bench_step.py --csv wrote"
        ) from None
    ours = [r for r in rows if r.get("impl") == "eva_train" and r.get("mfu") not in (None, "", "nan")]
    if not ours:
        raise ConfigError(f"--measured {path} has no eva_train row with an MFU; run tools/bench_step.py --csv on a GPU")
    same = [r for r in ours if r.get("variant") == variant] or ours
    row = same[0]
    card = spec_for_device(row.get("device", ""))
    if card is None or card.name.split()[0] != gpu.name.split()[0]:
        raise ConfigError(
            f"--measured {path} was taken on '{row.get('device')}', not on a {gpu.name}; "
            f"measure on that card or plan with --gpu for the card it was taken on"
        )
    return Throughput(
        float(row["mfu"]),
        f"measured by bench_step on {row['device']}, {row['variant']} micro batch {row['micro_batch_size']}",
    )


def dataset_size(cfg, args) -> int:
    if args.dataset_size is not None:
        if args.dataset_size < 1:
            raise ConfigError("--dataset-size must be positive")
        return args.dataset_size
    if cfg.data.index:
        from eva_train.data.index import check_index

        return check_index(cfg.data.index).epoch_length
    return ASSUMED_DATASET_SIZE


def plan_text(argv: list[str] | None = None) -> str:
    from eva_train.plan.report import build_plan, format_plan

    args, overrides = parse_args(argv)
    cfg = build_config(args.recipe, overrides)
    world, nodes = world_and_nodes(args)
    gpu = gpu_spec(args)
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu} must lie in (0, 1], e.g. 0.4")
    throughput = (
        measured_throughput(args.measured, gpu, cfg.model.variant)
        if args.measured
        else Throughput(args.mfu or DEFAULT_MFU, "given" if args.mfu else "assumed")
    )
    size = dataset_size(cfg, args)
    plan = build_plan(cfg, world, gpu, nodes, size, throughput)
    if args.json:
        return json.dumps(plan, indent=2)
    note = "" if (args.dataset_size or cfg.data.index) else f"\n  (dataset size assumed: {size:,}; --dataset-size N)"
    return format_plan(plan) + note


def finetune_text(names: list[str], world: int) -> str:
    from eva_train.plan.finetune import finetune_recipes, plan_finetune
    from eva_train.plan.report import format_finetune_fits

    return format_finetune_fits([plan_finetune(n, world, GPUS["h100"]) for n in (names or finetune_recipes())])


def validate_memory_model() -> int:
    """Predicted vs measured peak memory: on the GPU when there is one (EVA-02-L, EVA-g), else on CPU."""
    import torch

    sys.path.insert(0, str(REPO / "tools"))
    import plan_measure  # tools/plan_measure.py: launches the real DeepSpeed ranks

    on_gpu = torch.cuda.is_available()
    try:
        rows = plan_measure.validate(gpu=on_gpu)
    except (RuntimeError, subprocess.TimeoutExpired) as error:  # a measuring rank failed: its log's tail
        print(f"error: the measurement runs failed: {error}", file=sys.stderr)
        return 1
    method = "torch.cuda.max_memory_allocated" if on_gpu else "torch.profiler CPU allocations"
    print(plan_measure.format_rows(rows, method))
    return 0 if all(abs(r["error"]) <= plan_measure.TOLERANCE for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    try:
        args, overrides = parse_args(argv)
        if args.validate:
            return validate_memory_model()
        if args.finetune is not None:
            print(finetune_text(args.finetune, world_and_nodes(args)[0]))
            return 0
        print(plan_text(argv))
        return 0
    except (ConfigError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
