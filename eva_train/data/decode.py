"""Image bytes -> RGB uint8 crop of a fixed size, with the failure modes named.

JPEGs are decoded by simplejpeg (libjpeg-turbo straight into a reused numpy buffer, ~10-15%
faster than Pillow's decode) when it is installed, else by Pillow (pillow-simd is a drop-in
replacement and is picked up by the import); other formats and CMYK JPEGs always go to Pillow.
EVA_JPEG_DECODER=pillow|simplejpeg overrides the choice.
Both decoders use the same accurate IDCT and chroma upsampling, so they give the same pixels.
When the crop will be downscaled at least 2x anyway, the JPEG is decoded at 1/2, 1/4 or 1/8
scale (DCT scaling, Pillow's `draft`): the output keeps full detail and decode gets cheaper.
The crop is resized by torch's antialiased bicubic on uint8 channels-last (same filter as
Pillow's BICUBIC resize, measured ~3-5x faster here), so decode stays the main cost.
"""

import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from eva_train.data.jpeg_header import jpeg_orientation

try:
    import simplejpeg
except ImportError:  # optional: Pillow decodes everything
    simplejpeg = None

EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DCT_FACTORS = (8, 4, 2)  # JPEG decode-time downscaling that libjpeg does with reduced IDCTs
DEFAULT_JPEG_DECODER = os.environ.get("EVA_JPEG_DECODER") or ("simplejpeg" if simplejpeg is not None else "pillow")
if DEFAULT_JPEG_DECODER not in ("pillow", "simplejpeg") or (DEFAULT_JPEG_DECODER == "simplejpeg" and not simplejpeg):
    raise ImportError(
        f"EVA_JPEG_DECODER={DEFAULT_JPEG_DECODER!r}: use 'pillow', or 'simplejpeg' with simplejpeg "
        f"installed (pip install simplejpeg), or unset it to pick automatically"
    )
SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")
DEFAULT_MAX_PIXELS = (
    64 * 1024 * 1024
)  # refuse decompression bombs (data.max_image_pixels in training)  # what it converts to RGB (not CMYK/YCCK)
_DECODE_BUFFER = threading.local()

# EXIF orientation -> the same transform as PIL.ImageOps.exif_transpose, on an (H, W, C) array view
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a[::-1].transpose(1, 0, 2),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),
}


class BadImageError(Exception):
    """An image that cannot be used (unreadable, empty, too large); the sample is replaced."""


# Pillow's one-channel modes deeper than 8 bits. convert("RGB") clips them (a 16-bit ramp becomes
# ~98% white), so they are scaled here: integers as 16-bit (PNG and TIFF 16-bit gray open as I;16*,
# older Pillow opened them as I), floats as [0, 1] (the convention of float TIFFs).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
FLOAT_MODES = ("F",)
UINT16_TO_UINT8 = 257  # 65535 / 255: v / 257 maps [0, 65535] onto [0, 255] exactly


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """A deep one-channel image -> 8-bit "L", full range mapped to full range, rounded to nearest."""
    values = np.asarray(img)
    if img.mode in FLOAT_MODES:
        scaled = np.nan_to_num(values.astype(np.float64), nan=0.0) * 255.0
    else:
        scaled = values.astype(np.float64) / UINT16_TO_UINT8
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: deep images scaled to 8 bits, transparency composited on white, CMYK
    and the rest by Pillow's own conversion."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES + FLOAT_MODES:
        return _high_bit_depth_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # composite on white: transparent pixels have arbitrary colors
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; reject empty and huge images before any pixel is decoded."""
    if not data:
        raise BadImageError("zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for garbage input
        raise BadImageError(f"not an image ({type(exc).__name__}: {exc})") from None
    _check_pixels(img.width, img.height, max_pixels)
    return img


def exif_orientation(img: Image.Image) -> int:
    orientation = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return orientation if orientation in _ORIENT else 1


@dataclass
class EncodedImage:
    """An image's bytes and what its header says: enough to choose a crop before decoding."""

    data: bytes
    width: int  # as stored (before EXIF orientation)
    height: int
    orientation: int
    is_jpeg: bool
    pillow: Image.Image | None  # Pillow's lazily opened image; None when simplejpeg read the header

    @property
    def upright_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.orientation in TRANSPOSED_ORIENTATIONS else (self.width, self.height)


def read_header(data: bytes, max_pixels: int, jpeg_decoder: str = DEFAULT_JPEG_DECODER) -> EncodedImage:
    """Size and orientation without decoding; empty, garbage and huge images -> BadImageError.
    JPEGs that simplejpeg can decode to RGB are described by it (microseconds), the rest by Pillow."""
    if jpeg_decoder == "simplejpeg" and data[:2] == b"\xff\xd8":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None  # let Pillow parse it (and name the problem)
        orientation = jpeg_orientation(data) if colorspace in SIMPLEJPEG_COLORSPACES else None
        if orientation is not None:
            _check_pixels(width, height, max_pixels)
            return EncodedImage(data, width, height, orientation, True, None)
    img = open_image(data, max_pixels)
    return EncodedImage(data, img.width, img.height, exif_orientation(img), img.format == "JPEG", img)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadImageError(f"{width}x{height} pixels exceeds data.max_image_pixels={max_pixels}")


def dct_factor(image: EncodedImage, box, out_size: int) -> int:
    """How much a JPEG may be shrunk while decoding: the crop stays >= out_size on its short side."""
    if not image.is_jpeg:
        return 1
    crop_side = min(box[2] - box[0], box[3] - box[1])
    return next((f for f in DCT_FACTORS if crop_side >= f * out_size), 1)


def decode_crop(image: EncodedImage, box, out_size: int, flip: bool) -> torch.Tensor:
    """Decode, crop `box` (upright coordinates), resize to out_size^2 bicubic -> (3, H, W) uint8."""
    factor = dct_factor(image, box, out_size)
    pixels = _decode_simplejpeg(image, factor) if image.pillow is None else None
    if pixels is None:
        pixels = _decode_pillow(image, factor)
    pixels = _ORIENT[image.orientation](pixels)  # both decoders return the stored orientation
    scale = pixels.shape[1] / image.upright_size[0]  # DCT scaling shrank the image by `factor` (rounded up)
    left, top, right, bottom = [int(round(v * scale)) for v in box]
    crop = pixels[top : max(bottom, top + 1), left : max(right, left + 1)]  # RGBX stays RGBX
    return resize_pixels(channels_last(crop), out_size, flip)


def decode_full(image: EncodedImage) -> torch.Tensor:
    """The whole image, upright RGB, full resolution: uint8 (3, H, W), a tensor of its own (the
    decoders' buffers are reused). The evaluation path: no DCT downscaling, so every tool that
    evaluates gets the same pixels for the same file."""
    pixels = _decode_simplejpeg(image, 1) if image.pillow is None else None
    if pixels is None:
        pixels = _decode_pillow(image, 1)
    upright = _ORIENT[image.orientation](pixels)[..., :3]  # (H, W, 3) view
    return torch.from_numpy(np.array(upright, copy=True)).permute(2, 0, 1).contiguous()


def load_rgb(item, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image file path, encoded bytes, a PIL image or a uint8 (3, H, W) tensor -> upright RGB uint8
    (3, H, W) through the same decoders as the data pipeline. Unreadable input -> ValueError naming it."""
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.ndim != 3 or item.shape[0] != 3:
            raise ValueError(f"image tensors must be uint8 (3, H, W); got {item.dtype} {tuple(item.shape)}")
        return item
    if isinstance(item, Image.Image):
        try:  # a lazily opened PIL image decodes here: truncated data surfaces now
            pixels = np.asarray(_to_rgb(item))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read PIL image {item!r}: {err}") from None
        return torch.from_numpy(_ORIENT[exif_orientation(item)](pixels).copy()).permute(2, 0, 1).contiguous()
    try:
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        return decode_full(read_header(data, max_pixels))
    except (OSError, BadImageError) as err:
        name = "image bytes" if isinstance(item, bytes) else f"image '{item}'"
        raise ValueError(f"cannot read {name}: {err}") from None


def _decode_simplejpeg(image: EncodedImage, factor: int):
    """(H, W, 3) uint8 in stored orientation, in this thread's reused buffer (no page faults for a
    fresh multi-MB allocation per image), or None to let Pillow try (and name the error):
    simplejpeg refuses what libjpeg only warns about, such as truncated data."""
    width, height = -(-image.width // factor), -(-image.height // factor)
    size = {}
    if factor > 1:  # exactly 1/factor: the only scale with both minimums met and at least this factor
        size = dict(min_width=width, min_height=height, min_factor=factor)
    buffer = getattr(_DECODE_BUFFER, "array", None)
    if buffer is None or buffer.size < width * height * 3:
        buffer = _DECODE_BUFFER.array = np.empty(max(width * height * 3, 1 << 20), np.uint8)
    try:
        return simplejpeg.decode_jpeg(image.data, "RGB", buffer=buffer, **size)
    except ValueError:
        return None


def _decode_pillow(image: EncodedImage, factor: int) -> np.ndarray:
    """(H, W, 3 or 4) uint8 in stored orientation. Pillow keeps RGB as RGBX (4 bytes a pixel) and exports it
    through Arrow without a copy (one memory block: images up to ~16 MB); else np.asarray copies."""
    img = image.pillow or open_image(image.data, image.width * image.height)
    if factor > 1:
        img.draft("RGB", (-(-img.width // factor), -(-img.height // factor)))
    try:
        img.load()
        img = _to_rgb(img)
    except Exception as exc:  # truncated data, bad markers, decoder errors
        raise BadImageError(f"decode failed ({type(exc).__name__}: {exc})") from None
    try:
        values = pa.array(img).values
        return np.frombuffer(values.buffers()[1], np.uint8).reshape(img.height, img.width, 4)
    except (ValueError, TypeError, pa.ArrowException):
        return np.asarray(img)


def channels_last(hwc: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 array (any strides) -> (1, C, H, W) channels-last tensor: a copy, except for an
    already contiguous array (a whole-image crop), which it shares (the resize then copies)."""
    hwc = np.ascontiguousarray(hwc)
    with warnings.catch_warnings():  # a read-only Arrow buffer: we only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)


def resize_pixels(x: torch.Tensor, out_size: int, flip: bool) -> torch.Tensor:
    """(1, C, h, w) uint8 channels-last (C = 3, or 4 for RGBX) -> antialiased bicubic to (3, S, S)
    uint8, optionally flipped."""
    x = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    return x[0, :3].contiguous()  # (3, S, S)
