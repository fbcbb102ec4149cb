"""Our state-dict names <-> timm / open_clip / mmpretrain names, as element routes.

A layout is a `LayoutPlan`: for every source tensor, the flat element ranges it sends to which
destination tensor (and at which element offset). Renames are one full-length route; fusions
(mmpretrain's qkv from q/k/v, w12 from gate + value) are routes into one destination at offsets;
splits (a full qkv bias into timm's q_bias / v_bias) are several routes out of one source. Routes
work on flat element ranges because every fusion here concatenates along dim 0, so the streaming
consolidator can apply a plan piece by piece, and `convert` / `invert` apply it to whole tensors.

Layouts (all drop the MIM/MAE-only tensors `mask_token`, `lm_head.*`, `decoder*`):
  native      our names unchanged (any model; nothing dropped)
  timm        timm `Eva(num_classes=0, global_pool='token')` names (ours already are); a learned
              full qkv bias becomes q_bias / v_bias, which needs its k third to be zero
  open_clip   timm names under `visual.trunk.` (open_clip's EVA towers wrap a timm trunk; the
              CLIP projection `visual.trunk.head` is new in EVA-CLIP and not part of the file)
  mmpretrain  `backbone.*` names of mmpretrain's BEiTViT (EVA-01) / ViTEVA02 (EVA-02), as its
              converters `eva_to_mmpretrain.py` / `eva02_to_mmpretrain.py` produce them: EVA-02
              fuses qkv (k bias zero) and the SwiGLU gate/value into `w12`; the final norm goes to
              `ln2` (mmpretrain's EVA configs pool with `out_type='avg_featmap'` through `ln2`)
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eva_train.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are converted; plans (streaming export) need none
    import torch

LAYOUTS = ("native", "timm", "open_clip", "mmpretrain")
MIM_ONLY_PREFIXES = ("mask_token", "lm_head.", "decoder")
Shape = tuple[int, ...]


class LayoutError(ConfigError):
    pass


@dataclass(frozen=True)
class Route:
    dest: str | None  # None: the source range is dropped and must be zero (timm's fixed k bias)
    src_start: int  # flat element offset in the source tensor
    length: int
    dest_start: int = 0  # flat element offset in the destination tensor


@dataclass
class LayoutPlan:
    layout: str
    dest_shapes: OrderedDict[str, Shape]
    routes: dict[str, list[Route]]  # source name -> routes; a source absent here is dropped
    zero_fill: dict[str, int]  # dest name -> elements deliberately left zero (mmpretrain's k bias)

    @property
    def dropped(self) -> list[str]:
        return [name for name, routes in self.routes.items() if not routes]

    def convert(self, state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Apply the plan to whole tensors (source -> destination names)."""
        import torch

        dtypes = {}
        for src, routes in self.routes.items():
            for route in routes:
                if route.dest is not None:
                    dtypes.setdefault(route.dest, state_dict[src].dtype)
        out = OrderedDict(
            (name, torch.zeros(math.prod(shape), dtype=dtypes.get(name, torch.float32)))
            for name, shape in self.dest_shapes.items()
        )
        for src, routes in self.routes.items():
            flat = state_dict[src].reshape(-1)
            for route in routes:
                piece = flat[route.src_start : route.src_start + route.length]
                if route.dest is None:
                    if bool(piece.any()):
                        raise LayoutError(
                            f"{src}: elements [{route.src_start}, {route.src_start + route.length}) "
                            f"are not zero but the {self.layout} layout has no place for them "
                            f"(a learned k bias); use --layout native"
                        )
                    continue
                out[route.dest][route.dest_start : route.dest_start + route.length] = piece
        return OrderedDict((name, t.view(self.dest_shapes[name])) for name, t in out.items())

    def invert(
        self, foreign: Mapping[str, torch.Tensor], src_shapes: Mapping[str, Shape]
    ) -> OrderedDict[str, torch.Tensor]:
        """Destination-layout tensors -> source names (all must be there)."""
        out, missing, mismatched, _ = self.invert_partial(foreign, src_shapes)
        if missing or mismatched:
            raise LayoutError(
                f"{self.layout} weights lack {len(missing)} tensors (e.g. {missing[:3]}) and have "
                f"{len(mismatched)} of another shape (e.g. {mismatched[:3]})"
            )
        return out

    def invert_partial(self, foreign: Mapping[str, torch.Tensor], src_shapes: Mapping[str, Shape]):
        """Destination-layout tensors -> source names, for what is there. Ranges the layout drops
        come back as zeros (a fixed zero k bias). Returns (tensors, missing source names,
        source names whose foreign tensors have another size, foreign names used)."""
        import torch

        out, missing, mismatched, used = OrderedDict(), [], [], set()
        for src, routes in self.routes.items():
            dests = [r for r in routes if r.dest is not None]
            if not dests:
                continue
            if any(r.dest not in foreign for r in dests):
                missing.append(src)
                continue
            if any(foreign[r.dest].numel() != math.prod(self.dest_shapes[r.dest]) for r in dests):
                mismatched.append(src)
                used.update(r.dest for r in dests)
                continue
            first = foreign[dests[0].dest]  # its device too: the start-up check converts meta tensors
            flat = torch.zeros(math.prod(src_shapes[src]), dtype=first.dtype, device=first.device)
            for route in dests:
                piece = foreign[route.dest].reshape(-1)[route.dest_start : route.dest_start + route.length]
                flat[route.src_start : route.src_start + route.length] = piece
                used.add(route.dest)
            out[src] = flat.view(src_shapes[src])
        return out, missing, mismatched, used


def is_mim_only(name: str) -> bool:
    return name.startswith(MIM_ONLY_PREFIXES)


def plan_layout(layout: str, shapes: Mapping[str, Shape], swiglu: bool | None = None) -> LayoutPlan:
    """The plan that renames our tensors (`shapes`: name -> shape, in order) into `layout`.
    `swiglu` (EVA-02, else EVA-01) matters only for mmpretrain; None = guessed from the names."""
    if layout not in LAYOUTS:
        raise LayoutError(f"layout '{layout}' is unknown; choose one of {', '.join(LAYOUTS)}")
    shapes = OrderedDict((k, tuple(v)) for k, v in shapes.items())
    if layout == "native":
        return _build(layout, shapes, lambda name, shape: [(name, 0, math.prod(shape), 0)], {})
    _check_eva_names(shapes, layout)
    if layout in ("timm", "open_clip"):
        prefix = "visual.trunk." if layout == "open_clip" else ""
        return _build(layout, shapes, lambda name, shape: _timm_routes(name, shape, prefix), {})
    if any(".attn.norm." in k for k in shapes):
        raise LayoutError(
            "the mmpretrain layout has no attn.norm (this model's scale_attn_inner LayerNorm); use "
            "--layout timm, open_clip or native"
        )
    if swiglu is None:
        swiglu = any(".mlp.fc1_g." in k or ".mlp.fc2." in k and _is_swiglu_fc2(k, shapes) for k in shapes)
    return _mmpretrain_plan(shapes, swiglu)


def _is_swiglu_fc2(key: str, shapes: Mapping[str, Shape]) -> bool:
    # packed SwiGLU (EVA-02 Ti/S): fc1 is twice as wide as fc2's input
    fc1 = key.replace(".mlp.fc2.", ".mlp.fc1.")
    return key.endswith("weight") and fc1 in shapes and shapes[fc1][0] == 2 * shapes[key][1]


_EVA_NAME = re.compile(
    r"^(patch_embed\.proj\.(weight|bias)|cls_token|pos_embed|norm\.(weight|bias)|"
    r"blocks\.\d+\.(norm1|norm2|attn\.(qkv|q_proj|k_proj|v_proj|proj|norm)|"
    r"mlp\.(fc1|fc1_g|fc1_x|fc2|norm))\.(weight|bias)|blocks\.\d+\.attn\.[qv]_bias)$"
)


def _check_eva_names(shapes: Mapping[str, Shape], layout: str) -> None:
    foreign = [k for k in shapes if not is_mim_only(k) and not _EVA_NAME.match(k)]
    if foreign:
        raise LayoutError(
            f"the {layout} layout needs an eva-train EVA model, but {len(foreign)} tensors have "
            f"other names (e.g. {foreign[:3]}); use --layout native"
        )


RouteSpec = tuple[str | None, int, int, int]  # dest, src_start, length, dest_start


def _build(
    layout: str,
    shapes: OrderedDict[str, Shape],
    routes_of: Callable[[str, Shape], Sequence[RouteSpec]],
    dest_extra: dict[str, Shape],
    zero_fill: dict[str, int] | None = None,
) -> LayoutPlan:
    dest_shapes: OrderedDict[str, Shape] = OrderedDict()
    routes: dict[str, list[Route]] = {}
    for name, shape in shapes.items():
        specs = [] if (layout != "native" and is_mim_only(name)) else routes_of(name, shape)
        routes[name] = [Route(dest, start, length, dest_start) for dest, start, length, dest_start in specs]
        for route in routes[name]:
            if route.dest is not None and route.dest not in dest_shapes:
                dest_shapes[route.dest] = dest_extra.get(route.dest) or (
                    shape if route.length == math.prod(shape) else (route.length,)
                )
    return LayoutPlan(layout, dest_shapes, routes, dict(zero_fill or {}))


def _timm_routes(name: str, shape: Shape, prefix: str) -> list[RouteSpec]:
    if name.endswith(".attn.qkv.bias"):  # learned full qkv bias -> timm's q_bias / (k fixed 0) / v_bias
        dim = shape[0] // 3
        base = prefix + name[: -len("qkv.bias")]
        return [(base + "q_bias", 0, dim, 0), (None, dim, dim, 0), (base + "v_bias", 2 * dim, dim, 0)]
    return [(prefix + name, 0, math.prod(shape), 0)]


def _mmpretrain_plan(shapes: OrderedDict[str, Shape], swiglu: bool) -> LayoutPlan:
    extra: dict[str, Shape] = {}
    zero_fill: dict[str, int] = {}

    def routes_of(name: str, shape: Shape) -> list[RouteSpec]:
        numel = math.prod(shape)
        match = re.match(r"blocks\.(\d+)\.(.*)$", name)
        if match is None:
            top = {
                "patch_embed.proj.weight": "patch_embed.projection.weight",
                "patch_embed.proj.bias": "patch_embed.projection.bias",
                "norm.weight": "ln2.weight",
                "norm.bias": "ln2.bias",
            }.get(name, name)
            return [("backbone." + top, 0, numel, 0)]
        layer, rest = f"backbone.layers.{match.group(1)}.", match.group(2)
        fused = (_eva02_block_route if swiglu else _eva01_block_route)(
            layer, rest, shape, shapes, name, extra, zero_fill
        )
        return [fused]

    return _build("mmpretrain", shapes, routes_of, extra, zero_fill)


def _eva01_block_route(layer, rest, shape, shapes, name, extra, zero_fill) -> RouteSpec:
    renames = {"norm1.": "ln1.", "norm2.": "ln2.", "mlp.fc1.": "ffn.layers.0.0.", "mlp.fc2.": "ffn.layers.1."}
    for old, new in renames.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return (layer + rest, 0, math.prod(shape), 0)


def _eva02_block_route(layer, rest, shape, shapes, name, extra, zero_fill) -> RouteSpec:
    numel = math.prod(shape)
    block = name[: -len(rest)]
    dim = shapes[block + "norm1.weight"][0]
    if rest in ("attn.q_bias", "attn.v_bias", "attn.q_proj.bias", "attn.v_proj.bias"):
        dest = layer + "attn.qkv.bias"  # (q, 0, v), k bias fixed at zero
        extra[dest] = (3 * dim,)
        zero_fill[dest] = dim
        return (dest, 0, numel, 0 if rest.startswith("attn.q") else 2 * dim)
    proj = re.match(r"attn\.([qkv])_proj\.weight$", rest)
    if proj:
        dest = layer + "attn.qkv.weight"
        extra[dest] = (3 * dim, dim)
        return (dest, 0, numel, "qkv".index(proj.group(1)) * dim * dim)
    gate = re.match(r"mlp\.fc1_([gx])\.(weight|bias)$", rest)
    if gate:  # w12 = cat(gate (w1), value (w2)) along dim 0
        dest = layer + "mlp.w12." + gate.group(2)
        extra[dest] = (2 * shape[0],) + tuple(shape[1:])
        return (dest, 0, numel, 0 if gate.group(1) == "g" else numel)
    renames = {"mlp.fc1.": "mlp.w12.", "mlp.fc2.": "mlp.w3.", "mlp.norm.": "mlp.norm."}
    for old, new in renames.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return (layer + rest, 0, numel, 0)


def to_layout(
    state_dict: Mapping[str, torch.Tensor], layout: str, swiglu: bool | None = None
) -> OrderedDict[str, torch.Tensor]:
    """Our state dict -> `layout` names (whole tensors; the streaming path uses `plan_layout`)."""
    plan = plan_layout(layout, {k: tuple(v.shape) for k, v in state_dict.items()}, swiglu)
    return plan.convert(state_dict)


def from_layout(
    foreign: Mapping[str, torch.Tensor], layout: str, our_shapes: Mapping[str, Shape], swiglu: bool | None = None
) -> OrderedDict[str, torch.Tensor]:
    """`layout`-named tensors -> our names, for a model whose tensors have `our_shapes`."""
    plan = plan_layout(layout, our_shapes, swiglu)
    return plan.invert(foreign, {k: tuple(v) for k, v in our_shapes.items()})
