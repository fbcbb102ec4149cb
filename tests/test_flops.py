"""Analytic FLOPs: a hand count for one config, the seed table's numbers, the training formula."""

import pytest

from eva_train.config import ModelConfig, TeacherConfig
from eva_train.models.flops import forward_flops, student_forward_flops, train_flops_per_image
from eva_train.models.teacher import build_teacher
from eva_train.plan.gpus import mfu


def test_debug_variant_matches_a_hand_count():
    # eva_debug_p4 at 16 px: 16 patches + cls = 17 tokens, D=32, MLP 128, depth 2, patch 4x4x3
    patch = 16 * (4 * 4 * 3) * 32  # 24,576 MACs
    per_block = (
        17 * 32 * 96  # qkv        52,224
        + 17 * 17 * 32 * 2  # qk^T, av   18,496
        + 17 * 32 * 32  # proj       17,408
        + 17 * 32 * 128 * 2
    )  # fc1, fc2  139,264
    head = 5 * 32 * 24  # lm_head on 5 masked patches -> 24-d
    assert forward_flops("eva_debug_p4", 16) == 2 * (patch + 2 * per_block)
    assert forward_flops("eva_debug_p4", 16, num_masked_patches=5, teacher_dim=24) == 2 * (patch + 2 * per_block + head)


@pytest.mark.parametrize(
    "variant,img_size,seed_gmacs",
    [
        ("eva_g_p14", 224, 267.17),
        ("eva_g_p16", 224, 203.52),
        ("eva_l_p14", 224, 81.08),
        ("eva_g_p14", 336, 620.64),
    ],
)
def test_backbone_flops_match_the_seed_table(variant, img_size, seed_gmacs):
    # mmpretrain's "Flops (G)" counts multiply-adds and also norms etc. (we skip them): within 0.1%
    assert forward_flops(variant, img_size) / 2e9 == pytest.approx(seed_gmacs, rel=1e-3)


def test_swiglu_counts_three_matmuls():
    base = forward_flops("eva02_debug_p4", 16)
    gelu_like = 2 * (16 * 48 * 32 + 2 * (17 * 32 * 96 + 17 * 17 * 32 * 2 + 17 * 32 * 32 + 17 * 32 * 85 * 2))
    assert base - gelu_like == 2 * 2 * 17 * 32 * 85  # one more (D x H) matmul per block


def test_training_flops_add_backward_recompute_and_teacher():
    cfg = ModelConfig(variant="eva_debug_p4", img_size=16, checkpoint_fraction=0.0)
    student = student_forward_flops(cfg, teacher_dim=24, num_masked_patches=5)
    assert train_flops_per_image(cfg, 1000.0, 24, 5) == 3 * student + 1000.0
    full = ModelConfig(variant="eva_debug_p4", img_size=16, checkpoint_fraction=1.0)
    backbone_blocks = forward_flops("eva_debug_p4", 16) - 2 * 16 * 48 * 32
    assert train_flops_per_image(full, 1000.0, 24, 5) == 3 * student + backbone_blocks + 1000.0


def test_mae_student_runs_the_encoder_on_visible_tokens_only():
    mae = ModelConfig(variant="eva_debug_p4", img_size=16, mode="mae", decoder_depth=1, decoder_width=16)
    fewer = student_forward_flops(mae, 24, num_masked_patches=12)
    more = student_forward_flops(mae, 24, num_masked_patches=4)
    assert fewer < more
    assert student_forward_flops(ModelConfig(variant="eva_debug_p4", img_size=16), 24, 4) > 0


def test_teacher_flops_follow_its_tower():
    teacher = build_teacher(TeacherConfig(name="tiny", random_init=True), student_grid=8, device="cpu")
    # tiny tower: 64 patches of 8x8x3 + cls, width 64, MLP 256, 2 layers, proj 64 -> 32 on 64 patches
    tokens = 65
    per_block = tokens * (4 * 64 * 64 + 2 * 64 * 256) + 2 * tokens * tokens * 64
    expected = 2 * (64 * 192 * 64 + 2 * per_block + 64 * 64 * 32)
    assert teacher.forward_flops_per_image() == expected


def test_mfu_is_model_flops_over_peak():
    assert mfu(1e12, 100.0, num_gpus=2, peak_flops_per_gpu=1e15) == pytest.approx(0.05)
