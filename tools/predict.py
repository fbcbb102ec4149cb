#!/usr/bin/env python
"""Classify images with a fine-tuned / linear-probed checkpoint, or extract features with a
pretrained one, at any image size.

    python tools/predict.py cat.jpg dog.png --checkpoint outputs/finetune/classifier.safetensors [--top_k 5]
    python tools/predict.py img/*.jpg --checkpoint eva.safetensors --features feats.safetensors
    python tools/predict.py img/*.jpg --checkpoint eva.safetensors --features feats.safetensors \\
        --img_size 336 --keep_aspect

Images go through the evaluation preprocessing (shorter side to img_size / 0.875, bicubic, center
crop) at the model's size, or at --img_size (N or HxW, multiples of the patch size). --keep_aspect
crops no square: the shorter side is resized to --img_size (default: the model's), and each side is
center-cropped down to a multiple of the patch size, so every image runs at its own aspect.
Features file: "pooled" (B, D), "grid" (B, 2) = each image's patch (rows, cols), and "patch":
(B, N, D), or with --keep_aspect all images' patch tokens one after another, (sum of rows*cols, D)
(split it with grid.prod(1)).
Exit code 2 with one line on bad input (missing file, a backbone file without --features, ...).
"""

import argparse
import json
import sys


def image_size(text: str):
    """'336' -> 336; '448x336' -> (448, 336) (height x width)."""
    try:
        sides = [int(side) for side in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not N or HxW in pixels (e.g. 336 or 448x336)")
    return sides[0] if len(sides) == 1 else tuple(sides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help=".safetensors classifier (or backbone with --features)")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--features", metavar="OUT", help="write pooled + patch features of a backbone file here")
    parser.add_argument(
        "--variant",
        default=None,
        help="with --features: the model variant when the file's metadata does not name it (e.g. eva_demo_p8)",
    )
    parser.add_argument(
        "--img_size",
        type=image_size,
        default=None,
        metavar="N|HxW",
        help="input size (default: the model's); with --keep_aspect one N, the shorter side",
    )
    parser.add_argument(
        "--keep_aspect",
        action="store_true",
        help="keep each image's aspect: shorter side to --img_size, sides cropped to patch multiples",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = parser.parse_args(argv)
    try:
        _check_img_size(args)
        if args.features:
            return _features(args)
        from eva_train.eval.predict import predict

        results = predict(args.images, args.checkpoint, args.top_k, args.device, args.img_size, args.keep_aspect)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, top in zip(args.images, results, strict=True):
        if args.json:
            print(json.dumps({"image": path, "top_k": [{"class": c, "score": s} for c, s in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {s:.3f}" for c, s in top))
    return 0


def _check_img_size(args) -> None:
    """Refuse --img_size values the model cannot take before any model is loaded (ValueError)."""
    from eva_train.eval.checkpoints import model_spec_from_metadata, read_metadata
    from eva_train.models.variants import VARIANTS

    spec = model_spec_from_metadata(read_metadata(args.checkpoint)) or {}
    variant = args.variant or spec.get("variant")
    if args.img_size is None or variant not in VARIANTS:
        return  # no size given, or the model is named only by the file's layout: checked once it is built
    patch = VARIANTS[variant].patch_size
    sides = (args.img_size,) if isinstance(args.img_size, int) else args.img_size
    if any(side % patch for side in sides) or (args.keep_aspect and len(sides) != 1):
        wanted = "one N (the shorter side)" if args.keep_aspect else "N or HxW"
        raise ValueError(f"--img_size {args.img_size}: give {wanted} in multiples of {variant}'s patch size {patch}")


def _features(args) -> int:
    import torch
    from safetensors.torch import save_file

    from eva_train.export.inference import extract_feat, get_model

    model = get_model(args.checkpoint, variant=args.variant, device=args.device)
    feats = extract_feat(model, args.images, img_size=args.img_size, keep_aspect=args.keep_aspect)
    patch = torch.cat(feats["patch"]) if args.keep_aspect else feats["patch"]  # ragged -> one after another
    tensors = {"pooled": feats["pooled"], "patch": patch, "grid": feats["grid"]}
    save_file(
        {k: v.cpu().contiguous() for k, v in tensors.items()},
        args.features,
        metadata={"images": json.dumps(args.images)},
    )
    print(
        f"wrote pooled {tuple(feats['pooled'].shape)}, patch {tuple(patch.shape)} and grid features to {args.features}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
