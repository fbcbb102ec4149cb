"""Any image size, any aspect: dynamic position tables and RoPE, their per-grid caches,
`set_input_size`, loading weights saved at another size, and parity with timm's own
`dynamic_img_size=True` / `set_input_size` models."""

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from eva_train.config import ModelConfig
from eva_train.export.weights import load_weights
from eva_train.models import build_backbone, build_model
from eva_train.models.pos_embed import resize_pos_embed
from eva_train.models.variants import VARIANTS


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move norms, biases, tokens and position tables off their init (ones/zeros hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1 or name in ("cls_token", "pos_embed"):
                p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_runs_non_square_without_rebuilding(variant):
    # real widths, one block: shapes and the dynamic path of every variant stay cheap on CPU
    torch.manual_seed(0)
    model = build_backbone(variant, depth=1).eval()
    p = model.patch_size
    x = torch.randn(2, 3, 3 * p, 5 * p)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 15, model.embed_dim) and bool(tokens.isfinite().all())
        model.set_input_size((3 * p, 5 * p))  # the same grid stored for good gives the same features
        torch.testing.assert_close(model.forward_features(x), tokens, atol=1e-5, rtol=1e-5)
    assert model.grid_size == (3, 5) and model.num_patches == 15 and model.img_size == (3 * p, 5 * p)


def test_sizes_that_are_not_patch_multiples_are_one_line_errors():
    model = build_backbone("eva02_debug_p4", 16)
    with pytest.raises(ValueError, match=r"18x16 is not a multiple of the patch size 4; .* \(e.g. 16x16\)"):
        model(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model.set_input_size((16, 10))
    assert model.grid_size == (4, 4)  # unchanged after the refused call


def test_position_and_rope_tables_are_cached_per_grid():
    model = build_backbone("eva02_debug_p4", 16).eval()
    assert model.pos_embed_for((4, 4)) is model.pos_embed  # the set-up grid: the parameter itself
    assert model.rope_for((4, 4))[0] is model.rope_sin
    with torch.no_grad():
        first = model.pos_embed_for((6, 4))
        assert model.pos_embed_for((6, 4)) is first  # repeated size: no work
        rope = model.rope_for((6, 4))
        assert model.rope_for((6, 4))[0] is rope[0] and rope[0].shape == (24, model.cfg.head_dim)
        model(torch.randn(1, 3, 24, 16))
        assert model.pos_embed_for((6, 4)) is first and len(model._pos_cache) == 1
        torch.testing.assert_close(first, resize_pos_embed(model.pos_embed, (6, 4)))
        # new weights (load_state_dict copies in place) are noticed: the cached table is recomputed
        other = build_backbone("eva02_debug_p4", 16)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model.pos_embed_for((6, 4)), resize_pos_embed(other.pos_embed.detach(), (6, 4)))


def test_training_at_another_size_trains_the_table_and_caches_nothing():
    model = build_backbone("eva02_debug_p4", 16).train()
    model(torch.randn(2, 3, 24, 20)).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad[:, 1:].abs().sum() > 0
    assert len(model._pos_cache) == 0


def test_training_at_the_set_up_size_uses_the_stored_table_directly():
    model = build_model(ModelConfig(variant="eva02_debug_p4", img_size=16), teacher_dim=8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    model(torch.randn(2, 3, 16, 16), mask).sum().backward()
    assert len(model._pos_cache) == 0 and len(model._rope_cache) == 0  # nothing resampled per step
    assert model.pos_embed.grad is not None


def test_set_input_size_changes_the_state_dict_for_good(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("eva02_debug_p4", 16).eval()
    perturb_(model)
    x = torch.randn(1, 3, 24, 12)
    with torch.no_grad():
        dynamic = model.forward_features(x)
    expected_table = resize_pos_embed(model.pos_embed.detach(), (6, 3))
    model.set_input_size((24, 12))
    assert model.state_dict()["pos_embed"].shape == (1, 1 + 18, 32)
    torch.testing.assert_close(model.pos_embed.detach(), expected_table)
    assert model.rope_sin.shape == (18, model.cfg.head_dim) and model.patch_embed.img_size == (24, 12)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), dynamic, atol=1e-6, rtol=1e-6)
    # a saved file carries the new size: a model built at it loads it with nothing resized
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    rebuilt = build_backbone("eva02_debug_p4", (24, 12))
    rebuilt.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    torch.testing.assert_close(rebuilt.pos_embed, model.pos_embed)


def test_weights_saved_at_224_load_into_a_336_model(tmp_path):
    torch.manual_seed(0)
    small = build_backbone("eva02_b_p14", 224, depth=1).eval()  # real B/14 width, one block
    perturb_(small)
    path = str(tmp_path / "b224.safetensors")
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, path)
    large = build_backbone("eva02_b_p14", 336, depth=1).eval()
    large.load_state_dict(load_file(path), strict=True)  # auto-detected 16x16 -> 24x24
    assert large.pos_embed.shape == (1, 1 + 576, 768)
    torch.testing.assert_close(large.pos_embed.detach(), resize_pos_embed(small.pos_embed.detach(), 24))
    imported = build_backbone("eva02_b_p14", 336, depth=1).eval()
    report = load_weights(imported, path)  # the weight importer: same resize
    assert not report.missing and not report.mismatched and report.resized
    torch.testing.assert_close(imported.pos_embed, large.pos_embed)
    x = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        torch.testing.assert_close(large(x), small(x), atol=1e-5, rtol=1e-5)  # = the 224 model run at 336


def test_rope_buffers_in_a_file_are_ignored_and_non_square_tables_are_detected():
    torch.manual_seed(0)
    source = build_backbone("eva02_debug_p4", 16)
    source.set_input_size((32, 24))  # an 8x6 grid, saved like that
    state = dict(source.state_dict())
    state["rope.freqs_cos"] = torch.ones(48, 8)  # official EVA-02 files store RoPE tables
    state["blocks.0.attn.rope.freqs_sin"] = torch.ones(48, 8)
    same_aspect = build_backbone("eva02_debug_p4", (16, 12))  # 4x3: the 8x6 table is recognised
    same_aspect.load_state_dict(state, strict=True)
    torch.testing.assert_close(
        same_aspect.pos_embed.detach(), resize_pos_embed(source.pos_embed.detach(), (4, 3), old_grid=(8, 6))
    )
    with pytest.raises(ValueError, match="not a square grid; .*set_input_size"):
        build_backbone("eva02_debug_p4", 16).load_state_dict(state)


# timm parity: real widths of EVA-01 g/14 and EVA-02 B/L at depth 1 to keep CPU time small (every
# block runs the same code, so more depth adds time, not coverage); the timm models come from
# timm's own registered configs (q/v bias, sub-LN, SwiGLU, RoPE reference grid 16x16).
PARITY = [
    ("eva_g_p14", "eva_giant_patch14_224"),
    ("eva02_b_p14", "eva02_base_patch14_224"),
    ("eva02_l_p14", "eva02_large_patch14_224"),
]
SIZES = [(224, 224), (336, 336), (448, 336), (196, 308)]


def _assert_within_fp32_noise(ours, ref):
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-5 * max(scale, 1.0), f"max abs diff at scale {scale}"


@pytest.mark.parametrize("variant,timm_name", PARITY)
def test_any_size_and_set_input_size_match_timm(variant, timm_name):
    torch.manual_seed(0)
    ours = build_backbone(variant, 224, depth=1).eval()
    perturb_(ours)
    ref = timm.create_model(
        timm_name, pretrained=False, depth=1, num_classes=0, global_pool="token", dynamic_img_size=True
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for height, width in SIZES:  # built at 224, run at each size
            x = torch.randn(1, 3, height, width, generator=gen)
            _assert_within_fp32_noise(ours.forward_features(x), ref.forward_features(x))
    ours.set_input_size((196, 308))
    ref.set_input_size((196, 308))
    torch.testing.assert_close(ours.pos_embed, ref.pos_embed, atol=0, rtol=0)
    with torch.no_grad():
        _assert_within_fp32_noise(ours.forward_features(x), ref.forward_features(x))


def test_eva02_clip_tower_config_is_eva02_l_with_scale_attn_inner():
    # open_clip's EVA02-L-14 tower is timm's eva02_large_patch14_clip_224 (attn.norm before proj)
    torch.manual_seed(0)
    ours = build_backbone("eva02_l_p14", 224, depth=1, scale_attn_inner=True).eval()
    perturb_(ours)
    ref = timm.create_model(
        "eva02_large_patch14_clip_224",
        pretrained=False,
        depth=1,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert "blocks.0.attn.norm.weight" in ours.state_dict()
    x = torch.randn(1, 3, 196, 308, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_within_fp32_noise(ours.forward_features(x), ref.forward_features(x))


def test_eva02_clip_b16_tower_needs_its_own_rope_reference_grid():
    # timm's eva02_base_patch16_clip_224 (open_clip EVA02-B-16): patch 16 at 224 (a 14x14 grid) but
    # RoPE reference 16x16, i.e. rope_ref_img_size = 16 * 16
    torch.manual_seed(0)
    ours = build_backbone(
        "eva02_b_p14", 224, depth=1, patch_size=16, scale_attn_inner=True, rope_ref_img_size=256
    ).eval()
    perturb_(ours)
    assert ours.cfg.rope_ref_grid == 16 and ours.grid_size == (14, 14)
    ref = timm.create_model(
        "eva02_base_patch16_clip_224",
        pretrained=False,
        depth=1,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 288, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_within_fp32_noise(ours.forward_features(x), ref.forward_features(x))
