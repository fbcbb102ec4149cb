"""Feature API: a consolidated file -> eval model -> patch and pooled features, from tensors or files."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from eva_train.data.transforms import EvalTransform
from eva_train.eval.checkpoints import save_classifier
from eva_train.eval.heads import Classifier, LinearHead
from eva_train.eval.predict import predict
from eva_train.export.inference import IMAGENET_MEAN, IMAGENET_STD, extract_feat, get_model, list_image_files
from eva_train.export.layouts import to_layout
from eva_train.models import build_backbone
from eva_train.models.eva import EvaForMIM
from eva_train.models.variants import VARIANTS


@pytest.fixture()
def mim_model():
    torch.manual_seed(0)
    return EvaForMIM(VARIANTS["eva02_debug_p4"], None, teacher_dim=8).eval()


def _save(model, path, layout="native", with_config=True):
    metadata = {"config": json.dumps({"model": {"variant": "eva02_debug_p4", "img_size": 16}})} if with_config else None
    tensors = {k: v.contiguous() for k, v in to_layout(model.state_dict(), layout).items()}
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def _normalize(uint8_images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (uint8_images.float() / 255 - mean) / std


def test_get_model_and_extract_feat_from_tensor(mim_model, tmp_path):
    model = get_model(_save(mim_model, tmp_path / "m.safetensors"))
    assert not model.training and not hasattr(model, "lm_head")
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    feats = extract_feat(model, images, batch_size=2)
    assert feats["patch"].shape == (3, 16, 32) and feats["pooled"].shape == (3, 32)
    with torch.no_grad():
        tokens = mim_model.forward_features(_normalize(images))
        torch.testing.assert_close(feats["pooled"], mim_model(_normalize(images)))
    torch.testing.assert_close(feats["patch"], tokens[:, 1:])


def test_extract_feat_from_image_files_and_pil(mim_model, tmp_path):
    model = get_model(_save(mim_model, tmp_path / "m.safetensors"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    torch.manual_seed(1)
    for i, size in enumerate([(40, 24), (16, 16)]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    files = list_image_files(str(folder))
    assert [f.rsplit("/", 1)[1] for f in files] == ["0.png", "1.png"]
    from_files = extract_feat(model, files)
    assert from_files["patch"].shape == (2, 16, 32)
    from_pil = extract_feat(model, [Image.open(f) for f in files])
    torch.testing.assert_close(from_files["pooled"], from_pil["pooled"])
    # files go through the one evaluation preprocessing (EvalTransform): same as passing its output
    pixels = torch.from_numpy(__import__("numpy").array(Image.open(files[1]))).permute(2, 0, 1)
    exact = EvalTransform(16)(pixels)[None]
    torch.testing.assert_close(from_files["pooled"][1:], extract_feat(model, exact)["pooled"])


def test_get_model_from_other_layouts_needs_variant_without_metadata(mim_model, tmp_path):
    path = _save(mim_model, tmp_path / "timm.safetensors", layout="timm", with_config=False)
    with pytest.raises(ValueError, match="pass variant="):
        get_model(path)
    model = get_model(path, variant="eva02_debug_p4")
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(extract_feat(model, images)["pooled"], mim_model(_normalize(images)))
    mm = get_model(_save(mim_model, tmp_path / "mm.safetensors", layout="mmpretrain"))
    torch.testing.assert_close(extract_feat(mm, images)["pooled"], extract_feat(model, images)["pooled"])


def test_bad_inputs_are_clear_errors(mim_model, tmp_path):
    model = get_model(_save(mim_model, tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="18x16 is not a multiple of the patch size 4"):
        extract_feat(model, torch.zeros(1, 3, 18, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        extract_feat(model, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        extract_feat(model, [torch.zeros(3, 8, 8, dtype=torch.uint8)], img_size=18)
    with pytest.raises(ValueError, match="one int, the shorter side"):
        extract_feat(model, [torch.zeros(3, 8, 8, dtype=torch.uint8)], img_size=(16, 8), keep_aspect=True)
    with pytest.raises(ValueError, match="does not fit eva_debug_p4"):
        get_model(str(tmp_path / "m.safetensors"), variant="eva_debug_p4")


def test_tensors_of_any_size_run_as_they_are(mim_model, tmp_path):
    model = get_model(_save(mim_model, tmp_path / "m.safetensors"))  # saved at 16x16
    images = torch.randint(0, 256, (2, 3, 24, 12), dtype=torch.uint8)
    feats = extract_feat(model, images)
    assert feats["patch"].shape == (2, 18, 32) and feats["grid"].tolist() == [[6, 3], [6, 3]]
    with torch.no_grad():
        tokens = mim_model.forward_features(_normalize(images))
    torch.testing.assert_close(feats["pooled"], tokens[:, 0])
    torch.testing.assert_close(feats["patch"], tokens[:, 1:])
    at_size = get_model(str(tmp_path / "m.safetensors"), img_size=(24, 12))  # table resampled on load
    assert at_size.img_size == (24, 12) and at_size.pos_embed.shape == (1, 1 + 18, 32)
    torch.testing.assert_close(extract_feat(at_size, images)["pooled"], feats["pooled"])


def _png(path, height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=gen)
    Image.fromarray(pixels.numpy()).save(path)
    return str(path), pixels.permute(2, 0, 1)


def test_keep_aspect_runs_each_image_at_its_own_aspect(mim_model, tmp_path):
    model = get_model(_save(mim_model, tmp_path / "m.safetensors"))
    wide, wide_px = _png(tmp_path / "wide.png", 16, 26, seed=0)  # shorter side already 16: 26 -> 24 (crop 1 | 1)
    tall, tall_px = _png(tmp_path / "tall.png", 20, 16, seed=1)  # 20 -> 20: nothing to do
    big, _ = _png(tmp_path / "big.png", 32, 52, seed=2)  # -> 16 x 26 -> 16 x 24
    feats = extract_feat(model, [wide, tall, big, wide], keep_aspect=True, batch_size=1)
    assert feats["grid"].tolist() == [[4, 6], [5, 4], [4, 6], [4, 6]]
    assert [p.shape for p in feats["patch"]] == [(24, 32), (20, 32), (24, 32), (24, 32)]
    by_tensor = [extract_feat(model, wide_px[None, :, :, 1:25]), extract_feat(model, tall_px[None])]
    torch.testing.assert_close(feats["pooled"][:2], torch.cat([f["pooled"] for f in by_tensor]))
    torch.testing.assert_close(feats["patch"][1], by_tensor[1]["patch"][0])
    torch.testing.assert_close(feats["pooled"][3], feats["pooled"][0])  # order kept across size groups
    larger = extract_feat(model, [wide], img_size=32, keep_aspect=True)  # shorter side 32: 16x26 -> 32x52 -> 32x52
    assert larger["grid"].tolist() == [[8, 13]]


def test_predict_tool_writes_any_size_features(mim_model, tmp_path, capsys):
    predict_tool = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "predict.py"))
    checkpoint = _save(mim_model, tmp_path / "m.safetensors")
    wide, _ = _png(tmp_path / "wide.png", 16, 26, seed=0)
    tall, _ = _png(tmp_path / "tall.png", 20, 16, seed=1)
    out = str(tmp_path / "feats.safetensors")
    assert predict_tool["main"]([wide, tall, "--checkpoint", checkpoint, "--features", out, "--keep_aspect"]) == 0
    saved = load_file(out)
    assert saved["grid"].tolist() == [[4, 6], [5, 4]] and saved["patch"].shape == (24 + 20, 32)
    expected = extract_feat(get_model(checkpoint), [wide, tall], keep_aspect=True)
    torch.testing.assert_close(saved["patch"][24:], expected["patch"][1])
    assert predict_tool["main"]([wide, "--checkpoint", checkpoint, "--features", out, "--img_size", "24x12"]) == 0
    assert load_file(out)["grid"].tolist() == [[6, 3]]
    capsys.readouterr()
    assert predict_tool["main"]([wide, "--checkpoint", checkpoint, "--features", out, "--img_size", "18"]) == 2
    assert capsys.readouterr().err == (
        "error: --img_size 18: give N or HxW in multiples of eva02_debug_p4's patch size 4\n"
    )
    assert (
        predict_tool["main"](
            [wide, "--checkpoint", checkpoint, "--features", out, "--img_size", "16x8", "--keep_aspect"]
        )
        == 2
    )
    assert "one N (the shorter side)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict_tool["main"]([wide, "--checkpoint", checkpoint, "--img_size", "big"])
    assert exit_info.value.code == 2 and "is not N or HxW" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_tool["main"](["--help"])
    assert "--keep_aspect" in capsys.readouterr().out


def test_predict_classifies_at_any_size_and_aspect(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("eva02_debug_p4", 16)
    classifier = Classifier(backbone, LinearHead(32, 3, batch_norm=False, init_std=1.0)).eval()
    path = str(tmp_path / "classifier.safetensors")
    save_classifier(path, classifier, {"variant": "eva02_debug_p4", "img_size": 16}, ["a", "b", "c"], "finetune")
    wide, wide_px = _png(tmp_path / "wide.png", 16, 26, seed=0)  # keep_aspect: cropped to 16 x 24, not resized
    top = predict([wide, wide], path, top_k=3, keep_aspect=True)
    with torch.no_grad():
        probs = classifier(_normalize(wide_px[None, :, :, 1:25])).softmax(dim=-1)[0]
    for answer in top:  # the same image twice, one batch
        assert [name for name, _ in answer] == ["abc"[i] for i in probs.argsort(descending=True)]
        torch.testing.assert_close(torch.tensor([score for _, score in answer]), probs.sort(descending=True).values)
    assert len(predict([wide], path, top_k=1, img_size=(24, 12))[0]) == 1


def test_get_model_without_a_size_builds_at_the_files_own_size(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("eva02_debug_p4", 24)  # a 6x6 table, no eva-train metadata
    path = str(tmp_path / "timm24.safetensors")
    save_file({k: v.contiguous() for k, v in to_layout(source.state_dict(), "timm").items()}, path)
    model = get_model(path, variant="eva02_debug_p4")
    assert model.img_size == (24, 24)
    torch.testing.assert_close(model.pos_embed, source.pos_embed, rtol=0, atol=0)  # nothing resampled
    assert get_model(path, variant="eva02_debug_p4", img_size=16).pos_embed.shape == (1, 1 + 16, 32)
