"""ZeRO-1/2/3 checkpoint -> one safetensors file.

  python tools/consolidate.py OUT/checkpoints --out eva.safetensors [--tag step_00001000]
      [--dtype fp32|bf16] [--layout native|timm|open_clip|mmpretrain] [--check-model]

CKPT_DIR is the run dir OUT, OUT/checkpoints (its `latest` tag is used unless --tag) or a tag dir. Any model's
checkpoint works with --layout native; the other layouts need an eva-train EVA checkpoint.
--check-model builds the eva-train model named in the checkpoint's config and loads the file into
it with strict=True (native layout). Exit code 2 with a one-line error on bad input.
"""

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", help="OUT/checkpoints or OUT/checkpoints/<tag>")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the `latest` file)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--layout", default="native", choices=("native", "timm", "open_clip", "mmpretrain"))
    parser.add_argument(
        "--check-model",
        action="store_true",
        help="load the result strict into the eva-train model of the checkpoint's config",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"--out {args.out} should end with .safetensors")
    if args.check_model and args.layout != "native":
        parser.error("--check-model needs --layout native (our own model's names)")
    return args


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from eva_train.export.consolidate import ConsolidationError, consolidate
    from eva_train.export.layouts import LayoutError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        report = consolidate(
            args.ckpt_dir, args.out, tag=args.tag, dtype=args.dtype, layout=args.layout, progress=not args.no_progress
        )
        if args.check_model:
            from eva_train.export.weights import check_loads_strict

            check_loads_strict(report.path)
    except (ConsolidationError, LayoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dropped = f", dropped {len(report.dropped)} MIM-only tensors" if report.dropped else ""
    print(
        f"wrote {report.path}: {report.tensors} tensors, {report.bytes / 2**20:.1f} MiB in "
        f"{report.seconds:.1f} s ({args.layout}, {args.dtype}{dropped})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
