"""Weights files of the evaluation tools (safetensors only: loading never runs pickled code).

- Backbone files: consolidated pretraining weights (`tools/consolidate.py`, native layout) or any
  safetensors file with timm `Eva` key names. The variant comes from the file's metadata (any
  JSON value holding a `variant`, e.g. the resolved pretraining config) or from the caller.
  MIM/MAE-only tensors (`mask_token`, `lm_head.*`, `decoder*`) are dropped.
- Classifier files (written by linear_probe / finetune): `backbone.*` + `head.*` tensors and
  metadata `format=eva_train.classifier`, `model` (variant, img_size, batch_norm),
  `class_names` (JSON list) and `protocol`.
"""

import json
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from eva_train.eval.heads import Classifier, LinearHead
from eva_train.export.safetensors_writer import read_metadata
from eva_train.export.weights import load_weights, read_state_dict
from eva_train.models import build_backbone
from eva_train.runtime.fsio import atomic_path

CLASSIFIER_FORMAT = "eva_train.classifier"
PRETRAINING_ONLY_PREFIXES = ("mask_token", "lm_head.", "decoder")


def _find_variant(value: Any) -> dict[str, Any] | None:
    """The first dict (depth-first) with a 'variant' key inside a parsed metadata value."""
    if isinstance(value, dict):
        if isinstance(value.get("variant"), str):
            return value
        for v in value.values():
            found = _find_variant(v)
            if found:
                return found
    return None


def model_spec_from_metadata(meta: dict[str, str]) -> dict[str, Any] | None:
    """{'variant': ..., 'img_size': ...} from a file's metadata, or None."""
    if "variant" in meta:
        return {"variant": meta["variant"], "img_size": int(meta.get("img_size", 0)) or None}
    for raw in meta.values():
        try:
            found = _find_variant(json.loads(raw))
        except (json.JSONDecodeError, TypeError):
            continue
        if found:
            return found
    return None


def load_backbone(
    path: str, variant: str = "", img_size: int | None = None, drop_path_rate: float = 0.0, **overrides
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(EVA backbone with the file's weights, {'variant', 'img_size'}); strict about missing keys.
    The metadata's img_size wins over the variant default; `img_size` resizes the position table;
    `overrides` replace architecture fields of the variant (e.g. depth=1 for a smoke run)."""
    meta = read_metadata(path)
    spec = dict(model_spec_from_metadata(meta) or {})
    if variant:
        spec["variant"] = variant
    if not spec.get("variant"):
        raise ValueError(
            f"checkpoint '{path}' does not say which model it holds; pass the variant (e.g. --variant eva_b_p16)"
        )
    spec["img_size"] = img_size or spec.get("img_size")
    backbone = build_backbone(spec["variant"], spec["img_size"], drop_path_rate=drop_path_rate, **overrides)
    spec["img_size"] = backbone.img_size[0]  # square: built from one int
    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state):  # one of our classifier files
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(PRETRAINING_ONLY_PREFIXES)}
    report = load_weights(backbone, state)  # any layout eva_train.export.weights reads (native, timm, ...)
    if report.missing or report.unexpected or report.mismatched:
        raise ValueError(
            f"checkpoint '{path}' does not match {spec['variant']}: {report.summary()}; "
            f"check the variant (--model.variant) or the file"
        )
    return backbone, {"variant": spec["variant"], "img_size": spec["img_size"]}


def save_classifier(path: str, model: Classifier, spec: dict[str, Any], class_names: list[str], protocol: str) -> None:
    """Atomic write (eva_train.runtime.fsio.atomic_path)."""
    num_classes = model.head.linear.out_features
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-way head; they must match")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": CLASSIFIER_FORMAT,
        "protocol": protocol,
        "class_names": json.dumps(class_names),
        "model": json.dumps({**spec, "batch_norm": isinstance(model.head.bn, torch.nn.BatchNorm1d)}),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_classifier(path: str) -> tuple[Classifier, list[str], dict[str, Any]]:
    """(Classifier in eval mode, class names, model spec) from a classifier file."""
    meta = read_metadata(path)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(
            f"checkpoint '{path}' holds no classifier (a pretrained backbone?); fine-tune it "
            f"with tools/finetune.py or linear-probe it with tools/linear_probe.py first, or use "
            f"extract_feat / `tools/predict.py --features` for its features"
        )
    spec, class_names = json.loads(meta["model"]), json.loads(meta["class_names"])
    backbone = build_backbone(spec["variant"], spec["img_size"])
    head = LinearHead(backbone.embed_dim, len(class_names), spec["batch_norm"], init_std=0.01)
    model = Classifier(backbone, head)
    model.load_state_dict(load_file(path))
    return model.eval(), class_names, spec
