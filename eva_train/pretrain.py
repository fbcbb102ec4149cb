#!/usr/bin/env python
"""EVA masked-image-modeling pretraining: the entry point.

    deepspeed [--num_gpus N] eva_train/pretrain.py [--recipe NAME|PATH] [--deepspeed_config F]
        [--output_dir DIR] [--resume PATH|auto|none] [--print-config] [--dry-run] [--section.key=value ...]

Also `python eva_train/pretrain.py ...` (one process) and one process per task under srun. With no
recipe it runs `demo`: a tiny EVA on procedural images it generates itself, on CPU in minutes.
Exit codes: 0 finished (or stopped cleanly after a preemption save), 2 bad configuration, else error.
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: eva_train/ must not shadow top-level modules (config, metrics, ...)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import json
import logging
import subprocess
import warnings
from typing import List, Optional, Tuple

from eva_train.config import Config, ConfigError, build_config, derived_grad_accum, validate
from eva_train.runtime.distributed import world_from_env

log = logging.getLogger("eva_train.pretrain")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATASET_SIZE = 2000  # ensure_demo_data's default train split: the dry run's estimate before generation


def parse_args(argv: Optional[List[str]]) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="any other argument: --section.key=value overrides, e.g. --optim.lr=5e-4")
    parser.add_argument("--recipe", default=None, help="recipe name in eva_train/recipes or a .toml path (default demo)")
    parser.add_argument("--deepspeed_config", default=None, help="ZeRO/precision JSON (batch sizes come from the recipe)")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--resume", default=None, help="auto (latest complete checkpoint in output_dir), none, or a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the plan, exit (no process group, no model)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_known_args(argv)


def resolve_config(args: argparse.Namespace, overrides: List[str]) -> Config:
    cfg = build_config(args.recipe, overrides)
    if args.output_dir is not None:
        cfg.train.output_dir = args.output_dir
    if args.deepspeed_config is not None:
        cfg.train.deepspeed_config = args.deepspeed_config
    if args.resume is not None:
        cfg.checkpoint.resume = args.resume
    return cfg


def check_config(cfg: Config, world_size: int) -> None:
    """Everything that can fail cheaply, before a process group, a model or data workers exist."""
    from eva_train.train.checkpoint import check_checkpoint_config
    from eva_train.train.engine import build_ds_config
    from eva_train.models import check_model_config

    validate(cfg, world_size)
    try:
        check_model_config(cfg.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_checkpoint_config(cfg.checkpoint)
    build_ds_config(cfg, world_size)
    _check_teacher_name(cfg.teacher.name)


def _check_teacher_name(name: str) -> None:
    if name == "tiny" or name.startswith("local-dir:"):
        return
    import open_clip

    if name.startswith("hf-hub:") or open_clip.get_model_config(name) is None:
        raise ConfigError(f"teacher.name '{name}' is not a local open_clip model config; use 'tiny', "
                          f"'local-dir:DIR' or one of open_clip.list_models(), e.g. ViT-L-14-quickgelu")


def dataset_size(cfg: Config) -> Tuple[int, str]:
    """(train samples per epoch, where the number comes from); opens and checks the index files."""
    if cfg.data.index:
        from eva_train.data.index import check_index

        return check_index(cfg.data.index).epoch_length, f"{len(cfg.data.index)} index file(s)"
    return DEMO_DATASET_SIZE, f"demo data (made on first use in {cfg.data.demo_root})"


def plan(cfg: Config, world_size: int) -> dict:
    from eva_train.optim.schedule import plan_steps

    size, source = dataset_size(cfg)
    total, warmup = plan_steps(total_steps=cfg.train.total_steps, epochs=cfg.train.epochs,
                               warmup_steps=cfg.optim.warmup_steps, warmup_epochs=cfg.optim.warmup_epochs,
                               dataset_size=size, global_batch_size=cfg.train.global_batch_size)
    return {"recipe": cfg.recipe, "world_size": world_size, "micro_batch_size": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": derived_grad_accum(cfg, world_size),
            "global_batch_size": cfg.train.global_batch_size, "dataset_size": size, "dataset": source,
            "total_steps": total, "warmup_steps": warmup, "deepspeed_config": cfg.train.deepspeed_config,
            "precision": cfg.train.precision, "output_dir": cfg.train.output_dir}


def code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    import eva_train

    return eva_train.__version__


def setup_logging(rank: int) -> None:
    # torch.distributed's renamed-collective FutureWarnings come from DeepSpeed on every step: noise
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s", stream=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args, overrides = parse_args(argv)
        cfg = resolve_config(args, overrides)
        world = world_from_env()
        check_config(cfg, world.world_size)
        if args.print_config:
            print(cfg.to_json())
            return 0
        run_plan = plan(cfg, world.world_size)
    except (ConfigError, ValueError) as error:  # CheckpointError and DataError are ValueErrors too
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("plan: " + json.dumps(run_plan, indent=2))
        return 0
    setup_logging(world.rank)
    from eva_train.train.build import train

    return train(cfg, world, code_version())


if __name__ == "__main__":
    sys.exit(main())
