"""Command line shared by tools/linear_probe.py and tools/finetune.py.

    python tools/finetune.py [--recipe NAME|PATH] [--checkpoint FILE] [--output_dir DIR]
                             [--resume auto|none|PATH] [--print-config] [--section.key=value ...]
Also under `deepspeed [--num_gpus N] tools/finetune.py ...` (one process per GPU/CPU rank).
Bad input exits with code 2 and one line naming the problem and the fix.
"""

import argparse
import json
import sys
from collections.abc import Callable

from eva_train.config import ConfigError
from eva_train.eval.protocol_config import ProtocolConfig, build_protocol_config, validate_protocol
from eva_train.eval.protocol_inputs import labeled_pair


def parse_args(argv: list[str], default_recipe: str):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=default_recipe)
    parser.add_argument("--checkpoint", help="consolidated backbone .safetensors (= --model.checkpoint)")
    parser.add_argument("--output_dir", help="= --train.output_dir")
    parser.add_argument("--resume", help="auto, none or a checkpoint path (= --train.resume)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args, rest = parser.parse_known_args(argv)
    shortcuts = {"model.checkpoint": args.checkpoint, "train.output_dir": args.output_dir, "train.resume": args.resume}
    rest += [f"--{k}={v}" for k, v in shortcuts.items() if v is not None]
    return args, rest


def main(argv: list[str] | None, default_recipe: str, protocol: str, run: Callable[[ProtocolConfig], list]) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv, default_recipe)
    try:
        cfg = build_protocol_config(args.recipe, overrides)
        if cfg.train.protocol != protocol:
            raise ConfigError(
                f"recipe {cfg.recipe} is a {cfg.train.protocol} recipe; use it with "
                f"tools/{'linear_probe' if cfg.train.protocol == 'linear' else 'finetune'}.py"
            )
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        validate_protocol(cfg, world_size=1)  # the cheap checks, before any process group exists
        labeled_pair(cfg.data)  # sources readable, val classes = train classes
        run(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
