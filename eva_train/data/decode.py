"""Image bytes -> RGB uint8 crop of a fixed size, with the failure modes named.

Pillow decodes (pillow-simd is a drop-in replacement and is picked up by the import).
For JPEGs `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop will be
downscaled at least that much anyway: the output keeps full detail and decode gets cheaper.
The crop is resized by torch's antialiased bicubic on uint8 channels-last (same filter as
Pillow's BICUBIC resize, measured ~2.5x faster here), so decode stays the main cost.
"""
import io
import warnings

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class BadImageError(Exception):
    """An image that cannot be used (unreadable, empty, too large); the sample is replaced."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):  # composite on white: transparent pixels have arbitrary colors
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
    if img.width * img.height > max_pixels:
        raise BadImageError(f"{img.width}x{img.height} pixels exceeds data.max_image_pixels={max_pixels}")
    return img


def exif_orientation(img: Image.Image) -> int:
    return img.getexif().get(EXIF_ORIENTATION_TAG, 1)


def upright_size(img: Image.Image) -> (int, int):
    return (img.height, img.width) if exif_orientation(img) in TRANSPOSED_ORIENTATIONS else img.size


def decode_crop(img: Image.Image, box, out_size: int, flip: bool) -> torch.Tensor:
    """Decode `img`, crop `box` (upright coordinates), resize to out_size^2 bicubic -> (3, H, W) uint8."""
    orientation = exif_orientation(img)
    upright_w = img.height if orientation in TRANSPOSED_ORIENTATIONS else img.width
    crop_side = min(box[2] - box[0], box[3] - box[1])
    if img.format == "JPEG" and crop_side >= 2 * out_size:
        reduce = crop_side / out_size  # decoder may shrink by up to this factor
        img.draft("RGB", (int(img.width / reduce) + 1, int(img.height / reduce) + 1))
    try:
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except Exception as exc:  # truncated data, bad markers, decoder errors
        raise BadImageError(f"decode failed ({type(exc).__name__}: {exc})") from None
    scale = img.width / upright_w  # draft may have shrunk the image
    left, top, right, bottom = [int(round(v * scale)) for v in box]
    crop = img.crop((left, top, max(right, left + 1), max(bottom, top + 1)))  # row memcpy, stays RGBX
    return resize_pixels(channels_last_pixels(crop), out_size, flip)


def channels_last_pixels(img: Image.Image) -> torch.Tensor:
    """(1, C, H, W) uint8 channels-last tensor over an RGB image. Pillow stores RGB as RGBX
    (4 bytes a pixel) and exports it through Arrow without a copy (one memory block: images up
    to ~16 MB); torch's antialiased resize takes that layout as is. Else a copy, 3 channels."""
    try:
        values = pa.array(img).values
        hwc = np.frombuffer(values.buffers()[1], np.uint8).reshape(img.height, img.width, 4)
    except (ValueError, TypeError, pa.ArrowException):
        hwc = np.asarray(img)
    with warnings.catch_warnings():  # the buffer is read-only; we only read it
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)  # (1, C, H, W)
    return x.contiguous(memory_format=torch.channels_last)


def resize_pixels(x: torch.Tensor, out_size: int, flip: bool) -> torch.Tensor:
    """(1, C, h, w) uint8 -> antialiased bicubic to (3, S, S) uint8, optionally flipped."""
    x = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    return x[0, :3].contiguous()  # (3, S, S)
