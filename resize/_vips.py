"""The fast backend: libvips (pyvips-binary) with JPEG shrink-on-load and a lanczos3 resample.

Shrink-on-load decodes a 4K JPEG at half size in the DCT domain, which is where most of the
time goes (facts/resize.md: ~39 ms/frame against 111 for a full decode with Pillow).
"""
from __future__ import annotations

import os
from typing import Any

import pyvips

from resize import icc
from resize.geometry import Plan
from resize.probe import Probe
from xdc.errors import ResizeError

# One process per core is the scaling model (resize.workers); a libvips thread pool per process
# would only fight the other processes for the same cores. VIPS_CONCURRENCY still wins if set.
if "VIPS_CONCURRENCY" not in os.environ:
    pyvips.concurrency_set(1)
# Every frame is a new buffer: caching operations only holds on to memory.
pyvips.cache_set_max(0)

_SUBSAMPLE = {"4:2:0": "on", "4:4:4": "off"}  # libvips cannot write 4:2:2: Pillow encodes those
_TRANSFORM = {
    2: ("fliphor",),
    3: ("rot180",),
    4: ("flipver",),
    5: ("rot90", "fliphor"),
    6: ("rot90",),
    7: ("rot270", "fliphor"),
    8: ("rot270",),
}


def render(data: bytes, p: Probe, plan: Plan, *, flatten: bool) -> pyvips.Image:
    """Decode, resize to the plan and orient; returns an 8-bit image held in memory."""
    try:
        # fail_on="warning": libjpeg reports a damaged scan only as a warning and pads it with
        # grey; such a frame must be quarantined, not published.
        if p.format == "jpeg":
            im = pyvips.Image.jpegload_buffer(data, shrink=plan.shrink, access="sequential", fail_on="warning")
        else:
            im = pyvips.Image.pngload_buffer(data, access="sequential", fail_on="warning")
        if im.interpretation == "cmyk":  # CMYK and YCCK JPEGs (libjpeg gives both as CMYK)
            im = _cmyk_to_srgb(im)
        if im.format != "uchar":  # 16-bit PNG: keep the high byte, as Pillow does
            im = (im >> 8).cast("uchar") if im.format == "ushort" else im.cast("uchar")
        alpha = im.hasalpha()
        if alpha:  # resample premultiplied so transparent pixels don't bleed colour (Pillow does the same)
            im = im.premultiply()
        im = im.resize(plan.stored_width / im.width, vscale=plan.stored_height / im.height, kernel="lanczos3")
        if alpha:
            im = im.unpremultiply()
        im = im.cast("uchar")
        if alpha and flatten:
            im = im.flatten(background=[255] * (im.bands - 1))
        # Evaluate now (errors in the sequential decode surface here) and from memory, because
        # rotations read out of order.
        im = im.copy_memory()
        for op in _TRANSFORM.get(p.orientation, ()):
            im = getattr(im, op)()
        if (im.width, im.height) != (plan.width, plan.height):  # libvips rounds its own way
            im = im.resize(plan.width / im.width, vscale=plan.height / im.height, kernel="lanczos3").copy_memory()
        return im
    except pyvips.Error as exc:
        raise _translate(exc) from exc


def _cmyk_to_srgb(im: pyvips.Image) -> pyvips.Image:
    """Through the embedded profile (libvips' own CMYK profile when there is none), relative
    colorimetric like ImageCms' default; the result carries no profile, which means sRGB.

    colourspace("srgb") converted the pixels but left the CMYK profile attached, and
    jpegsave_buffer(keep=ICC) then died with SIGSEGV on some such frames (issue 15).
    """
    return _without_icc(im.icc_transform("srgb", input_profile="cmyk", embedded=True, intent="relative"))


def _without_icc(im: pyvips.Image) -> pyvips.Image:
    out = im.copy()  # metadata edits on a copy: the input image may be shared
    out.remove("icc-profile-data")
    return out


def _fitting_icc(im: pyvips.Image) -> pyvips.Image:
    """The image, without its profile if that profile does not describe these bands."""
    if im.get_typeof("icc-profile-data") and not icc.fits(bytes(im.get("icc-profile-data")), im.bands):
        return _without_icc(im)
    return im


def encode(im: pyvips.Image, fmt: str, quality: int, subsampling: str) -> bytes:
    im = _fitting_icc(im)
    try:
        if fmt == "png":
            return bytes(im.pngsave_buffer(compression=3, keep=pyvips.enums.ForeignKeep.ICC))
        if subsampling in _SUBSAMPLE:
            return bytes(
                im.jpegsave_buffer(Q=quality, subsample_mode=_SUBSAMPLE[subsampling], keep=pyvips.enums.ForeignKeep.ICC)
            )
    except pyvips.Error as exc:
        raise _translate(exc) from exc
    from resize import _pillow

    return _pillow.encode(to_pillow(im), fmt, quality, subsampling)


def to_pillow(im: pyvips.Image) -> Any:
    from PIL import Image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[im.bands]
    out = Image.frombytes(mode, (im.width, im.height), im.write_to_memory())
    profile = bytes(im.get("icc-profile-data")) if im.get_typeof("icc-profile-data") else None
    if icc.fits(profile, im.bands):
        out.info["icc_profile"] = profile
    return out


def pixels(im: pyvips.Image) -> Any:
    """HxWxC uint8 numpy array (for the bench's PSNR)."""
    import numpy as np

    return np.ndarray(buffer=im.write_to_memory(), dtype=np.uint8, shape=(im.height, im.width, im.bands))


def _translate(exc: pyvips.Error) -> ResizeError:
    msg = " ".join(str(exc).split())
    low = msg.lower()
    if "premature end of jpeg image" in low or "truncated" in low or "unexpected end" in low:
        return ResizeError("truncated", msg)
    return ResizeError("corrupt", msg)
