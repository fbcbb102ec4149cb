#!/usr/bin/env python
"""Classify images with a fine-tuned / linear-probed checkpoint, or extract features with a
pretrained one.

    python tools/predict.py cat.jpg dog.png --checkpoint outputs/finetune/classifier.safetensors [--top_k 5]
    python tools/predict.py img/*.jpg --checkpoint eva.safetensors --features feats.safetensors
Exit code 2 with one line on bad input (missing file, a backbone file without --features, ...).
"""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help=".safetensors classifier (or backbone with --features)")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--features", metavar="OUT", help="write pooled + patch features of a backbone file here")
    parser.add_argument("--variant", default=None, help="with --features: the model variant when the file's "
                        "metadata does not name it (e.g. eva_demo_p8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = parser.parse_args(argv)
    try:
        if args.features:
            return _features(args)
        from eva_train.eval.predict import predict

        results = predict(args.images, args.checkpoint, args.top_k, args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, top in zip(args.images, results):
        if args.json:
            print(json.dumps({"image": path, "top_k": [{"class": c, "score": s} for c, s in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {s:.3f}" for c, s in top))
    return 0


def _features(args) -> int:
    from safetensors.torch import save_file

    from eva_train.export.inference import extract_feat, get_model

    feats = extract_feat(get_model(args.checkpoint, variant=args.variant, device=args.device), args.images)
    save_file({k: v.cpu().contiguous() for k, v in feats.items()}, args.features,
              metadata={"images": json.dumps(args.images)})
    print(f"wrote pooled {tuple(feats['pooled'].shape)} and patch {tuple(feats['patch'].shape)} features "
          f"to {args.features}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
