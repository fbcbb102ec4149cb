"""One evaluation preprocessing: the same JPEG gives the same input tensor in pretraining validation,
the kNN monitor, the linear probe, fine-tune evaluation, `predict` and `extract_feat`."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from eva_train.config import DataConfig, EvalConfig, MaskConfig
from eva_train.data.build import build_index
from eva_train.data.loader import build_loader
from eva_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, normalize_images
from eva_train.eval.finetune import FinetuneTask
from eva_train.eval.knn_monitor import KnnMonitor
from eva_train.eval.linear_probe import LinearProbeTask
from eva_train.eval.predict import images_to_uint8
from eva_train.eval.protocol_config import build_protocol_config
from eva_train.export.inference import extract_feat

SIZE = 16


def photo(seed: int, width: int = 45, height: int = 31) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 90 * np.sin(x / (4.0 + c) + seed) * np.cos(y / 5.0 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """Two classes of 3 non-square JPEGs each, stored sideways with EXIF orientation 6, and their index."""
    root = tmp_path_factory.mktemp("labeled") / "val"
    exif = Image.Exif()
    exif[0x0112] = 6
    for label in range(2):
        (root / f"class_{label}").mkdir(parents=True)
        for i in range(3):
            buf = io.BytesIO()
            photo(10 * label + i).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
            (root / f"class_{label}" / f"{i}.jpg").write_bytes(buf.getvalue())
    index = build_index([str(root)], str(root.parent / "val.arrow"), num_workers=1)
    return root, index, sorted(str(p) for p in root.rglob("*.jpg"))


def pretraining_val(index):
    loader, _ = build_loader(
        DataConfig(num_workers=0),
        MaskConfig(),
        index_paths=[index],
        img_size=SIZE,
        patch_size=4,
        micro_batch_size=6,
        rank=0,
        world_size=1,
        seed=0,
        train=False,
    )
    return next(iter(loader))["images"]


def protocol_cfg(root, protocol):
    recipe = "linear_demo" if protocol == "linear" else "finetune_demo"
    return build_protocol_config(
        recipe,
        [
            "--model.random_init=true",
            "--model.variant=eva_debug_p4",
            f"--model.img_size={SIZE}",
            f"--data.train={root}",
            f"--data.val={root}",
            "--data.num_workers=0",
            "--data.cache_features=false",
            "--train.micro_batch_size=6",
            "--train.precision=fp32",
        ],
    )


def test_every_tool_sees_the_same_pixels(labeled):
    root, index, files = labeled
    reference = pretraining_val(index)  # (6, 3, 16, 16) uint8
    assert reference.shape == (6, 3, SIZE, SIZE) and reference.dtype == torch.uint8
    # the upright image is 31 x 45 (EXIF 6 turns the stored 45 x 31): EvalTransform on torchvision's own
    # decode of the rotated file, written out as torchvision calls, is an independent check of the order
    upright = torch.from_numpy(np.array(Image.open(files[0]).rotate(-90, expand=True))).permute(2, 0, 1)
    by_hand = (
        torch.nn.functional.interpolate(
            upright[None].float(), size=(int(45 * 18 / 31), 18), mode="bicubic", antialias=True, align_corners=False
        )
        .round()
        .clamp(0, 255)
    )
    top, left = (by_hand.shape[2] - SIZE + 1) // 2, (by_hand.shape[3] - SIZE + 1) // 2
    assert (by_hand[0, :, top : top + SIZE, left : left + SIZE] - reference[0].float()).abs().max() <= 3  # JPEG IDCT
    for name, images in [
        ("kNN monitor, folder", knn_val(root)),
        ("kNN monitor, index", knn_val(index)),
        ("predict", images_to_uint8(files, SIZE)),
        ("fine-tune eval", finetune_val(root)),
    ]:
        assert torch.equal(images, reference), name


def knn_val(source):
    monitor = KnnMonitor(EvalConfig(knn_train_index=[str(source)], knn_val_index=[str(source)]), SIZE, 4, 0, 1)
    val = monitor.datasets()[1]
    return torch.stack([val[i]["images"] for i in range(len(val))])


def finetune_val(root):
    task = FinetuneTask(protocol_cfg(root, "finetune"), 0, 1, torch.device("cpu"), torch.float32)
    return next(iter(task._val_loader))["images"]


def test_features_of_probe_and_extract_feat_match_the_data_path(labeled):
    root, index, files = labeled
    torch.manual_seed(0)
    probe = LinearProbeTask(protocol_cfg(root, "linear"), 0, 1, torch.device("cpu"), torch.float32)
    backbone = probe.backbone
    # normalization written out from the ImageNet statistics, not through normalize_images
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = pretraining_val(index)
    torch.testing.assert_close(normalize_images(pixels), (pixels / 255.0 - mean) / std, rtol=0, atol=1e-5)
    with torch.no_grad():
        expected = backbone(normalize_images(pixels))  # (6, D) pooled
        tokens = backbone.forward_features(normalize_images(pixels))
    assert torch.equal(probe.val_feats, expected)
    feats = extract_feat(backbone, files)
    assert torch.equal(feats["pooled"], tokens[:, 0])
    assert EvalTransform(SIZE).crop_pct == 0.875


def test_unreadable_inputs_are_one_value_error(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image '.*notes.jpg': not an image"):
        images_to_uint8([str(tmp_path / "notes.jpg")], SIZE)
    buf = io.BytesIO()
    photo(0).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])
    with pytest.raises(ValueError, match="cannot read PIL image"):
        images_to_uint8([Image.open(tmp_path / "cut.png")], SIZE)
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\)"):
        images_to_uint8([torch.zeros(3, 8, 8)], SIZE)
