"""EXIF orientation of a JPEG from its bytes, without Pillow's per-marker Python parsing (the
header is read for every training sample; Pillow's open costs ~0.1 ms, this ~5 us).

Same answer as Pillow's `getexif()[0x0112]`: the first APP1 "Exif" segment before the scan, IFD0.
Returns None when only Pillow can tell (an XMP packet, which Pillow also reads orientation from,
and no EXIF orientation): the caller then opens the image with Pillow.
"""

SOI, SOS, APP1 = 0xD8, 0xDA, 0xE1
STANDALONE = {0x01, SOI} | set(range(0xD0, 0xD8))  # markers without a length field
ORIENTATION_TAG, SHORT, LONG = 0x0112, 3, 4
XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"


def jpeg_orientation(data: bytes):
    """1..8, or None (see module doc). Malformed segments read as 'no orientation' (1), as in Pillow."""
    pos, end, xmp, exif_seen = 2, len(data), False, False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return 1  # not at a marker: corrupt header; the decoder will say so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        if marker == SOS:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if marker == APP1 and segment[:6] == b"Exif\x00\x00" and not exif_seen:  # Pillow reads the first
            orientation = _tiff_orientation(segment[6:])
            if orientation is not None:
                return orientation
            exif_seen = True
        if marker == APP1 and segment.startswith(XMP_PREFIX):
            xmp = True
        pos += 2 + length
    return None if xmp else 1


def _tiff_orientation(tiff: bytes):
    """Orientation tag of IFD0 (1 when absent or invalid); None when absent (XMP may still set it)."""
    order = {b"II*\x00": "little", b"MM\x00*": "big"}.get(tiff[:4])
    if order is None:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == ORIENTATION_TAG:
            kind = int.from_bytes(tiff[entry + 2 : entry + 4], order)
            width = {SHORT: 2, LONG: 4}.get(kind)
            value = int.from_bytes(tiff[entry + 8 : entry + 8 + width], order) if width else 1
            return value if 1 <= value <= 8 else 1
    return None
