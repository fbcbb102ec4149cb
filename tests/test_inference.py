"""Feature API: a consolidated file -> eval model -> patch and pooled features, from tensors or files."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from eva_train.data.transforms import EvalTransform
from eva_train.export.inference import IMAGENET_MEAN, IMAGENET_STD, extract_feat, get_model, list_image_files
from eva_train.export.layouts import to_layout
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
    with pytest.raises(ValueError, match="model takes 16x16"):
        extract_feat(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        extract_feat(model, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="does not fit eva_debug_p4"):
        get_model(str(tmp_path / "m.safetensors"), variant="eva_debug_p4")
