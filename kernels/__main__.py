"""Run the kernels' self-check on this machine and print what it decides (tools/gpu_check.sh runs it).

    python -m eva_kernels [--preset eva_g eva02_l] [--batch 8] [--backend auto] [--json PATH]
    TRITON_INTERPRET=1 python -m eva_kernels --device cpu --preset tiny --dtype float32   # plumbing on CPU

Per shape class: the path taken (triton / torch) and why (check result, forward+backward ms of
both). Exit 0 when every kernel the backend would use passed; 1 when backend "triton" met a wrong
kernel; 2 on a usage error.
"""

import argparse
import json
import os
import sys

import torch

import eva_kernels

# name -> (tokens, width, heads, rope, extra LayerNorm widths): the ViT towers the project trains
PRESETS = {
    "eva_g": (257, 1408, 16, False, ()),  # EVA-g/14 at 224 px (EVA-01 recipe: no RoPE)
    "eva02_l": (257, 1024, 16, True, (2730,)),  # EVA-02-L/14 at 224 px: RoPE, SwiGLU's inner LayerNorm
    "tiny": (17, 176, 2, True, ()),  # head dim 88 at interpreter-sized shapes
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # user errors: one line naming the fix, exit 2 (no usage dump)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog="python -m eva_kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["eva_g", "eva02_l"], choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8, help="images per micro batch (the timed shape)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", metavar="PATH", help="also write eva_kernels.decisions() here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run on a GPU, or --device cpu --preset tiny with TRITON_INTERPRET=1")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the kernels in Triton's interpreter: export TRITON_INTERPRET=1 first")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    eva_kernels.set_backend(args.backend)
    shapes = []
    for name in args.preset:
        tokens, width, heads, rope, extra = PRESETS[name]
        shapes += eva_kernels.vit_shapes(
            args.batch,
            tokens,
            width,
            heads,
            getattr(torch, args.dtype),
            rope=rope,
            device=args.device,
            extra_norm_widths=extra,
        )
    try:
        record = eva_kernels.autotune(shapes)
        failed = None
    except RuntimeError as error:  # backend triton and a wrong kernel: still report every decision
        record, failed = eva_kernels.decisions(), str(error)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    decided = record["kernels"].values()
    for d in decided:
        print(f"{d['key']:44} {d['use']:6} {d['reason']}")
    on_triton = sum(d["use"] == "triton" for d in decided)
    print(
        f"self-check ({record['backend']}): {on_triton} of {len(decided)} shape classes on Triton, "
        f"{sum(d['status'] == 'failed' for d in decided)} failed"
    )
    if failed:
        print(failed, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
