"""Cheap checks on encoded image bytes, done without decoding them.

The ingest edge uses them to reject bytes that are not the declared type; the
worker uses them to dead-letter truncated files, which OpenCV would otherwise
decode into an image padded with grey.
"""

from __future__ import annotations

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"
BMP_SIGNATURE = b"BM"
# Some cameras pad a JPEG with zero bytes after its end marker.
MAX_JPEG_TRAILER = 64


def sniff_content_type(data: bytes) -> str | None:
    """Return the content type that ``data``'s first bytes announce, if any."""
    if data.startswith(JPEG_SOI):
        return "image/jpeg"
    if data.startswith(PNG_SIGNATURE):
        return "image/png"
    if data.startswith(BMP_SIGNATURE) and len(data) >= 26:
        return "image/bmp"
    return None


def check_image(data: bytes, declared: str) -> str | None:
    """Return why ``data`` is not a whole image of type ``declared``, or None."""
    sniffed = sniff_content_type(data)
    if sniffed is None:
        return f"bytes are not a JPEG, PNG or BMP image (first bytes {data[:8].hex()})"
    if sniffed != declared:
        return f"content type is {declared} but the bytes are {sniffed}"
    if sniffed == "image/jpeg":
        end = data.rfind(JPEG_EOI)
        if end < 0 or len(data) - (end + 2) > MAX_JPEG_TRAILER or data[end + 2 :].strip(b"\x00"):
            return "JPEG is truncated: no end-of-image marker at the end"
    elif sniffed == "image/png":
        if not data.endswith(PNG_IEND):
            return "PNG is truncated: no IEND chunk at the end"
    else:
        declared_size = int.from_bytes(data[2:6], "little")
        if declared_size and declared_size > len(data):
            return f"BMP is truncated: header declares {declared_size} bytes, got {len(data)}"
    return None
