"""The frozen CLIP teacher: loading local weights strictly, targets = final patch tokens @ proj."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from eva_train.config import TeacherConfig
from eva_train.models.teacher import TeacherLoadError, build_teacher


def _images(batch=2, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)


@pytest.fixture(scope="module")
def random_tiny():
    return build_teacher(TeacherConfig(name="tiny", random_init=True), student_grid=8, device="cpu")


def _normalized(teacher, images):
    return teacher._preprocess(images)


def test_targets_are_final_patch_tokens_after_ln_post_times_proj(random_tiny):
    images = _images()
    out = random_tiny(images)
    assert out.shape == (2, 64, random_tiny.out_dim) and out.dtype == torch.float32
    visual = random_tiny.visual
    visual.output_tokens = True  # open_clip's own path: (pooled, tokens after ln_post, unprojected)
    try:
        pooled, tokens = visual(_normalized(random_tiny, images))
    finally:
        visual.output_tokens = False
    assert tokens.shape == (2, 64, 64)
    torch.testing.assert_close(out, tokens @ visual.proj)
    assert not any(p.requires_grad for p in random_tiny.parameters())


def test_random_teacher_is_seeded_and_said_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        a = build_teacher(TeacherConfig(name="tiny", random_init=True), student_grid=8, device="cpu")
    b = build_teacher(TeacherConfig(name="tiny", random_init=True), student_grid=8, device="cpu")
    assert "RANDOM INIT" in caplog.text
    torch.testing.assert_close(a(_images()), b(_images()))


def test_teacher_stays_frozen_in_eval_mode(random_tiny):
    random_tiny.train()
    assert not random_tiny.training and not random_tiny.visual.training
    images = _images()
    torch.testing.assert_close(random_tiny(images), random_tiny(images))


@pytest.mark.parametrize("layout", ["full_clip_prefixed", "visual_only", "wrapped", "safetensors"])
def test_saved_tower_loads_back_exactly(tmp_path, random_tiny, layout):
    visual = {k: v.clone() for k, v in random_tiny.visual.state_dict().items()}
    prefixed = {"visual." + k: v for k, v in visual.items()}
    prefixed["text_projection"] = torch.zeros(4, 4)  # text tower keys are ignored
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    if layout == "full_clip_prefixed":
        torch.save(prefixed, path)
    elif layout == "visual_only":
        torch.save(visual, path)
    elif layout == "wrapped":  # an open_clip training checkpoint
        torch.save(
            {
                "epoch": 3,
                "name": "run",
                "state_dict": {"module." + k: v for k, v in prefixed.items()},
                "optimizer": {"state": {}},
            },
            path,
        )
    else:
        save_file(prefixed, str(path))
    loaded = build_teacher(TeacherConfig(name="tiny", checkpoint=str(path)), student_grid=8, device="cpu")
    torch.testing.assert_close(loaded(_images()), random_tiny(_images()))


def test_smaller_student_grid_resizes_the_crop_and_position_table(tmp_path, random_tiny):
    # a p16 student at 224 has 14x14 patches: the p14 teacher then sees 196 px; here p8 at grid 6 -> 48 px
    path = tmp_path / "w.pt"
    torch.save(random_tiny.visual.state_dict(), path)
    teacher = build_teacher(TeacherConfig(name="tiny", checkpoint=str(path)), student_grid=6, device="cpu")
    assert teacher.input_px == 48
    assert teacher(_images(size=64)).shape == (2, 36, teacher.out_dim)


def test_missing_or_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherLoadError, match="does not exist"):
        build_teacher(TeacherConfig(name="tiny", checkpoint=str(tmp_path / "nope.pt")), 8, "cpu")
    with pytest.raises(TeacherLoadError, match="checkpoint is empty"):
        build_teacher(TeacherConfig(name="tiny"), 8, "cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherLoadError, match="cannot read teacher.checkpoint .*garbage.pt"):
        build_teacher(TeacherConfig(name="tiny", checkpoint=str(garbage)), 8, "cpu")


def test_mismatched_keys_and_shapes_name_the_file_and_keys(tmp_path, random_tiny):
    state = dict(random_tiny.visual.state_dict())
    del state["ln_post.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["proj"] = torch.zeros(64, 16)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(TeacherLoadError) as err:
        build_teacher(TeacherConfig(name="tiny", checkpoint=str(path)), 8, "cpu")
    message = str(err.value)
    for fragment in ("bad.pt", "1 missing: ln_post.weight", "1 unexpected: extra.weight", "proj (64, 16) vs (64, 32)"):
        assert fragment in message


def test_unknown_or_hub_teacher_names_are_refused():
    with pytest.raises(ValueError, match="not an open_clip model config"):
        build_teacher(TeacherConfig(name="ViT-Q-99", random_init=True), 8, "cpu")
    with pytest.raises(ValueError, match="not an open_clip model config"):  # checked before any file is read
        build_teacher(TeacherConfig(name="ViT-Q-99", checkpoint="/nonexistent/w.pt"), 8, "cpu")
    with pytest.raises(ValueError, match="Hugging Face hub"):
        build_teacher(TeacherConfig(name="hf-hub:org/model", random_init=True), 8, "cpu")


def test_openai_weights_switch_the_tower_to_quickgelu(tmp_path, random_tiny, caplog):
    state = dict(random_tiny.visual.state_dict())
    full = {"visual." + k: v for k, v in state.items()}
    full["input_resolution"] = torch.tensor(64)  # OpenAI's state dicts carry these metadata entries
    path = tmp_path / "openai.pt"
    torch.save(full, path)
    with caplog.at_level(logging.INFO):
        teacher = build_teacher(TeacherConfig(name="tiny", checkpoint=str(path)), 8, "cpu")
    assert "QuickGELU" in caplog.text
    assert not torch.allclose(teacher(_images()), random_tiny(_images()))  # GELU vs QuickGELU differ


def test_eva_clip_style_timm_tower_returns_projected_patch_tokens(tmp_path):
    # EVA-CLIP configs wrap a timm trunk; a local open_clip config with a small EVA-02 trunk stands in
    config = {
        "embed_dim": 48,
        "vision_cfg": {
            "image_size": 224,
            "timm_model_name": "eva02_tiny_patch14_224",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    name = f"local-dir:{tmp_path}"
    random = build_teacher(TeacherConfig(name=name, random_init=True), student_grid=16, device="cpu")
    torch.save(random.visual.state_dict(), tmp_path / "w.pt")
    teacher = build_teacher(TeacherConfig(name=name, checkpoint=str(tmp_path / "w.pt")), student_grid=4, device="cpu")
    assert teacher.input_px == 56 and teacher.out_dim == 48
    images = _images(size=32)
    out = teacher(images)
    assert out.shape == (2, 16, 48)
    trunk = teacher.visual.trunk
    with torch.no_grad():
        features = trunk.forward_features(_normalized(teacher, images))  # (B, 1+N, D) after trunk.norm
        torch.testing.assert_close(out, trunk.head(features[:, 1:]))
        torch.testing.assert_close(teacher.visual(_normalized(teacher, images)), trunk.head(features[:, 0]))


def test_teacher_rejects_float_images(random_tiny):
    with pytest.raises(ValueError, match="uint8"):
        random_tiny(torch.zeros(1, 3, 64, 64))


def test_gray_standardized_removes_colour_and_keeps_structure():
    from eva_train.models.teacher import gray_standardized

    gen = torch.Generator().manual_seed(0)
    pattern = (torch.rand(2, 1, 16, 16, generator=gen) > 0.5).float()
    red_green = (pattern * torch.tensor([200.0, 20.0, 0.0]).view(1, 3, 1, 1) + 30).to(torch.uint8)
    blue = (pattern * torch.tensor([0.0, 10.0, 90.0]).view(1, 3, 1, 1) + 100).to(torch.uint8)
    a, b = gray_standardized(red_green), gray_standardized(blue)
    assert a.dtype == torch.uint8 and torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 1], a[:, 2])
    assert (a.int() - b.int()).abs().max() <= 1  # same pattern in other colours: same teacher input
    assert a[pattern.expand_as(a) > 0].float().mean() > a[pattern.expand_as(a) == 0].float().mean() + 50


def test_input_transform_is_refused_for_a_real_teacher(tmp_path):
    from eva_train.config import ConfigError, TeacherConfig, _validate_teacher

    weights = tmp_path / "tower.safetensors"
    weights.write_bytes(b"x")  # existence is all the config check looks at
    with pytest.raises(ConfigError, match="demo's random teacher only"):
        _validate_teacher(TeacherConfig(name="tiny", checkpoint=str(weights), input_transform="gray_standardized"))
    with pytest.raises(ConfigError, match="unknown"):
        _validate_teacher(TeacherConfig(name="tiny", random_init=True, input_transform="sepia"))
