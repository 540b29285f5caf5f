"""A cheap, pure-Python look at an image's header before any decoder touches it.

The probe reads only markers and chunk headers (never pixel data), so a hostile file is refused
(decompression bomb, not an image, truncated, broken header) before libjpeg / libpng see it, and
both resize backends judge the same input the same way. It also reads the EXIF orientation.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from xdc.errors import ResizeError

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# SOF markers that carry the frame size (not DHT C4, JPG C8, DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field
_OTHER_IMAGE_MAGIC = (b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"\x00\x00\x01\x00")


@dataclass(frozen=True)
class Probe:
    format: str  # "jpeg" | "png"
    width: int  # as stored
    height: int
    orientation: int = 1  # EXIF 1..8
    has_alpha: bool = False

    @property
    def transposed(self) -> bool:
        """Orientations 5-8 swap width and height."""
        return self.orientation in (5, 6, 7, 8)

    @property
    def display_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.transposed else (self.width, self.height)


def probe(data: bytes, max_pixels: int) -> Probe:
    """Identify ``data`` or raise ResizeError (empty, not_an_image, unsupported_format, truncated,
    corrupt, decompression_bomb)."""
    if not data:
        raise ResizeError("empty", "zero-byte input")
    if data.startswith(b"\xff\xd8"):
        p = _probe_jpeg(data)
    elif data.startswith(_PNG_SIG):
        p = _probe_png(data)
    elif data.startswith(_OTHER_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or data[4:8] == b"ftyp":
        raise ResizeError("unsupported_format", "only JPEG and PNG frames are resized")
    else:
        raise ResizeError("not_an_image", f"unknown signature {data[:8]!r}")
    if p.width <= 0 or p.height <= 0:
        raise ResizeError("corrupt", f"{p.format} header gives size {p.width}x{p.height}")
    if p.width * p.height > max_pixels:
        raise ResizeError("decompression_bomb", f"{p.width}x{p.height} > {max_pixels} pixels")
    return p


def _probe_jpeg(data: bytes) -> Probe:
    n = len(data)
    i = 2
    size: tuple[int, int] | None = None
    orientation = 1
    while True:
        if i >= n:
            raise ResizeError("truncated", "JPEG ends before its image data")
        if data[i] != 0xFF:
            raise ResizeError("corrupt", f"JPEG: expected a marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            raise ResizeError("truncated", "JPEG ends inside a marker")
        marker = data[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xD9 or marker == 0x00:
            raise ResizeError("corrupt", f"JPEG: unexpected marker 0x{marker:02x} before the image data")
        if i + 2 > n:
            raise ResizeError("truncated", "JPEG ends inside a segment length")
        (length,) = struct.unpack_from(">H", data, i)
        if length < 2:
            raise ResizeError("corrupt", "JPEG: bad segment length")
        end = i + length
        if end > n:
            raise ResizeError("truncated", f"JPEG segment 0x{marker:02x} runs past the end")
        seg = data[i + 2 : end]
        if marker in _SOF:
            if len(seg) < 6:
                raise ResizeError("corrupt", "JPEG: short frame header")
            _precision, h, w, comps = struct.unpack_from(">BHHB", seg)
            if comps not in (1, 3, 4):
                raise ResizeError("corrupt", f"JPEG: {comps} components")
            size = (w, h)
        elif marker == 0xE1 and seg.startswith(b"Exif\x00\x00"):
            orientation = exif_orientation(seg[6:])
        elif marker == 0xDA:  # start of scan: the header is over
            if size is None:
                raise ResizeError("corrupt", "JPEG: image data before any frame header")
            # Entropy-coded data never contains FF D9, so a missing end-of-image marker after the
            # first scan means the file was cut short (a decoder would pad it with grey).
            if data.rfind(b"\xff\xd9", end) < 0:
                raise ResizeError("truncated", "JPEG has no end-of-image marker")
            return Probe("jpeg", size[0], size[1], orientation)
        i = end


def _probe_png(data: bytes) -> Probe:
    n = len(data)
    i = len(_PNG_SIG)
    ihdr: tuple[int, int, int, int] | None = None
    orientation = 1
    has_trns = False
    while True:
        if i + 8 > n:
            raise ResizeError("truncated", "PNG ends before its IEND chunk")
        length, ctype = struct.unpack_from(">I4s", data, i)
        if length > 0x7FFFFFFF or not ctype.isalpha():
            raise ResizeError("corrupt", f"PNG: bad chunk header at byte {i}")
        if ihdr is None and ctype != b"IHDR":
            raise ResizeError("corrupt", "PNG: first chunk is not IHDR")
        body_end = i + 8 + length
        if body_end + 4 > n:
            raise ResizeError("truncated", f"PNG chunk {ctype.decode()} runs past the end")
        if ctype == b"IHDR":
            if length != 13:
                raise ResizeError("corrupt", "PNG: bad IHDR length")
            w, h, depth, colour = struct.unpack_from(">IIBB", data, i + 8)
            ihdr = (w, h, depth, colour)
        elif ctype == b"eXIf":
            orientation = exif_orientation(data[i + 8 : body_end])
        elif ctype == b"tRNS":
            has_trns = True
        elif ctype == b"IEND":
            assert ihdr is not None
            w, h, _depth, colour = ihdr
            return Probe("png", w, h, orientation, has_alpha=colour in (4, 6) or has_trns)
        i = body_end + 4  # skip the CRC; the decoder checks it


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; 1 when absent or bad.

    A broken EXIF block is not a broken image: it is ignored, as viewers do.
    """
    try:
        if tiff[:4] == b"II*\x00":
            e = "<"
        elif tiff[:4] == b"MM\x00*":
            e = ">"
        else:
            return 1
        (ifd,) = struct.unpack_from(e + "I", tiff, 4)
        (count,) = struct.unpack_from(e + "H", tiff, ifd)
        for k in range(min(count, 1000)):
            tag, typ, _n = struct.unpack_from(e + "HHI", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112 and typ == 3:
                (value,) = struct.unpack_from(e + "H", tiff, ifd + 2 + 12 * k + 8)
                return value if 1 <= value <= 8 else 1
    except struct.error:
        pass
    return 1
