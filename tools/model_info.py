"""Print exact backbone parameter counts and forward GFLOPs per image of EVA variants.

    python tools/model_info.py eva_g_p14 [--img_size 336]
    python tools/model_info.py --all

Models are built on the meta device: no memory is allocated, EVA-g takes about a second.
GMACs are what mmpretrain's tables call "Flops (G)"; GFLOPs = 2 x GMACs.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from eva_train.models.flops import forward_flops  # noqa: E402
from eva_train.models import build_backbone  # noqa: E402
from eva_train.models.variants import VARIANTS  # noqa: E402


def describe(variant: str, img_size: int) -> str:
    with torch.device("meta"):
        model = build_backbone(variant, img_size)
    params = sum(p.numel() for p in model.parameters())
    gflops = forward_flops(variant, img_size) / 1e9
    cfg = VARIANTS[variant]
    return (f"{variant:<16} {img_size:>5} {model.num_patches:>7} {cfg.embed_dim:>6} {cfg.depth:>6} "
            f"{params:>15,} {gflops / 2:>9.3f} {gflops:>9.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="?", help=f"one of {', '.join(sorted(VARIANTS))}")
    parser.add_argument("--img_size", type=int, default=0, help="pixels (default: the variant's own)")
    parser.add_argument("--all", action="store_true", help="every variant at its default size")
    args = parser.parse_args(argv)
    if not args.all and args.variant not in VARIANTS:
        parser.error(f"give a variant ({', '.join(sorted(VARIANTS))}) or --all")
    names = sorted(VARIANTS) if args.all else [args.variant]
    sizes = [args.img_size or VARIANTS[name].default_img_size for name in names]
    for name, size in zip(names, sizes):
        if size % VARIANTS[name].patch_size:
            parser.error(f"--img_size {size} is not a multiple of {name}'s patch size {VARIANTS[name].patch_size}")
    print(f"{'variant':<16} {'img':>5} {'patches':>7} {'width':>6} {'depth':>6} {'params':>15} "
          f"{'GMACs':>9} {'GFLOPs':>9}")
    for name, size in zip(names, sizes):
        print(describe(name, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
