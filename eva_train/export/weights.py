"""Import foreign EVA weights into our model: official EVA-01 (`model` wrapper) / EVA-02
(`module` wrapper) releases, timm EVA checkpoints, open_clip EVA towers, mmpretrain EVA
checkpoints and our own consolidated files; for continued pretraining or as a teacher.

Files are read by `eva_train.models.weights_file` (safetensors or `torch.load(weights_only=True)`). The
position table is resized to the model's grid (bicubic), tensors of another shape (a different
`lm_head` width) are skipped, and what did not load is reported, never silently dropped.
"""

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file

from eva_train.config import ModelConfig
from eva_train.export.layouts import MIM_ONLY_PREFIXES, LayoutError, plan_layout
from eva_train.export.safetensors_writer import read_metadata
from eva_train.models import build_backbone, build_model
from eva_train.models.pos_embed import resize_pos_embed
from eva_train.models.weights_file import read_state_dict, unwrap  # noqa: F401 - read_state_dict re-exported

log = logging.getLogger(__name__)
# Tensors a weights file may hold that no backbone takes: heads of other tasks. They are left out
# (listed in the report); any other tensor the model has no place for is an error.
KNOWN_HEADS = (
    "lm_head.",
    "mask_token",
    "decoder",  # MIM / MAE heads (ours, EVA-01 MIM releases)
    "head.",
    "fc_norm.",  # timm classifier head (+ its norm beside `norm`)
    "visual.head.",
    "visual.trunk.head.",
    "visual.proj",  # open_clip projections
    "neck.",
)  # mmpretrain necks


@dataclass
class ImportReport:
    source_layout: str
    missing: list[str] = field(default_factory=list)  # model tensors the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file tensors the model has no place for
    ignored: list[str] = field(default_factory=list)  # file tensors of KNOWN_HEADS, left out
    mismatched: list[str] = field(default_factory=list)  # model tensors skipped: file shape differs
    resized: list[str] = field(default_factory=list)  # e.g. pos_embed resampled to the model's grid

    def summary(self) -> str:
        parts = [f"layout {self.source_layout}"]
        for name in ("missing", "unexpected", "mismatched", "resized", "ignored"):
            values = getattr(self, name)
            if values:
                parts.append(f"{len(values)} {name} ({', '.join(values[:4])}{', ...' if len(values) > 4 else ''})")
        if self.unexpected:
            parts.append(
                f"only known heads ({', '.join(h.rstrip('.') for h in KNOWN_HEADS)}) and a CLIP file's text "
                f"tower may be left out"
            )
        if any(".attn.norm." in k for k in self.unexpected):
            parts.append(
                "the file's blocks have attn.norm (an EVA02-CLIP tower, timm scale_attn_inner=True), a "
                "LayerNorm this model lacks: its features would be wrong; build the backbone with "
                "scale_attn_inner=True (eva_train.models.build_backbone(..., scale_attn_inner=True))"
            )
        return "; ".join(parts)


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip"
    if any(k.startswith(("backbone.layers.", "layers.")) for k in keys):
        return "mmpretrain"
    if any(re.search(r"\.mlp\.(w1|w2|w3|w12|ffn_ln)\.", k) for k in keys):
        return "eva02_official"
    return "timm"  # also official EVA-01 and ours: the same names


def official_eva02_to_timm(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Official EVA-02 names -> timm's (SwiGLU w1/w2/w3/ffn_ln, separate q/v biases, EVA-CLIP's
    inner_attn_ln); the RoPE tables are recomputed, not loaded. The renames are those of timm's
    `eva.checkpoint_filter_fn` (tests check against it); that function itself needs a timm model and
    moves a MIM file's final norm to `fc_norm`, so it is not called here."""
    separate_qkv = any(".attn.q_proj.weight" in k for k in state_dict)
    renames = [
        ("mlp.ffn_ln.", "mlp.norm."),
        ("attn.inner_attn_ln.", "attn.norm."),
        ("mlp.w12.", "mlp.fc1."),
        ("mlp.w1.", "mlp.fc1_g."),
        ("mlp.w2.", "mlp.fc1_x."),
        ("mlp.w3.", "mlp.fc2."),
    ]
    if separate_qkv:
        renames += [("attn.q_bias", "attn.q_proj.bias"), ("attn.v_bias", "attn.v_proj.bias")]
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith("rope.") or ".rope." in key:
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def to_our_names(state_dict: Mapping[str, torch.Tensor], model: nn.Module, layout: str | None = None) -> tuple:
    """(tensors under our names, ImportReport) for `model` (an EVA / EvaForMIM)."""
    layout = layout or detect_layout(state_dict)
    shapes = full_shapes(model)
    if (
        layout == "timm"
        and any(k.endswith(".attn.qkv.bias") for k in state_dict)
        and all(k in state_dict for k in shapes if not k.startswith(MIM_ONLY_PREFIXES))
    ):
        layout = "native"  # our own file of a learned-k-bias variant: timm has no name for a full qkv bias
    report = ImportReport(layout)
    if layout == "open_clip":  # a whole CLIP file: its tower is the weights, the text side is left out
        report.ignored = [k for k in state_dict if not k.startswith("visual.")]
        state_dict = OrderedDict((k, v) for k, v in state_dict.items() if k.startswith("visual."))
    if layout in ("timm", "open_clip"):
        state_dict = _fc_norm_as_norm(state_dict, "visual.trunk." if layout == "open_clip" else "")
    if layout == "eva02_official":
        state_dict, layout = official_eva02_to_timm(state_dict), "timm"
    if layout == "mmpretrain" and not any(k.startswith("backbone.") for k in state_dict):
        state_dict = OrderedDict(("backbone." + k, v) for k, v in state_dict.items())
    swiglu = getattr(getattr(model, "cfg", None), "swiglu", None)
    plan = plan_layout(layout, shapes, swiglu)
    state_dict = _resize_pos_embed(state_dict, plan, model, shapes, report)
    converted, missing, mismatched, used = plan.invert_partial(state_dict, shapes)
    _take_mim_only_as_is(state_dict, shapes, plan, converted, mismatched, used)
    report.missing = [k for k in missing if k not in converted and k not in mismatched] + [
        k for k in plan.dropped if k not in converted and k not in mismatched
    ]
    report.mismatched = mismatched
    leftover = [k for k in state_dict if k not in used]
    report.ignored += [k for k in leftover if k.startswith(KNOWN_HEADS)]
    report.unexpected = [k for k in leftover if not k.startswith(KNOWN_HEADS)]
    return converted, report


def _fc_norm_as_norm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Mapping[str, torch.Tensor]:
    """timm's EVA models with global_pool='avg' (its EVA-02 defaults) name the final norm `fc_norm`
    (applied after pooling) and have no `norm`: its weights are the final norm's."""
    if prefix + "fc_norm.weight" not in state_dict or prefix + "norm.weight" in state_dict:
        return state_dict
    return OrderedDict(
        (prefix + k[len(prefix + "fc_") :] if k.startswith(prefix + "fc_norm.") else k, v)
        for k, v in state_dict.items()
    )


def _take_mim_only_as_is(state_dict, shapes, plan, converted, mismatched, used) -> None:
    """The export layouts drop mask_token / lm_head / decoder*; a file that has them under our
    names (official EVA-01 MIM releases, our own files) still loads them."""
    for name in plan.dropped:
        if name in state_dict and name not in converted:
            if tuple(state_dict[name].shape) == tuple(shapes[name]):
                converted[name] = state_dict[name]
            else:
                mismatched.append(name)
            used.add(name)


def full_shapes(model: nn.Module) -> "OrderedDict[str, tuple[int, ...]]":
    """State-dict names -> shapes, also for ZeRO-3 partitioned params (whose .shape is empty)."""
    return OrderedDict((k, tuple(getattr(v, "ds_shape", v.shape))) for k, v in model.state_dict(keep_vars=True).items())


def _resize_pos_embed(state_dict, plan, model, shapes, report: ImportReport):
    routes = plan.routes.get("pos_embed") or []
    if not routes or routes[0].dest not in state_dict or not hasattr(model, "pos_embed"):
        return state_dict
    name = routes[0].dest
    if tuple(state_dict[name].shape) == shapes["pos_embed"]:
        return state_dict
    state_dict = OrderedDict(state_dict)
    table = state_dict[name]
    state_dict[name] = resize_pos_embed(table, model.grid_size, model.num_prefix_tokens)
    report.resized.append(f"pos_embed {tuple(table.shape)} -> {tuple(state_dict[name].shape)}")
    return state_dict


def load_weights(
    model: nn.Module, source: str | Mapping[str, torch.Tensor], layout: str | None = None, strict: bool = False
) -> ImportReport:
    """Load a file (or state dict) of any supported layout into `model`; log and return the report.
    strict=True raises on anything missing, unexpected or mismatched."""
    state_dict = read_state_dict(source) if isinstance(source, str) else unwrap(dict(source))
    converted, report = to_our_names(state_dict, model, layout)
    model.load_state_dict(converted, strict=False)
    problems = report.missing or report.unexpected or report.mismatched
    if strict and problems:
        raise LayoutError(f"weights do not match the model strictly: {report.summary()}")
    log.info("loaded weights: %s", report.summary())
    return report


def check_init_from(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str) -> tuple:
    """(converted, report) when `state_dict` may start `model`; else LayoutError naming what does not
    fit. Shapes only: the start-up check passes meta tensors of the file and a model built on meta."""
    converted, report = to_our_names(state_dict, model)
    missing = [k for k in report.missing if not k.startswith(MIM_ONLY_PREFIXES)]
    if report.mismatched or missing or report.unexpected or not converted:
        raise LayoutError(
            f"model.init_from {path} does not fit model {type(model).__name__}: {report.summary()}; "
            f"check model.variant / model.img_size against the file"
        )
    return converted, report


def init_from(model: nn.Module, path: str) -> ImportReport:
    """Start training from a weights file (model.init_from): every rank converts it to our names;
    a ZeRO-3 partitioned param is gathered, rank 0 copies the value in and DeepSpeed partitions it
    again. Anything but the MIM/MAE heads missing, or any shape mismatch, is an error naming them."""
    converted, report = check_init_from(model, read_state_dict(path), path)
    params = dict(model.named_parameters())
    partitioned = [name for name in converted if hasattr(params.get(name), "ds_id")]
    if partitioned:
        import deepspeed  # only for a ZeRO-3 partitioned model (2.3 s to import; inference never needs it)

        rank = dist.get_rank() if dist.is_initialized() else 0
        for name in partitioned:  # one param at a time: EVA-g is never whole on a rank
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        params[name].data.copy_(converted[name].reshape(params[name].ds_shape))
    model.load_state_dict(OrderedDict((k, v) for k, v in converted.items() if k not in partitioned), strict=False)
    log.info("model.init_from %s: %d tensors loaded; %s", path, len(converted), report.summary())
    return report


def model_from_metadata(metadata: dict[str, str], state_dict: Mapping[str, torch.Tensor], backbone_only: bool):
    """Build the eva-train model a consolidated file was made from (its `config` metadata)."""
    if "config" not in metadata:
        raise ValueError(
            "the file has no eva-train config in its metadata (not made by tools/consolidate.py "
            "from an eva-train run); build the model yourself and call load_weights"
        )
    model_cfg = json.loads(metadata["config"]).get("model", {})
    variant, img_size = model_cfg.get("variant"), model_cfg.get("img_size")
    if backbone_only or "lm_head.weight" not in state_dict:
        return build_backbone(variant, img_size)
    fields = {k: v for k, v in model_cfg.items() if k in ModelConfig.__dataclass_fields__}
    return build_model(ModelConfig(**fields), teacher_dim=state_dict["lm_head.weight"].shape[0])


def check_loads_strict(path: str) -> nn.Module:
    """Build the model named in the file's metadata and load the file into it with strict=True."""
    state_dict = load_file(path)
    model = model_from_metadata(read_metadata(path), state_dict, backbone_only=False)
    model.load_state_dict(state_dict, strict=True)
    return model
