"""The JPEG header fast path: EXIF orientation read from bytes agrees with Pillow, in both byte
orders, as SHORT or LONG, next to other APP segments; XMP-only orientation goes to Pillow."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from eva_train.data.decode import exif_orientation, open_image, read_header, simplejpeg
from eva_train.data.jpeg_header import jpeg_orientation


def plain_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(24 * 40 * 3, dtype=np.uint8).reshape(24, 40, 3)).save(buf, "JPEG")
    return buf.getvalue()


def app1_exif(orientation: int, big_endian: bool, kind: int = 3, extra_tags: int = 2) -> bytes:
    """An APP1 Exif segment with IFD0 = some other tags, then Orientation stored as `kind`."""
    e = ">" if big_endian else "<"
    entries = [struct.pack(e + "HHII", 0x010F + k, 2, 4, 0x41424300) for k in range(extra_tags)]  # Make, ...
    value = struct.pack(e + "H2x", orientation) if kind == 3 else struct.pack(e + "I", orientation)
    entries.append(struct.pack(e + "HHI", 0x0112, kind, 1) + value)
    ifd = struct.pack(e + "H", len(entries)) + b"".join(entries) + struct.pack(e + "I", 0)
    tiff = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8) + ifd
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def with_segments(jpeg: bytes, *segments: bytes) -> bytes:
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("kind", [3, 4])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(orientation, kind, big_endian):
    comment = b"\xff\xfe\x00\x07hello"  # a COM segment before the EXIF one
    data = with_segments(plain_jpeg(), comment, app1_exif(orientation, big_endian, kind))
    assert jpeg_orientation(data) == orientation == exif_orientation(open_image(data, 10**6))


def test_missing_or_invalid_orientation_is_upright():
    assert jpeg_orientation(plain_jpeg()) == 1
    assert jpeg_orientation(with_segments(plain_jpeg(), app1_exif(0, False))) == 1
    assert jpeg_orientation(with_segments(plain_jpeg(), app1_exif(9, True))) == 1
    assert jpeg_orientation(b"\xff\xd8\xff\xe1\x00\x20Exif\x00\x00II*\x00\xff\xff\xff\x7f") == 1  # IFD past the end
    assert jpeg_orientation(b"\xff\xd8garbage") == 1


def test_only_the_first_exif_segment_counts():
    data = with_segments(plain_jpeg(), app1_exif(6, False), app1_exif(3, False))
    assert jpeg_orientation(data) == 6 == exif_orientation(open_image(data, 10**6))


@pytest.mark.skipif(simplejpeg is None, reason="simplejpeg is not installed")
def test_xmp_only_orientation_is_left_to_pillow():
    xmp = (
        b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf="
        b"'http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description xmlns:tiff="
        b"'http://ns.adobe.com/tiff/1.0/' tiff:Orientation='6'/></rdf:RDF></x:xmpmeta>"
    )
    data = with_segments(plain_jpeg(), b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp)
    assert jpeg_orientation(data) is None
    header = read_header(data, 10**6, "simplejpeg")
    assert header.pillow is not None and header.orientation == exif_orientation(open_image(data, 10**6))
    fast = read_header(with_segments(plain_jpeg(), app1_exif(8, True)), 10**6, "simplejpeg")
    assert fast.pillow is None and fast.orientation == 8 and fast.upright_size == (24, 40)
