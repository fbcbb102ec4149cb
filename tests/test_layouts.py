"""Export layouts: strict loads into timm / open_clip with the same features as our model, and an
exact mmpretrain round trip whose key names are those of mmpretrain's EVA converters."""

import dataclasses
import re

import pytest
import torch

from eva_train.config import ModelConfig
from eva_train.export.layouts import LayoutError, from_layout, plan_layout, to_layout
from eva_train.models import build_model
from eva_train.models.eva import EvaForMIM
from eva_train.models.variants import VARIANTS

# EVA-01 (q/v bias), EVA-02 B/L style (separate q/k/v, SwiGLU + sub-LN), EVA-02 Ti/S style (fused, packed SwiGLU)
VARIANT_CASES = {
    "eva01": VARIANTS["eva_debug_p4"],
    "eva02_large": VARIANTS["eva02_debug_p4"],
    "eva02_small": dataclasses.replace(VARIANTS["eva02_debug_p4"], sub_ln=False, qkv_fused=True),
}


def _ours(case: str, seed: int = 0) -> EvaForMIM:
    torch.manual_seed(seed)
    model = EvaForMIM(VARIANT_CASES[case], None, teacher_dim=8).eval()
    with torch.no_grad():  # non-zero biases everywhere, so a misplaced bias cannot hide
        for name, param in model.named_parameters():
            if name.endswith(("bias", "q_bias", "v_bias")):
                param.normal_(std=0.1)
    return model


def _timm_eva(cfg, img_size: int):
    from timm.models.eva import Eva

    return Eva(
        img_size=img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_hidden_dim / cfg.embed_dim,
        qkv_bias=cfg.qkv_bias,
        qkv_fused=cfg.qkv_fused,
        swiglu_mlp=cfg.swiglu,
        scale_mlp=cfg.sub_ln,
        use_rot_pos_emb=cfg.rope,
        ref_feat_shape=(cfg.rope_ref_grid,) * 2 if cfg.rope else None,
        num_classes=0,
        global_pool="token",
    ).eval()


@pytest.mark.parametrize("case", sorted(VARIANT_CASES))
def test_timm_layout_loads_strict_with_same_features(case):
    ours = _ours(case)
    cfg = VARIANT_CASES[case]
    timm_model = _timm_eva(cfg, cfg.default_img_size)
    exported = to_layout(ours.state_dict(), "timm")
    assert not any(k.startswith(("mask_token", "lm_head")) for k in exported)
    timm_model.load_state_dict(exported, strict=True)
    images = torch.randn(2, 3, cfg.default_img_size, cfg.default_img_size)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(images), ours.forward_features(images))


def test_timm_layout_splits_a_zero_k_bias_and_refuses_a_learned_one():
    cfg = dataclasses.replace(VARIANTS["eva_debug_p4"], qkv_bias=False, k_bias=True)  # eva_l_p14 style
    ours = EvaForMIM(cfg, None, teacher_dim=8).eval()
    dim = cfg.embed_dim
    with torch.no_grad():
        for block in ours.blocks:
            block.attn.qkv.bias.normal_()
            block.attn.qkv.bias[dim : 2 * dim] = 0
    timm_model = _timm_eva(dataclasses.replace(cfg, qkv_bias=True), cfg.default_img_size)
    timm_model.load_state_dict(to_layout(ours.state_dict(), "timm"), strict=True)
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(images), ours.forward_features(images))
        ours.blocks[0].attn.qkv.bias[dim] = 0.5
    with pytest.raises(LayoutError, match="learned k bias"):
        to_layout(ours.state_dict(), "timm")


def _register_tiny_timm_trunk(cfg) -> str:
    import timm
    from timm.models import register_model

    name = "eva_train_test_tiny_eva02"
    if not timm.models.is_model(name):

        @register_model
        def eva_train_test_tiny_eva02(pretrained=False, **kwargs):  # noqa: F811
            from timm.models.eva import Eva

            kwargs.setdefault("global_pool", "token")
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
            return Eva(
                img_size=cfg.default_img_size,
                patch_size=cfg.patch_size,
                embed_dim=cfg.embed_dim,
                depth=cfg.depth,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_hidden_dim / cfg.embed_dim,
                qkv_fused=cfg.qkv_fused,
                swiglu_mlp=True,
                scale_mlp=cfg.sub_ln,
                use_rot_pos_emb=True,
                ref_feat_shape=(cfg.rope_ref_grid,) * 2,
                **kwargs,
            )

    return name


def test_open_clip_layout_is_the_visual_trunk_of_an_eva_clip_model():
    from open_clip.model import CLIP

    cfg = VARIANT_CASES["eva02_large"]
    trunk_name = _register_tiny_timm_trunk(cfg)
    clip = CLIP(
        embed_dim=16,
        vision_cfg={
            "image_size": cfg.default_img_size,
            "timm_model_name": trunk_name,
            "timm_pool": "token",
            "timm_proj": None,
        },
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    ).eval()
    ours = _ours("eva02_large")
    exported = to_layout(ours.state_dict(), "open_clip")
    result = clip.load_state_dict(exported, strict=False)
    assert result.unexpected_keys == []
    # all that is left is what EVA-CLIP trains anew: the CLIP projection and the text tower
    assert not [k for k in result.missing_keys if k.startswith("visual.") and not k.startswith("visual.trunk.head.")]
    images = torch.randn(2, 3, cfg.default_img_size, cfg.default_img_size)
    with torch.no_grad():
        torch.testing.assert_close(clip.visual.trunk.forward_features(images), ours.forward_features(images))


def _backbone_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(("mask_token", "lm_head"))}


@pytest.mark.parametrize("case", sorted(VARIANT_CASES))
def test_mmpretrain_round_trip_is_exact(case):
    ours = _ours(case)
    exported = to_layout(ours.state_dict(), "mmpretrain")
    assert all(k.startswith("backbone.") for k in exported)
    back = from_layout(exported, "mmpretrain", _backbone_shapes(ours))
    assert set(back) == set(_backbone_shapes(ours))
    for name, tensor in back.items():
        assert torch.equal(tensor, ours.state_dict()[name]), name


def _eva01_converter_names(keys):
    """Key renames of mmpretrain's tools/model_converters/eva_to_mmpretrain.py, restated."""
    out = []
    for k in keys:
        if "mask_token" in k or k.startswith("lm_head"):
            continue
        if k.startswith("patch_embed"):
            k = k.replace("proj.", "projection.")
        elif k.startswith("blocks"):
            k = k.replace("blocks.", "layers.")
            for old, new in (
                ("norm1", "ln1"),
                ("norm2", "ln2"),
                ("mlp.fc1", "ffn.layers.0.0"),
                ("mlp.fc2", "ffn.layers.1"),
            ):
                if old in k:
                    k = k.replace(old, new)
                    break
        elif k.startswith("norm"):
            k = k.replace("norm", "ln2")
        out.append("backbone." + k)
    return sorted(out)


def test_mmpretrain_eva01_names_match_the_converter():
    ours = _ours("eva01")  # our names are the official EVA-01 names
    assert sorted(to_layout(ours.state_dict(), "mmpretrain")) == _eva01_converter_names(ours.state_dict())


def test_mmpretrain_eva02_names_match_the_converter():
    """eva02_to_mmpretrain.py: blocks -> layers, q/k/v -> fused qkv (+ qkv.bias with k = 0), w1 + w2 ->
    w12, w3 stays, ffn_ln -> norm; patch_embed.proj -> projection; final norm -> ln2."""
    ours = _ours("eva02_large")
    names = to_layout(ours.state_dict(), "mmpretrain")
    per_layer = {
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.w12.weight",
        "mlp.w12.bias",
        "mlp.norm.weight",
        "mlp.norm.bias",
        "mlp.w3.weight",
        "mlp.w3.bias",
    }
    expected = {
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.patch_embed.projection.weight",
        "backbone.patch_embed.projection.bias",
        "backbone.ln2.weight",
        "backbone.ln2.bias",
    }
    expected |= {f"backbone.layers.{i}.{k}" for i in range(VARIANT_CASES["eva02_large"].depth) for k in per_layer}
    assert set(names) == expected
    dim = VARIANT_CASES["eva02_large"].embed_dim
    qkv = names["backbone.layers.0.attn.qkv.weight"]
    assert torch.equal(qkv[dim : 2 * dim], ours.blocks[0].attn.k_proj.weight)
    bias = names["backbone.layers.0.attn.qkv.bias"]
    assert torch.equal(bias[dim : 2 * dim], torch.zeros(dim))
    assert torch.equal(bias[2 * dim :], ours.blocks[0].attn.v_proj.bias)
    hidden = ours.blocks[0].mlp.fc1_g.weight.shape[0]
    assert torch.equal(names["backbone.layers.0.mlp.w12.weight"][:hidden], ours.blocks[0].mlp.fc1_g.weight)


def test_eva_layouts_refuse_foreign_models_and_unknown_layouts():
    shapes = {"encoder.weight": (3, 3)}
    assert list(plan_layout("native", shapes).dest_shapes) == ["encoder.weight"]
    with pytest.raises(LayoutError, match="needs an eva-train EVA model.*encoder.weight"):
        plan_layout("timm", shapes)
    with pytest.raises(LayoutError, match="unknown"):
        plan_layout("onnx", shapes)
    inner_norm = {"blocks.0.attn.norm.weight": (4,), "blocks.0.norm1.weight": (4,)}  # scale_attn_inner
    assert list(plan_layout("timm", inner_norm).dest_shapes) == list(inner_norm)
    with pytest.raises(LayoutError, match="mmpretrain layout has no attn.norm"):
        plan_layout("mmpretrain", inner_norm)


def test_mae_decoder_is_dropped_by_backbone_layouts():
    model = build_model(
        ModelConfig(
            variant="eva_debug_p4", img_size=16, mode="mae", decoder_depth=1, decoder_width=16, decoder_heads=2
        ),
        teacher_dim=8,
    )
    exported = to_layout(model.state_dict(), "timm")
    assert not [k for k in exported if re.match("decoder", k)]
    assert "blocks.0.attn.qkv.weight" in exported
