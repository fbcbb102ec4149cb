#!/usr/bin/env python
"""Fine-tune a pretrained EVA backbone: `python tools/finetune.py --recipe finetune_demo
--checkpoint FILE.safetensors [--section.key=value ...]` (see eva_train/eval/cli.py).

    python tools/finetune.py --recipe eva_g_p14_ft_in1k_336 --dry-run [--section.key=value ...]
prints the resolved config and, where the planner (eva_train.plan) is installed, whether the recipe
as written fits on an 80 GB card at its micro batch; it needs no checkpoint or data and starts nothing.
"""

import json
import sys

from eva_train.config import ConfigError
from eva_train.eval.cli import main, parse_args
from eva_train.eval.finetune import run_finetune
from eva_train.eval.protocol_config import build_protocol_config

DEFAULT_RECIPE = "finetune_vit_b16"
PLANNER_CARD = "h100"  # the planner's 80 GB card


def _memory_line(recipe: str) -> str:
    """The planner's verdict for the recipe file as written (the planner reads the file, so command-line
    overrides are not planned), one rank per micro batch (no accumulation); "" without the planner."""
    try:  # optional: the planner package may be absent from a checkout
        from eva_train.plan.finetune import plan_finetune
        from eva_train.plan.gpus import GPUS
    except ImportError:
        return ""
    train = build_protocol_config(recipe).train
    world = max(1, train.global_batch_size // train.micro_batch_size)
    detail = plan_finetune(recipe, world, GPUS[PLANNER_CARD])["detail"]
    return f"memory on one 80 GB card (recipe as written): {detail}"


def dry_run(argv: list[str]) -> int:
    args, overrides = parse_args(argv, DEFAULT_RECIPE)
    try:
        cfg = build_protocol_config(args.recipe, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=2))
    line = _memory_line(args.recipe)
    if line:
        print(line)
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--dry-run" in argv:
        sys.exit(dry_run([a for a in argv if a != "--dry-run"]))
    sys.exit(main(None, DEFAULT_RECIPE, "finetune", run_finetune))
