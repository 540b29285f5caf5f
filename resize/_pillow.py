"""The fallback backend: Pillow with draft() (JPEG DCT-domain reduction) and LANCZOS.

Used where pyvips cannot be imported. Same geometry and guards as the libvips backend (the probe
and the plan are shared); one difference: Pillow ignores libjpeg's warnings, so a JPEG whose scan
data is damaged but whose structure is intact (markers, end-of-image) decodes instead of being
quarantined. Truncated files and broken headers are refused by both.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageCms

from resize import icc as icc_header
from resize.geometry import Plan
from resize.probe import Probe
from xdc.errors import ResizeError

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def render(data: bytes, p: Probe, plan: Plan, *, flatten: bool) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # The probe already enforced settings.max_pixels; Pillow's own (lower) warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            icc = im.info.get("icc_profile")
            if p.format == "jpeg" and plan.shrink > 1:
                im.draft(None, (plan.stored_width, plan.stored_height))
            im.load()
        if im.mode == "CMYK":  # CMYK and YCCK JPEGs
            im, icc = _cmyk_to_srgb(im, icc), None
        im = _normalise_mode(im)
        im = im.resize((plan.stored_width, plan.stored_height), Image.Resampling.LANCZOS)
        if p.orientation in _TRANSPOSE:
            im = im.transpose(_TRANSPOSE[p.orientation])
        if flatten and im.mode in ("LA", "RGBA"):
            background = Image.new(im.mode[:-1], im.size, 255 if im.mode == "LA" else (255, 255, 255))
            background.paste(im, mask=im.getchannel("A"))
            im = background
        im.info.pop("icc_profile", None)  # conversions may carry the source's along
        if icc_header.fits(icc, len(im.getbands())):
            im.info["icc_profile"] = icc
        return im
    except Image.DecompressionBombError as exc:
        raise ResizeError("decompression_bomb", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise ResizeError("truncated", msg) from exc
        raise ResizeError("corrupt", msg or type(exc).__name__) from exc


def _cmyk_to_srgb(im: Image.Image, profile: bytes | None) -> Image.Image:
    """Through the embedded profile, relative colorimetric (as the libvips backend). Without a
    profile Pillow's naive formula is all there is here; libvips uses its built-in CMYK profile
    instead, so the two backends differ on such frames (not in colour sense: neither inverts)."""
    if icc_header.colour_space(profile) != "CMYK":
        return im.convert("RGB")
    assert profile is not None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        out = ImageCms.profileToProfile(im, src, _srgb(), outputMode="RGB",
                                        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    except ImageCms.PyCMSError:  # an unreadable profile is ignored, as viewers do
        return im.convert("RGB")
    assert out is not None
    return out


_SRGB: ImageCms.ImageCmsProfile | None = None


def _srgb() -> ImageCms.ImageCmsProfile:
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB


def _normalise_mode(im: Image.Image) -> Image.Image:
    """8-bit L, LA, RGB or RGBA, as libvips gives after its own conversions."""
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the high byte
        a = np.asarray(im).astype(np.uint32) >> 8
        return Image.fromarray(a.astype(np.uint8), "L")
    if im.mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("1",):
        return im.convert("L")
    if im.mode == "PA":
        return im.convert("RGBA")
    return im.convert("RGB")  # CMYK, YCbCr, ...


def encode(im: Image.Image, fmt: str, quality: int, subsampling: str) -> bytes:
    buf = io.BytesIO()
    icc = im.info.get("icc_profile")
    extra: dict[str, Any] = {"icc_profile": icc} if icc else {}
    if fmt == "png":
        im.save(buf, "PNG", compress_level=3, **extra)
    else:
        im.save(buf, "JPEG", quality=quality, subsampling=subsampling, **extra)
    return buf.getvalue()


def pixels(im: Image.Image) -> Any:
    a = np.asarray(im)
    return a if a.ndim == 3 else a[..., None]
