"""Importing foreign EVA weights: official EVA-01 / EVA-02 releases, timm, mmpretrain, with
position-embedding resize and a missing/unexpected/mismatched report."""

import dataclasses

import pytest
import torch

from eva_train.export.layouts import LayoutError
from eva_train.export.weights import load_weights, read_state_dict
from eva_train.models import build_backbone
from eva_train.models.eva import EvaForMIM
from eva_train.models.variants import VARIANTS


def _mim(variant: str, img_size=None, teacher_dim: int = 8, seed: int = 0) -> EvaForMIM:
    torch.manual_seed(seed)
    return EvaForMIM(VARIANTS[variant], img_size, teacher_dim).eval()


def _random_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero biases (they start at zero), so a bias loaded into the wrong place shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "q_bias", "v_bias")):
                param.normal_()
    return model


def _assert_same(a: dict, b: dict, skip=()):
    for name, tensor in a.items():
        if name not in skip:
            assert torch.equal(tensor, b[name]), name


def test_official_eva01_checkpoint_with_pos_embed_resize(tmp_path):
    source = _mim("eva_debug_p4")  # 16 px -> 4x4 grid; our names are EVA-01's
    path = tmp_path / "eva01.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    target = _mim("eva_debug_p4", img_size=24, seed=1)  # 6x6 grid
    report = load_weights(target, str(path))
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.resized and "(1, 17, 32) -> (1, 37, 32)" in report.resized[0]
    _assert_same(source.state_dict(), target.state_dict(), skip={"pos_embed"})
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])  # cls row kept


def _official_eva02_file(depth: int, dim: int, hidden: int, grid: int, seed: int = 0) -> dict:
    """An official EVA-02 B/L MIM checkpoint's tensors, named as the release's own modules name them
    (baaivision/EVA, EVA-02/asuka: modeling_pretrain.py `VisionTransformerForMaskedImageModeling`;
    modeling_finetune.py `Attention` with subln: q/k/v_proj without bias + q_bias/v_bias, `SwiGLU`:
    w1 (gate), w2, ffn_ln, w3; a shared `VisionRotaryEmbeddingFast` as `rope` / `blocks.N.attn.rope`),
    written out literally here, with random values."""
    g = torch.Generator().manual_seed(seed)
    names = {
        "cls_token": (1, 1, dim),
        "mask_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + 1, dim),
        "patch_embed.proj.weight": (dim, 3, 4, 4),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "lm_head.weight": (8, dim),
        "lm_head.bias": (8,),
        "rope.freqs_cos": (grid * grid, dim // 2),
        "rope.freqs_sin": (grid * grid, dim // 2),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        names.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.q_proj.weight": (dim, dim),
                b + "attn.k_proj.weight": (dim, dim),
                b + "attn.v_proj.weight": (dim, dim),
                b + "attn.q_bias": (dim,),
                b + "attn.v_bias": (dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "attn.rope.freqs_cos": (grid * grid, dim // 2),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.w1.weight": (hidden, dim),
                b + "mlp.w1.bias": (hidden,),
                b + "mlp.w2.weight": (hidden, dim),
                b + "mlp.w2.bias": (hidden,),
                b + "mlp.ffn_ln.weight": (hidden,),
                b + "mlp.ffn_ln.bias": (hidden,),
                b + "mlp.w3.weight": (dim, hidden),
                b + "mlp.w3.bias": (dim,),
            }
        )
    return {k: torch.randn(shape, generator=g) * 0.2 for k, shape in names.items()}


def test_official_eva02_checkpoint_loads_as_timm_reads_it(tmp_path):
    """The oracle is timm: its own filter for official EVA-02 files (`checkpoint_filter_fn`) into its
    own Eva, against our import of the same file."""
    from timm.models.eva import Eva, checkpoint_filter_fn

    cfg = VARIANTS["eva02_debug_p4"]
    official = _official_eva02_file(cfg.depth, cfg.embed_dim, cfg.mlp_hidden_dim, grid=4)
    path = tmp_path / "eva02.pt"
    torch.save({"module": official}, path)  # the releases wrap their weights in `module`
    target = _mim("eva02_debug_p4", seed=1)
    report = load_weights(target, str(path), strict=True)
    assert report.source_layout == "eva02_official"
    timm_model = Eva(
        img_size=16,
        patch_size=4,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_hidden_dim / cfg.embed_dim,
        qkv_fused=False,
        swiglu_mlp=True,
        scale_mlp=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
        num_classes=0,
        global_pool="token",
    ).eval()
    backbone_only = {k: v for k, v in official.items() if not k.startswith(("mask_token", "lm_head"))}
    timm_model.load_state_dict(checkpoint_filter_fn(backbone_only, timm_model), strict=True)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(images), timm_model.forward_features(images))
    assert torch.equal(target.lm_head.weight, official["lm_head.weight"])
    assert torch.equal(target.mask_token, official["mask_token"])


def test_timm_checkpoint_into_our_backbone_gives_same_features():
    from timm.models.eva import Eva

    cfg = VARIANTS["eva02_debug_p4"]
    torch.manual_seed(0)
    timm_model = Eva(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=cfg.mlp_hidden_dim / 32,
        qkv_fused=False,
        swiglu_mlp=True,
        scale_mlp=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
        num_classes=0,
        global_pool="token",
    ).eval()
    ours = build_backbone("eva02_debug_p4").eval()
    report = load_weights(ours, timm_model.state_dict(), strict=True)
    assert report.source_layout == "timm"
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), timm_model.forward_features(images))


def _mmpretrain_eva02_file(depth: int, dim: int, hidden: int, grid: int, seed: int = 0) -> dict:
    """An mmpretrain EVA-02 checkpoint, named and fused as mmpretrain's own converter writes it
    (open-mmlab/mmpretrain tools/model_converters/eva02_to_mmpretrain.py: `backbone.` prefix, blocks ->
    layers, q/k/v_proj -> attn.qkv.weight = cat(q, k, v), q_bias/v_bias -> attn.qkv.bias = cat(q, 0, v),
    mlp.w1 + w2 -> mlp.w12 = cat(w1, w2), ffn_ln -> mlp.norm, w3 kept, patch_embed.proj -> projection,
    fc_norm -> ln2, head -> head.fc), written out literally here, with random values."""
    g = torch.Generator().manual_seed(seed)
    names = {
        "backbone.cls_token": (1, 1, dim),
        "backbone.pos_embed": (1, grid * grid + 1, dim),
        "backbone.patch_embed.projection.weight": (dim, 3, 4, 4),
        "backbone.patch_embed.projection.bias": (dim,),
        "backbone.ln2.weight": (dim,),
        "backbone.ln2.bias": (dim,),
        "head.fc.weight": (10, dim),
        "head.fc.bias": (10,),
    }
    for i in range(depth):
        b = f"backbone.layers.{i}."
        names.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.w12.weight": (2 * hidden, dim),
                b + "mlp.w12.bias": (2 * hidden,),
                b + "mlp.norm.weight": (hidden,),
                b + "mlp.norm.bias": (hidden,),
                b + "mlp.w3.weight": (dim, hidden),
                b + "mlp.w3.bias": (dim,),
            }
        )
    out = {k: torch.randn(shape, generator=g) for k, shape in names.items()}
    for i in range(depth):
        out[f"backbone.layers.{i}.attn.qkv.bias"][dim : 2 * dim] = 0  # the converter's k bias
    return out


def test_mmpretrain_eva02_checkpoint_lands_where_its_converter_took_it_from():
    cfg = VARIANTS["eva02_debug_p4"]
    dim, hidden = cfg.embed_dim, cfg.mlp_hidden_dim
    file = _mmpretrain_eva02_file(cfg.depth, dim, hidden, grid=4)
    target = build_backbone("eva02_debug_p4").eval()
    report = load_weights(target, {"state_dict": file})
    assert report.source_layout == "mmpretrain" and report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == ["head.fc.bias", "head.fc.weight"]  # a classifier head: named, not loaded
    ours = target.state_dict()
    for i in range(cfg.depth):
        layer, block = file, f"blocks.{i}."
        qkv, bias = layer[f"backbone.layers.{i}.attn.qkv.weight"], layer[f"backbone.layers.{i}.attn.qkv.bias"]
        w12, w12_bias = layer[f"backbone.layers.{i}.mlp.w12.weight"], layer[f"backbone.layers.{i}.mlp.w12.bias"]
        expected = {
            "attn.q_proj.weight": qkv[:dim],
            "attn.k_proj.weight": qkv[dim : 2 * dim],
            "attn.v_proj.weight": qkv[2 * dim :],
            "attn.q_proj.bias": bias[:dim],
            "attn.v_proj.bias": bias[2 * dim :],
            "mlp.fc1_g.weight": w12[:hidden],
            "mlp.fc1_x.weight": w12[hidden:],
            "mlp.fc1_g.bias": w12_bias[:hidden],
            "mlp.fc1_x.bias": w12_bias[hidden:],
            "mlp.fc2.weight": layer[f"backbone.layers.{i}.mlp.w3.weight"],
            "mlp.norm.weight": layer[f"backbone.layers.{i}.mlp.norm.weight"],
            "norm1.weight": layer[f"backbone.layers.{i}.norm1.weight"],
        }
        for name, tensor in expected.items():
            assert torch.equal(ours[block + name], tensor), block + name
    assert torch.equal(ours["norm.weight"], file["backbone.ln2.weight"])
    assert torch.equal(ours["patch_embed.proj.weight"], file["backbone.patch_embed.projection.weight"])
    with pytest.raises(LayoutError, match="unexpected"):
        load_weights(target, {**file, "backbone.layers.0.attn.extra.weight": torch.zeros(2)}, strict=True)


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


def test_timm_default_eva02_with_fc_norm_loads_as_the_final_norm():
    """timm's EVA-02 models pool with global_pool='avg' by default: the final norm is `fc_norm` (after
    pooling) and `norm` is empty. Its weights are our final norm: per token, our features are the
    timm blocks' output normalized with fc_norm's parameters."""
    import timm
    import torch.nn.functional as F

    torch.manual_seed(0)
    timm_model = timm.create_model("eva02_tiny_patch14_224", pretrained=False).eval()
    assert "fc_norm.weight" in timm_model.state_dict() and "norm.weight" not in timm_model.state_dict()
    with torch.no_grad():
        timm_model.fc_norm.weight.normal_()
        timm_model.fc_norm.bias.normal_()
    ours = build_backbone("eva02_ti_p14").eval()
    report = load_weights(ours, timm_model.state_dict(), strict=True)
    assert report.source_layout == "timm"
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = timm_model.forward_features(images)
        expected = F.layer_norm(tokens, (192,), timm_model.fc_norm.weight, timm_model.fc_norm.bias, 1e-6)
        torch.testing.assert_close(ours.forward_features(images), expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_file_of_every_variant_loads_back_by_auto_detection(tmp_path, variant):
    """A native file (what tools/consolidate.py writes, MIM head included) of each variant, at one
    block, loads back into the backbone with nothing missing or unexpected (the MIM head is left out
    by name), learned-k-bias variants included."""
    from safetensors.torch import save_file

    patch = VARIANTS[variant].patch_size
    torch.manual_seed(0)
    source = _random_biases(EvaForMIM(dataclasses.replace(VARIANTS[variant], depth=1), 2 * patch, teacher_dim=8))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "native.safetensors"))
    target = build_backbone(variant, 2 * patch, depth=1)
    report = load_weights(target, str(tmp_path / "native.safetensors"), strict=True)
    assert sorted(report.ignored) == ["lm_head.bias", "lm_head.weight", "mask_token"]
    _assert_same(target.state_dict(), source.state_dict())


def test_get_model_reads_a_learned_k_bias_mae_file_by_its_metadata(tmp_path):
    """The reported failure: eva_mae_b16's own consolidated file (full qkv bias, MAE decoder) raised."""
    import json

    from safetensors.torch import save_file

    from eva_train.config import ModelConfig
    from eva_train.export.inference import get_model
    from eva_train.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        variant="eva_mae_b16", img_size=32, mode="mae", decoder_depth=1, decoder_width=32, decoder_heads=2
    )
    source = _random_biases(build_model(cfg, teacher_dim=8))
    path = tmp_path / "mae.safetensors"
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()},
        str(path),
        metadata={"config": json.dumps({"model": {"variant": "eva_mae_b16", "img_size": 32}})},
    )
    model = get_model(str(path))
    assert torch.equal(model.blocks[3].attn.qkv.bias, source.blocks[3].attn.qkv.bias)
    assert model.blocks[3].attn.qkv.bias.abs().sum() > 0


def test_init_from_refuses_unexpected_tensors_naming_them_and_the_known_heads(tmp_path):
    from safetensors.torch import save_file

    from eva_train.export.weights import init_from

    state = {k: v.contiguous() for k, v in build_backbone("eva_debug_p4", 16).state_dict().items()}
    state["blocks.1.attn.extra_scale"] = torch.ones(32)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(LayoutError, match=r"1 unexpected \(blocks.1.attn.extra_scale\).*known heads.*lm_head"):
        init_from(_mim("eva_debug_p4", 16), str(tmp_path / "extra.safetensors"))


@pytest.fixture(scope="module")
def eva02_clip_b16():
    """open_clip's own EVA02-B-16 (its vision tower: a timm EVA-02 with `scale_attn_inner`, i.e. an
    `attn.norm` LayerNorm in every block), random weights."""
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("EVA02-B-16", pretrained=None).eval()


def test_eva02_clip_tower_with_attn_norm_is_refused_by_name(tmp_path, eva02_clip_b16):
    from safetensors.torch import save_file

    from eva_train.export.weights import init_from

    ours = build_backbone("eva02_b_p14", 224, patch_size=16)  # the tower's shape, without attn.norm
    report = load_weights(ours, eva02_clip_b16.state_dict())
    assert report.source_layout == "open_clip" and report.missing == [] and report.mismatched == []
    assert sorted(report.unexpected) == sorted(
        f"visual.trunk.blocks.{i}.attn.norm.{p}" for i in range(12) for p in ("weight", "bias")
    )
    assert "visual.trunk.head.weight" in report.ignored and "text.token_embedding.weight" in report.ignored
    path = tmp_path / "eva02_clip_b16.safetensors"
    save_file({k: v.contiguous() for k, v in eva02_clip_b16.state_dict().items()}, str(path))
    with pytest.raises(LayoutError, match=r"24 unexpected \(visual.trunk.blocks.0.attn.norm.*EVA02-CLIP"):
        init_from(ours, str(path))


def test_eva02_clip_tower_loads_into_a_backbone_with_scale_attn_inner(eva02_clip_b16):
    """With the model option (timm's scale_attn_inner) the same tower maps name for name and gives
    its trunk's features (the tower's RoPE reference grid is 16x16: default_img_size 256 at p16)."""
    ours = build_backbone("eva02_b_p14", 224, patch_size=16, default_img_size=256, scale_attn_inner=True).eval()
    report = load_weights(ours, eva02_clip_b16.state_dict(), strict=True)
    assert report.source_layout == "open_clip" and report.unexpected == []
    trunk = eva02_clip_b16.visual.trunk
    with torch.no_grad():
        for name, param in trunk.named_parameters():  # non-trivial norms and biases everywhere
            if "norm" in name or name.endswith("bias"):
                param.normal_(std=0.2)
        load_weights(ours, eva02_clip_b16.state_dict(), strict=True)
        images = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(ours.forward_features(images), trunk.forward_features(images))


def test_predict_cli_refuses_a_file_with_unexpected_tensors_exit_2(tmp_path, capsys):
    """get_model at the CLI: one line, exit 2, naming the tensor."""
    import importlib.util
    import json
    from pathlib import Path

    from PIL import Image
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_backbone("eva_debug_p4", 16).state_dict().items()}
    state["blocks.0.attn.norm.weight"] = torch.ones(32)
    save_file(
        state,
        str(tmp_path / "w.safetensors"),
        metadata={"config": json.dumps({"model": {"variant": "eva_debug_p4", "img_size": 16}})},
    )
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    spec = importlib.util.spec_from_file_location("predict_cli", Path(__file__).parents[1] / "tools/predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(
        [
            str(tmp_path / "a.png"),
            "--checkpoint",
            str(tmp_path / "w.safetensors"),
            "--features",
            str(tmp_path / "f.safetensors"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "blocks.0.attn.norm.weight" in err[0] and "scale_attn_inner" in err[0]


def test_one_reader_unwraps_training_checkpoints_for_import_and_teacher(tmp_path):
    """export.weights and the teacher read files with the same function: wrappers taken in one order
    (an EMA copy first), level after level; a file without tensors is one clear error."""
    from eva_train.models.teacher import TeacherLoadError
    from eva_train.models.teacher import read_state_dict as read_teacher_file

    ema, raw = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    torch.save({"epoch": 3, "model_ema": ema, "model": raw}, tmp_path / "train.pt")
    torch.save({"state_dict": {"module": {"w": torch.ones(2), "step": 7}}}, tmp_path / "nested.pt")
    torch.save({"epoch": 3}, tmp_path / "none.pt")
    for read in (read_state_dict, read_teacher_file):
        assert torch.equal(read(str(tmp_path / "train.pt"))["w"], ema["w"])
        assert list(read(str(tmp_path / "nested.pt"))) == ["w"]
    with pytest.raises(ValueError, match="no weights found"):
        read_state_dict(str(tmp_path / "none.pt"))
    with pytest.raises(TeacherLoadError, match="cannot read teacher.checkpoint .*no weights found"):
        read_teacher_file(str(tmp_path / "none.pt"))
