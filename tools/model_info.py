"""Print exact backbone parameter counts and forward GFLOPs per image of EVA variants.

    python tools/model_info.py eva_g_p14 [--img_size 336]
    python tools/model_info.py --all
    python tools/model_info.py --seed-table       # each row of the mmpretrain EVA tables, ours beside theirs

Models are built on the meta device: no memory is allocated, EVA-g takes about a second.
GMACs are what mmpretrain's tables call "Flops (G)"; GFLOPs = 2 x GMACs.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from eva_train.config import build_config
from eva_train.models import build_backbone, build_model
from eva_train.models.flops import forward_flops
from eva_train.models.variants import VARIANTS

# mmpretrain's EVA page: (row, our variant, image px, what is counted, seed params M, seed "Flops (G)").
# "Flops (G)" there are multiply-accumulates (fvcore), so they compare with our GMACs.
# what: "headless" backbone; "mae" backbone + MAE decoder + target projection (CLIP-B/16, 512-d);
# "cls1000" backbone + a 1000-class linear head. The g/14 pretrain row's parameters are those of the released
# checkpoint, whose position table is 336 px (24x24) while its FLOPs are at 224 px: both sizes are given.
SEED_ROWS = [
    ("eva-mae-style_vit-base-p16 (pretrain)", "eva_mae_b16", (224, 224), "mae", 111.78, 17.58),
    ("beit-l-p14_3rdparty-eva_in21k", "eva_l_p14", (224, 224), "headless", 303.18, 81.08),
    ("beit-g-p16_3rdparty-eva_30m", "eva_g_p16", (224, 224), "headless", 1011.32, 203.52),
    ("beit-g-p14_3rdparty-eva_30m", "eva_g_p14", (336, 224), "headless", 1011.60, 267.17),
    ("vit-base-p16_eva-mae-style-pre ft", "eva_mae_b16", (224, 224), "cls1000", 86.57, 17.58),
    ("beit-l-p14_eva-pre in1k-196px", "eva_l_p14", (196, 196), "cls1000", 304.14, 61.57),
    ("beit-l-p14_eva-pre in1k-336px", "eva_l_p14", (336, 336), "cls1000", 304.53, 191.10),
    ("beit-g-p14 in1k-336px", "eva_g_p14", (336, 336), "cls1000", 1013.01, 620.64),
    ("beit-g-p14 in1k-560px", "eva_g_p14", (560, 560), "cls1000", 1014.45, 1906.76),
]
MAE_TEACHER_DIM = 512  # CLIP ViT-B/16 features, the MAE-style EVA's regression target
NUM_CLASSES = 1000


def describe(variant: str, img_size: int) -> str:
    with torch.device("meta"):
        model = build_backbone(variant, img_size)
    params = sum(p.numel() for p in model.parameters())
    gflops = forward_flops(variant, img_size) / 1e9
    cfg = VARIANTS[variant]
    return (
        f"{variant:<16} {img_size:>5} {model.num_patches:>7} {cfg.embed_dim:>6} {cfg.depth:>6} "
        f"{params:>15,} {gflops / 2:>9.3f} {gflops:>9.3f}"
    )


def seed_row_numbers(variant: str, params_px: int, flops_px: int, what: str):
    """(exact parameter count, forward GMACs per image) of one seed row as we build it."""
    cfg = VARIANTS[variant]
    with torch.device("meta"):
        if what == "mae":  # the decoder as the eva_mae_b16 recipe builds it
            model_cfg = build_config("eva_mae_b16", [f"--model.img_size={params_px}"]).model
            model = build_model(model_cfg, MAE_TEACHER_DIM)
        else:
            model = build_backbone(variant, params_px)
    params = sum(p.numel() for p in model.parameters())
    gmacs = forward_flops(variant, flops_px) / 2 / 1e9  # the whole image through the encoder, as mmpretrain counts
    if what == "cls1000":
        params += cfg.embed_dim * NUM_CLASSES + NUM_CLASSES
        gmacs += cfg.embed_dim * NUM_CLASSES / 1e9
    return params, gmacs


def print_seed_table() -> None:
    print(
        f"{'seed row':<38} {'variant':<12} {'px':>7} {'params':>15} {'seed M':>8} {'diff':>8} "
        f"{'GMACs':>9} {'seed G':>8} {'diff':>7}"
    )
    for row, variant, (params_px, flops_px), what, seed_params, seed_gmacs in SEED_ROWS:
        params, gmacs = seed_row_numbers(variant, params_px, flops_px, what)
        px = f"{params_px}" if params_px == flops_px else f"{params_px}/{flops_px}"
        print(
            f"{row:<38} {variant:<12} {px:>7} {params:>15,} {seed_params:>8.2f} {params / 1e6 - seed_params:>+8.3f} "
            f"{gmacs:>9.2f} {seed_gmacs:>8.2f} {100 * (gmacs / seed_gmacs - 1):>+6.2f}%"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="?", help=f"one of {', '.join(sorted(VARIANTS))}")
    parser.add_argument("--img_size", type=int, default=0, help="pixels (default: the variant's own)")
    parser.add_argument("--all", action="store_true", help="every variant at its default size")
    parser.add_argument(
        "--seed-table", action="store_true", help="the mmpretrain EVA tables' rows: our params and GMACs beside theirs"
    )
    args = parser.parse_args(argv)
    if args.seed_table:
        print_seed_table()
        return 0
    if not args.all and args.variant not in VARIANTS:
        parser.error(f"give a variant ({', '.join(sorted(VARIANTS))}) or --all")
    names = sorted(VARIANTS) if args.all else [args.variant]
    sizes = [args.img_size or VARIANTS[name].default_img_size for name in names]
    for name, size in zip(names, sizes):
        if size % VARIANTS[name].patch_size:
            parser.error(f"--img_size {size} is not a multiple of {name}'s patch size {VARIANTS[name].patch_size}")
    print(
        f"{'variant':<16} {'img':>5} {'patches':>7} {'width':>6} {'depth':>6} {'params':>15} {'GMACs':>9} {'GFLOPs':>9}"
    )
    for name, size in zip(names, sizes):
        print(describe(name, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
