"""Unusual but valid camera frames, made in the test run (no committed binaries), each with the
picture a correct resize must show, computed by Pillow independently of the code under test.

    CORPUS["cmyk_icc"] -> Sample(data, expected pixels (H, W, C) uint8, expected (width, height), mode)

The expected pixels are Pillow's: decode, ICC-aware conversion to sRGB with ImageCms (the embedded
profile, relative colorimetric), EXIF transpose, LANCZOS to the 1280x720 box; alpha composited on
white. The CMYK profile is libvips' built-in one ("Chemical proof", 960 KB): Pillow cannot write
CMYK profiles and none is installed; it is only data here, the conversion checked against is
LittleCMS driven by Pillow. YCCK frames come from libjpeg-turbo's TurboJPEG API (simplejpeg), which
writes YCCK (Adobe transform 2) whenever it is given CMYK.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageCms, ImageOps

from resize.geometry import fit_box
from devtools.samples import render_frame

BOX = (1280, 720)
RELATIVE = ImageCms.Intent.RELATIVE_COLORIMETRIC


@dataclass(frozen=True)
class Sample:
    data: bytes
    expected: np.ndarray  # the resized picture, (H, W, C) uint8
    size: tuple[int, int]  # output width, height
    mode: str  # Pillow mode of the output JPEG: "RGB" or "L"
    source: np.ndarray | None = None  # the sRGB picture the frame was made from, resized (CMYK round trips)


# -- building blocks ------------------------------------------------------------------------------
def jpeg(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=kw.pop("quality", 92), **kw)
    return buf.getvalue()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def png16(rgb16: np.ndarray) -> bytes:
    """An RGB 16-bit PNG written here (Pillow cannot write one): rows with filter 0, big-endian."""
    h, w, _ = rgb16.shape
    rows = np.zeros((h, 1 + w * 6), np.uint8)
    rows[:, 1:] = rgb16.astype(">u2").view(np.uint8).reshape(h, w * 6)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
            + chunk(b"IEND", b""))


def with_icc(data: bytes, profile: bytes) -> bytes:
    """``data`` (a JPEG) with ``profile`` embedded as APP2 ICC_PROFILE markers right after SOI."""
    step = 65519  # 65535 - 2 (length) - 14 ("ICC_PROFILE\0" + sequence + count)
    parts = [profile[i:i + step] for i in range(0, len(profile), step)]
    markers = b"".join(b"\xff\xe2" + struct.pack(">H", 16 + len(p)) + b"ICC_PROFILE\x00" + bytes([n + 1, len(parts)]) + p
                       for n, p in enumerate(parts))
    return data[:2] + markers + data[2:]


def with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(im, exif=exif.tobytes())


@cache
def cmyk_profile() -> bytes:
    import pyvips

    rgb = pyvips.Image.black(8, 8, bands=3).copy(interpretation="srgb")
    return bytes(rgb.icc_export(output_profile="cmyk").get("icc-profile-data"))


@cache
def srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_cmyk(rgb: Image.Image) -> Image.Image:
    """sRGB -> CMYK through the CMYK profile, as a photo tool would before writing a CMYK JPEG."""
    out = ImageCms.profileToProfile(rgb, srgb_profile(), ImageCms.ImageCmsProfile(io.BytesIO(cmyk_profile())),
                                    outputMode="CMYK", renderingIntent=RELATIVE)
    assert out is not None
    return out


def ycck_jpeg(cmyk: Image.Image) -> bytes:
    import simplejpeg

    a = np.asarray(cmyk)
    # TurboJPEG stores CMYK the Adobe way (decoders hand back 255 - what it was given)
    data = simplejpeg.encode_jpeg(np.ascontiguousarray(255 - a), quality=92, colorspace="CMYK")
    back = Image.open(io.BytesIO(data))
    assert back.info.get("adobe_transform") == 2, "not a YCCK JPEG"
    back.load()
    assert np.abs(np.asarray(back).astype(int) - a).mean() < 8, "YCCK round trip does not give the CMYK back"
    return data


def reference(data: bytes, *, cmyk_fallback: bytes | None = None) -> np.ndarray:
    """Pillow's picture of ``data`` at the output size: ICC-aware, upright, flattened on white."""
    im = Image.open(io.BytesIO(data))
    im.load()
    if im.mode == "CMYK":
        profile = im.info.get("icc_profile") or cmyk_fallback
        if profile is None:
            im = im.convert("RGB")
        else:
            src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            im = ImageCms.profileToProfile(im, src, srgb_profile(), outputMode="RGB", renderingIntent=RELATIVE)
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    elif im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    return as_hwc(im.resize(fit_box(*im.size, *BOX), Image.Resampling.LANCZOS))


def as_hwc(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    return a if a.ndim == 3 else a[..., None]


def resized(rgb: Image.Image) -> np.ndarray:
    return as_hwc(rgb.resize(fit_box(*rgb.size, *BOX), Image.Resampling.LANCZOS))


# -- the corpus ---------------------------------------------------------------------------------
def _sample(data: bytes, mode: str = "RGB", source: Image.Image | None = None, **kw: bytes | None) -> Sample:
    exp = reference(data, **kw)
    return Sample(data, exp, (exp.shape[1], exp.shape[0]), mode, resized(source) if source is not None else None)


@cache
def corpus() -> dict[str, Sample]:
    rgb = render_frame(21, 1920, 1080)
    cmyk = to_cmyk(rgb)
    profile = cmyk_profile()
    out: dict[str, Sample] = {
        # CMYK JPEGs as photo tools write them (Adobe APP14, inverted), with and without a profile.
        "cmyk_icc": _sample(jpeg(cmyk, icc_profile=profile), source=rgb),
        "ycck_icc": _sample(with_icc(ycck_jpeg(cmyk), profile), source=rgb),
        "progressive": _sample(jpeg(rgb, progressive=True, optimize=True)),
        "jpeg_444": _sample(jpeg(rgb, subsampling="4:4:4")),
        "jpeg_422": _sample(jpeg(rgb, subsampling="4:2:2")),
        "grey_jpeg": _sample(jpeg(rgb.convert("L")), mode="L"),
    }
    # No profile: libvips reads such CMYK through its built-in CMYK profile, Pillow's backend with
    # the naive formula; each backend is checked against the matching reference (test_corpus.py).
    plain = jpeg(cmyk)
    out["cmyk_plain"] = _sample(plain, source=rgb, cmyk_fallback=profile)

    a8 = np.asarray(rgb).astype(np.uint16)
    low = np.random.default_rng(5).integers(0, 256, a8.shape, dtype=np.uint16)
    sixteen = png16((a8 << 8) | low)  # the high byte is the 8-bit picture, the low byte noise
    out["png_16bit"] = Sample(sixteen, resized(rgb), BOX, "RGB")

    rgba = rgb.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 1920).astype(np.uint8), (1080, 1))
    rgba.putalpha(Image.fromarray(alpha, "L"))
    out["png_rgba"] = _sample(png(rgba))

    big = render_frame(22, 4000, 3000)  # 12 MP, 4:3
    out["jpeg_12mp_4x3"] = _sample(jpeg(big))
    # A phone held upright: landscape pixels + Orientation 6 or 8; shown portrait, 540x720.
    out["exif_6"] = _sample(with_orientation(big, 6))
    out["exif_8"] = _sample(with_orientation(big, 8))
    return out


def cmyk_plain_naive() -> np.ndarray:
    """The no-profile CMYK frame as Pillow's backend renders it: the naive formula."""
    return reference(corpus()["cmyk_plain"].data)
