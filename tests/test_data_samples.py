"""Samples: decoding (modes, EXIF, draft), crops, masks, bad-sample replacement and the abort,
determinism across worker counts and on resume."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eva_train.config import DataConfig, MaskConfig
from eva_train.data import BadSampleMonitor, DataError
from eva_train.data.build import build_index
from eva_train.data.dataset import MaskedImageDataset, SampleSpec
from eva_train.data.decode import (
    DEFAULT_JPEG_DECODER,
    BadImageError,
    dct_factor,
    decode_crop,
    exif_orientation,
    open_image,
    read_header,
    simplejpeg,
)
from eva_train.data.index import open_index
from eva_train.data.loader import build_loader
from eva_train.data.masking import BlockMaskGenerator, RandomMaskGenerator, build_mask_generator
from eva_train.data.transforms import random_resized_crop_box

MAX_PIXELS = 10_000


def encode(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hwc(chw: torch.Tensor) -> np.ndarray:
    assert chw.dtype == torch.uint8 and chw.shape[0] == 3
    return chw.permute(1, 2, 0).numpy()


DECODERS = ["pillow"] + (["simplejpeg"] if simplejpeg is not None else [])


def decode_whole(data: bytes, out=16, flip=False, decoder=DEFAULT_JPEG_DECODER) -> np.ndarray:
    image = read_header(data, MAX_PIXELS * 100, decoder)
    size = image.upright_size
    box = (0, 0) + size
    return hwc(decode_crop(image, box, out, flip))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(
    "mode,fmt,color,expected",
    [
        ("L", "JPEG", 128, (128, 128, 128)),
        ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0)),
        ("P", "PNG", None, (10, 200, 30)),
        ("RGBA", "PNG", (0, 0, 255, 0), (255, 255, 255)),  # fully transparent -> white background
        ("LA", "PNG", (50, 255), (50, 50, 50)),
    ],
)
def test_modes_become_rgb(mode, fmt, color, expected, decoder):
    if mode == "P":
        img = Image.new("RGB", (24, 24), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = Image.new(mode, (24, 24), color)
    out = decode_whole(encode(img, fmt), decoder=decoder)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.array(expected)).max() <= 6


RAMP_16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (256, 1))  # 0 -> 65535 along x


@pytest.mark.parametrize(
    "mode,fmt,array,expected",
    [
        # independent expectations: 16-bit integers scale by 255 / 65535, floats in [0, 1] by 255, rounded
        ("I;16", "PNG", RAMP_16, np.round(RAMP_16.astype(float) * 255 / 65535)),
        ("I;16B", "TIFF", RAMP_16.astype(">u2"), np.round(RAMP_16.astype(float) * 255 / 65535)),
        ("I", "TIFF", RAMP_16.astype(np.int32), np.round(RAMP_16.astype(float) * 255 / 65535)),
        ("F", "TIFF", (RAMP_16 / 65535).astype(np.float32), np.round(RAMP_16 / 65535 * 255)),
    ],
)
def test_high_bit_depth_gray_is_scaled_not_clipped(mode, fmt, array, expected):
    """A 16-bit (or float) ramp written by Pillow decodes to an 8-bit ramp through the dataset's
    decode path, not to ~98% white as Pillow's convert("RGB") would give."""
    data = encode(Image.fromarray(array), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really holds that mode
    out = decode_whole(data, out=256).astype(int)
    assert out.shape == (256, 256, 3) and (out == out[..., :1]).all()  # gray
    assert np.abs(out[..., 0] - expected).max() <= 1
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and (np.diff(out[0, :, 0]) >= 0).all()


@pytest.mark.parametrize("alpha", [False, True])
def test_sixteen_bit_rgb_png(tmp_path, alpha):
    """16-bit RGB(A) PNGs written by pypng (Pillow cannot write them): Pillow reads them as 8-bit RGB(A)
    keeping the high byte, so the expectation is v >> 8."""
    png = pytest.importorskip("png", reason="pypng writes the 16-bit RGB PNG: pip install -e .[dev]")
    channels = [RAMP_16, RAMP_16[:, ::-1], np.full_like(RAMP_16, 0x8080)] + ([np.full_like(RAMP_16, 65535)] * alpha)
    pixels = np.stack(channels, -1)
    path = tmp_path / "deep.png"
    with open(path, "wb") as f:
        png.Writer(256, 256, greyscale=False, alpha=alpha, bitdepth=16).write(f, pixels.reshape(256, -1).tolist())
    out = decode_whole(path.read_bytes(), out=256).astype(int)
    assert np.abs(out - (pixels[..., :3] >> 8)).max() <= 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_palette_transparency_becomes_white(decoder):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([200, 20, 20, 0, 0, 255])
    img.paste(1, (8, 0, 16, 16))  # right half: palette entry 1 (blue), marked transparent
    data = encode(img, "PNG", transparency=1)
    out = decode_whole(data, decoder=decoder).astype(int)
    assert np.abs(out[:, :6] - (200, 20, 20)).max() <= 2 and np.abs(out[:, 10:] - 255).max() <= 2


def test_exif_orientation_is_applied():
    raw = Image.new("RGB", (40, 20), (255, 0, 0))
    raw.paste((0, 0, 255), (20, 0, 40, 20))  # raw: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red ends on top
    data = encode(raw, exif=exif.tobytes())
    for decoder in DECODERS:
        out = hwc(decode_crop(read_header(data, MAX_PIXELS, decoder), (1, 11, 19, 29), 16, False))
        assert out[0, 8, 0] > 200 and out[0, 8, 2] < 60  # top red
        assert out[-1, 8, 2] > 200 and out[-1, 8, 0] < 60  # bottom blue


def photo_like(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 9.0 + c) * np.cos(y / 13.0 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.skipif(simplejpeg is None, reason="simplejpeg is not installed")
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
def test_simplejpeg_equals_pillow_for_every_orientation(orientation, subsampling):
    """Same pixels from both decoders: every EXIF orientation, a crop off the centre, a crop large
    enough for decode-time downscaling (1/2), and a flip."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo_like(120, 72), quality=92, subsampling=subsampling, exif=exif.tobytes())
    headers = [read_header(data, MAX_PIXELS, decoder) for decoder in ("pillow", "simplejpeg")]
    assert headers[0].pillow is not None and headers[1].pillow is None  # the fast header path was taken
    assert headers[0].orientation == headers[1].orientation == exif_orientation(open_image(data, MAX_PIXELS))
    width, height = headers[1].upright_size
    assert (width, height) == ((72, 120) if orientation >= 5 else (120, 72))
    for box, out, flip in [((5, 9, 37, 50), 24, False), ((3, 1, width - 2, height - 4), 16, True)]:
        assert dct_factor(headers[0], box, out) == (1 if out == 24 else 4)
        outs = [
            hwc(decode_crop(read_header(data, MAX_PIXELS, decoder), box, out, flip))
            for decoder in ("pillow", "simplejpeg")
        ]
        assert np.abs(outs[0].astype(int) - outs[1].astype(int)).max() <= 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_flip_and_draft_keep_the_picture(decoder):
    x = np.linspace(0, 255, 800)
    pixels = np.stack([np.tile(x, (600, 1)), np.tile(x[::-1], (600, 1)), np.full((600, 800), 90)], -1)
    data = encode(Image.fromarray(pixels.astype(np.uint8)), quality=95)
    box = (100, 50, 700, 550)
    assert dct_factor(read_header(data, 10**7), box, 64) == 4  # 500 px crop -> 64: decoded at 1/4
    drafted = hwc(decode_crop(read_header(data, 10**7, decoder), box, 64, False))
    exact = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BICUBIC, box=box))
    assert np.abs(drafted.astype(int) - exact.astype(int)).mean() < 3
    flipped = hwc(decode_crop(read_header(data, 10**7, decoder), box, 64, True))
    assert np.array_equal(flipped, drafted[:, ::-1])


def test_random_resized_crop_boxes_are_valid():
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (50, 400), (1000, 20), (7, 7)]:
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(width, height, (0.2, 1.0), rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_block_mask_exact_count_and_blocky():
    gen = BlockMaskGenerator((16, 16), 105)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng) for _ in range(50)])
    assert masks.dtype == bool and masks.shape == (50, 256) and (masks.sum(1) == 105).all()
    grid = masks.reshape(50, 16, 16)
    neighbours = np.zeros_like(grid)
    neighbours[:, 1:] |= grid[:, :-1]
    neighbours[:, :-1] |= grid[:, 1:]
    neighbours[:, :, 1:] |= grid[:, :, :-1]
    neighbours[:, :, :-1] |= grid[:, :, 1:]
    assert (grid & neighbours).sum() / grid.sum() > 0.95  # blocks, not scattered patches
    assert not np.array_equal(masks[0], masks[1])
    assert np.array_equal(gen(np.random.default_rng(3)), gen(np.random.default_rng(3)))


def test_random_mask_and_grid_scaling():
    rng = np.random.default_rng(0)
    assert RandomMaskGenerator((16, 16), 147)(rng).sum() == 147
    cfg = MaskConfig()
    assert build_mask_generator(cfg, (4, 4))(rng).sum() == 7  # 105 * 16 / 256 rounded
    assert build_mask_generator(cfg, (24, 24))(rng).sum() == 236  # 105 * 576 / 256 rounded
    cfg.strategy = "random"
    assert isinstance(build_mask_generator(cfg, (14, 14)), RandomMaskGenerator)
    cfg.strategy = "grid"
    with pytest.raises(ValueError, match="block or random"):
        build_mask_generator(cfg, (14, 14))


def good_jpeg(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


@pytest.fixture
def broken_dir(tmp_path):
    """12 good images and one of each bad kind, indexed; returns (index path, set of bad rows)."""
    root = tmp_path / "imgs" / "all"
    root.mkdir(parents=True)
    for i in range(12):
        (root / f"good{i:02d}.jpg").write_bytes(good_jpeg(i))
    (root / "bad_truncated.jpg").write_bytes(good_jpeg(99)[:300])
    (root / "bad_zero.jpg").write_bytes(good_jpeg(97))
    (root / "bad_text.jpg").write_text("this is not an image")
    (root / "bad_missing.jpg").write_bytes(good_jpeg(98))
    (root / "bad_huge.png").write_bytes(encode(Image.new("RGB", (200, 100)), "PNG"))  # > MAX_PIXELS
    out = build_index([str(tmp_path / "imgs")], str(tmp_path / "i.arrow"), num_workers=1)
    # the builder skips empty and missing files, so these two go bad after indexing (as on a live disk)
    (root / "bad_zero.jpg").write_bytes(b"")
    (root / "bad_missing.jpg").unlink()
    reader = open_index(out)
    bad_rows = {r for r in range(len(reader)) if Path(reader.record(r).path).name.startswith("bad")}
    assert len(bad_rows) == 5
    return out, bad_rows


def loader_for(index, workers=0, train=True, batch=4, state=None, threshold_pixels=MAX_PIXELS, img=32):
    data_cfg = DataConfig(num_workers=workers, max_image_pixels=threshold_pixels, prefetch_factor=2)
    return build_loader(
        data_cfg,
        MaskConfig(),
        index_paths=[index],
        img_size=img,
        patch_size=8,
        micro_batch_size=batch,
        rank=0,
        world_size=1,
        seed=4,
        train=train,
        sampler_state=state,
    )


def test_broken_images_are_replaced_and_counted(broken_dir, caplog):
    index, bad_rows = broken_dir
    loader, _ = loader_for(index, workers=0, train=False, batch=17)
    with caplog.at_level(logging.WARNING, logger="eva_train.data.dataset"):
        batches = list(loader) + list(loader)  # two passes: each bad path logged once only
    assert len(batches) == 2
    batch = batches[0]
    assert batch["images"].shape == (17, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert not set(batch["index"].tolist()) & bad_rows
    # expectations from the fixture alone (not from the production replacement rule): a good row is
    # itself with no failure; a bad row failed at least once and holds the very pixels of the good row
    # that replaced it (the val crop is deterministic, and position p of this one-pass batch is row p)
    for r in range(17):
        got, bad = int(batch["index"][r]), int(batch["bad"][r])
        if r in bad_rows:
            assert bad >= 1 and got != r and torch.equal(batch["images"][r], batch["images"][got]), r
        else:
            assert (bad, got) == (0, r), r
    logged = [r.getMessage() for r in caplog.records]
    for name in ("bad_truncated", "bad_zero", "bad_text", "bad_missing", "bad_huge"):
        assert sum(name in m for m in logged) == 1, (name, logged)


def test_bad_fraction_aborts_with_a_clear_report(broken_dir):
    index, _ = broken_dir
    loader, _ = loader_for(index, workers=0, train=False, batch=17)
    monitor = BadSampleMonitor(threshold=0.01, min_samples=10)
    with pytest.raises(
        DataError,
        match=r"failed to read or decode, above data.bad_sample_threshold=1.00%.*"
        r"--data.bad_sample_threshold",
    ):
        for batch in loader:
            monitor.update(batch["bad"].sum(), len(batch["bad"]))
    quiet = BadSampleMonitor(threshold=0.5, min_samples=10)
    quiet.update(5, 17)
    assert quiet.fraction == pytest.approx(5 / 17)
    early = BadSampleMonitor(threshold=0.01, min_samples=1000)
    early.update(3, 10)  # 30% bad but below the minimum count: no abort yet
    assert early.fraction == pytest.approx(0.3)
    with pytest.raises(DataError, match="13 of 1000 samples"):
        early.update(10, 990)  # the minimum is reached at 1.3% > 1%: now it aborts


def test_same_batches_for_any_worker_count_and_on_resume(broken_dir):
    index, _ = broken_dir
    ref_loader, sampler = loader_for(index, workers=0)
    ref = [b for b, _ in zip(ref_loader, range(6))]  # 6 batches of 4 over an epoch of 17: crosses an epoch
    two_workers, _ = loader_for(index, workers=2)
    for got, want in zip(two_workers, ref):
        for key in ("images", "mask", "index", "bad", "label"):
            assert torch.equal(got[key], want[key]), key
    state = sampler.state_after(3 * 4)
    resumed, _ = loader_for(index, workers=1, state=state)
    for got, want in zip(resumed, ref[3:]):
        assert torch.equal(got["images"], want["images"]) and torch.equal(got["mask"], want["mask"])
    assert ref[0]["mask"].shape == (4, 16) and (ref[0]["mask"].sum(1) == 7).all()


def test_all_bad_data_is_an_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(b"garbage")
    index = build_index([str(tmp_path / "imgs")], str(tmp_path / "i.arrow"), num_workers=1)
    dataset = MaskedImageDataset(open_index(index), SampleSpec(img_size=16), RandomMaskGenerator((2, 2), 1))
    with pytest.raises(DataError, match="failed to load"):
        dataset[(0, 0)]


def test_open_image_rejects_empty_and_huge():
    with pytest.raises(BadImageError, match="zero bytes"):
        open_image(b"", 100)
    with pytest.raises(BadImageError, match="max_image_pixels"):
        open_image(encode(Image.new("RGB", (20, 20))), 100)
