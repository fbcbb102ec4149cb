"""Importing foreign EVA weights: official EVA-01 / EVA-02 releases, timm, mmpretrain, with
position-embedding resize and a missing/unexpected/mismatched report."""
import pytest
import torch

from eva_train.export.layouts import LayoutError, to_layout
from eva_train.models import build_backbone
from eva_train.models.eva import EvaForMIM
from eva_train.models.variants import VARIANTS
from eva_train.export.weights import load_weights, read_state_dict


def _mim(variant: str, img_size=None, teacher_dim: int = 8, seed: int = 0) -> EvaForMIM:
    torch.manual_seed(seed)
    return EvaForMIM(VARIANTS[variant], img_size, teacher_dim).eval()


def _assert_same(a: dict, b: dict, skip=()):
    for name, tensor in a.items():
        if name not in skip:
            assert torch.equal(tensor, b[name]), name


def test_official_eva01_checkpoint_with_pos_embed_resize(tmp_path):
    source = _mim("eva_debug_p4")                     # 16 px -> 4x4 grid; our names are EVA-01's
    path = tmp_path / "eva01.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    target = _mim("eva_debug_p4", img_size=24, seed=1)  # 6x6 grid
    report = load_weights(target, str(path))
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.resized and "(1, 17, 32) -> (1, 37, 32)" in report.resized[0]
    _assert_same(source.state_dict(), target.state_dict(), skip={"pos_embed"})
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])  # cls row kept


def _official_eva02_names(state_dict: dict) -> dict:
    """Our EVA-02 B/L names -> the official release's (SwiGLU w1/w2/w3 + ffn_ln, q_bias/v_bias)."""
    renames = [("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.fc2.", "mlp.w3."),
               ("mlp.norm.", "mlp.ffn_ln."), ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias")]
    out = {}
    for key, value in state_dict.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    out["rope.freqs_cos"] = torch.zeros(16, 8)  # official files carry RoPE tables; they are recomputed
    return out


def test_official_eva02_checkpoint(tmp_path):
    source = _mim("eva02_debug_p4")
    path = tmp_path / "eva02.pt"
    torch.save({"module": _official_eva02_names(source.state_dict())}, path)
    target = _mim("eva02_debug_p4", seed=1)
    report = load_weights(target, str(path), strict=True)
    assert report.source_layout == "eva02_official"
    _assert_same(source.state_dict(), target.state_dict())


def test_timm_checkpoint_into_our_backbone_gives_same_features():
    from timm.models.eva import Eva

    cfg = VARIANTS["eva02_debug_p4"]
    torch.manual_seed(0)
    timm_model = Eva(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=cfg.mlp_hidden_dim / 32,
                     qkv_fused=False, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                     num_classes=0, global_pool="token").eval()
    ours = build_backbone("eva02_debug_p4").eval()
    report = load_weights(ours, timm_model.state_dict(), strict=True)
    assert report.source_layout == "timm"
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), timm_model.forward_features(images))


@pytest.mark.parametrize("variant", ["eva_debug_p4", "eva02_debug_p4"])
def test_mmpretrain_checkpoint(tmp_path, variant):
    source = _mim(variant)
    exported = to_layout(source.state_dict(), "mmpretrain")
    exported["head.fc.weight"] = torch.zeros(10, 32)      # a classification head: reported, not loaded
    target = build_backbone(variant).eval()
    report = load_weights(target, {"state_dict": exported})
    assert report.source_layout == "mmpretrain"
    assert report.unexpected == ["head.fc.weight"] and report.missing == []
    _assert_same(target.state_dict(), source.state_dict())
    with pytest.raises(LayoutError, match="unexpected"):
        load_weights(target, exported, strict=True)


def test_lm_head_of_another_width_is_skipped_and_reported():
    source = _mim("eva_debug_p4", teacher_dim=8)
    target = _mim("eva_debug_p4", teacher_dim=12, seed=1)
    head_before = target.lm_head.weight.clone()
    report = load_weights(target, source.state_dict())
    assert report.mismatched == ["lm_head.weight", "lm_head.bias"]
    assert torch.equal(target.lm_head.weight, head_before)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert "2 mismatched (lm_head.weight, lm_head.bias)" in report.summary()


def test_backbone_file_into_mim_model_reports_the_new_head():
    source = build_backbone("eva_debug_p4")
    report = load_weights(_mim("eva_debug_p4"), source.state_dict())
    assert sorted(report.missing) == ["lm_head.bias", "lm_head.weight", "mask_token"]


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _Custom()}, path)
    with pytest.raises(ValueError, match="could not be read as plain tensors"):
        read_state_dict(str(path))


class _Custom:
    pass


def test_init_from_loads_a_backbone_and_refuses_another_variant(tmp_path):
    from safetensors.torch import save_file

    from eva_train.export.weights import init_from

    source = build_backbone("eva_debug_p4", 16)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "debug.safetensors"))
    model = _mim("eva_debug_p4", 16, seed=1)
    report = init_from(model, str(tmp_path / "debug.safetensors"))
    assert sorted(report.missing) == ["lm_head.bias", "lm_head.weight", "mask_token"]
    _assert_same(model.state_dict(), source.state_dict(), skip=("lm_head.weight", "lm_head.bias", "mask_token"))
    with pytest.raises(LayoutError, match="does not fit model EvaForMIM.*mismatched.*check model.variant"):
        init_from(_mim("eva_demo_p8", 64), str(tmp_path / "debug.safetensors"))
