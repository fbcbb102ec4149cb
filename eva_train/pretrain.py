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
import os
import subprocess
import warnings

from eva_train.config import Config, ConfigError, build_config, derived_grad_accum, validate
from eva_train.errors import DISK_FULL_ERRNOS, RunError, disk_full_error
from eva_train.runtime.distributed import world_from_env

log = logging.getLogger("eva_train.pretrain")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATASET_SIZE = 2000  # ensure_demo_data's default train split: the dry run's estimate before generation


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before the error; here a bad flag is one line like any input error."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see --help")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0],
        epilog="any other argument: --section.key=value overrides, e.g. --optim.lr=5e-4",
    )
    parser.add_argument(
        "--recipe", default=None, help="recipe name in eva_train/recipes or a .toml path (default demo)"
    )
    parser.add_argument(
        "--deepspeed_config", default=None, help="ZeRO/precision JSON (batch sizes come from the recipe)"
    )
    parser.add_argument("--output_dir", default=None)
    parser.add_argument(
        "--resume", default=None, help="auto (latest complete checkpoint in output_dir), none, or a path"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate, print the plan, exit (no process group, no model)"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_known_args(argv)


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> Config:
    cfg = build_config(args.recipe, overrides)
    if args.output_dir is not None:
        cfg.train.output_dir = args.output_dir
    if args.deepspeed_config is not None:
        cfg.train.deepspeed_config = args.deepspeed_config
    if args.resume is not None:
        cfg.checkpoint.resume = args.resume
    return cfg


def check_config(cfg: Config, world_size: int) -> None:
    """Everything that can fail without a process group, before a model or data workers exist: the
    config's values, the DeepSpeed JSON, and the files the run is given (resume target, init_from,
    teacher: keys and shapes, read from the headers). The dry run and the real start both call it."""
    validate(cfg, world_size)
    # Imported only now (measured: torch + open_clip + deepspeed take 7-25 s to import on 2 busy cores),
    # so a bad value on the command line fails in a fraction of a second.
    from eva_train.runtime.checkpoint import check_checkpoint_config
    from eva_train.train.engine import build_ds_config
    from eva_train.train.preflight import check_run_inputs

    check_checkpoint_config(cfg.checkpoint)
    build_ds_config(cfg, world_size)
    check_run_inputs(cfg)


def dataset_size(cfg: Config) -> tuple[int, str]:
    """(train samples per epoch, where the number comes from); opens and checks the index files."""
    if cfg.data.index:
        from eva_train.data.index import check_index

        return check_index(cfg.data.index).epoch_length, f"{len(cfg.data.index)} index file(s)"
    return DEMO_DATASET_SIZE, f"demo data (made on first use in {cfg.data.demo_root})"


def plan(cfg: Config, world_size: int) -> dict:
    from eva_train.optim.schedule import recipe_steps

    size, source = dataset_size(cfg)
    total, warmup = recipe_steps(cfg, size)
    return {
        "recipe": cfg.recipe,
        "world_size": world_size,
        "micro_batch_size": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": derived_grad_accum(cfg, world_size),
        "global_batch_size": cfg.train.global_batch_size,
        "dataset_size": size,
        "dataset": source,
        "total_steps": total,
        "warmup_steps": warmup,
        "deepspeed_config": cfg.train.deepspeed_config,
        "precision": cfg.train.precision,
        "output_dir": cfg.train.output_dir,
    }


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    import eva_train

    return eva_train.__version__


def setup_logging(rank: int) -> None:
    # torch.distributed's renamed-collective FutureWarnings come from DeepSpeed on every step: noise
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def exit_code(error: BaseException) -> int | None:
    """2 for bad input, 1 for a run-time failure the user can act on, None for a bug (traceback)."""
    if isinstance(error, ConfigError):  # also DataError, CheckpointError, LayoutError, TeacherLoadError
        return 2
    if isinstance(error, RunError) or (isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS):
        return 1
    return None


def report_error(error: BaseException, rank: int) -> None:
    """One line on stderr. Input errors (ConfigError and its kinds) are raised alike on every rank:
    rank 0 alone says them. A run-time failure may be one rank's own (its local disk), so that rank
    says it, with its number."""
    if isinstance(error, OSError):  # a write outside the checkpoint save (metrics, config.json) hit a full disk
        error = disk_full_error(error, error.filename or "the output dir") or error
    message = " ".join(str(error).split())  # one line, whatever the message held
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    elif not isinstance(error, ConfigError):
        print(f"error: [rank {rank}] {message}", file=sys.stderr, flush=True)


def start(argv: list[str] | None) -> int:
    try:
        args, overrides = parse_args(argv)
        cfg = resolve_config(args, overrides)
        world = world_from_env()
        check_config(cfg, world.world_size)
        if args.print_config:
            print(cfg.to_json())
            return 0
        run_plan = plan(cfg, world.world_size)
        if args.dry_run:  # memory, traffic, wall-clock (eva_train/plan): torch + the model on the meta device
            from eva_train.plan.report import dry_run_text

            cost_plan = dry_run_text(cfg, world.world_size, run_plan["dataset_size"])
    except ValueError as error:  # before anything runs, every ValueError is about the input
        raise error if isinstance(error, ConfigError) else ConfigError(str(error)) from None
    if args.dry_run:
        print("plan: " + json.dumps(run_plan, indent=2))
        print(cost_plan)
        return 0
    setup_logging(world.rank)
    from eva_train.train.build import train  # deepspeed and the model code: only for a real run

    return train(cfg, world, code_version())


def main(argv: list[str] | None = None) -> int:
    """The one place errors become exit codes: the config checks and the whole run go through it."""
    try:
        return start(argv)
    except Exception as error:  # noqa: BLE001 - sorted by exit_code; anything else is re-raised
        code = exit_code(error)
        if code is None:
            raise
        report_error(error, int(os.environ.get("RANK", "0") or 0))
        return code


if __name__ == "__main__":
    sys.exit(main())
