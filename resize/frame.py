"""Resize one camera frame to its cache derivative: a pure bytes -> bytes function.

    resize_frame(data, settings) -> ResizedFrame

Every input first passes a header probe (resize/probe.py, pure Python): size limits, signature,
structure and decompression-bomb checks happen before any decoder runs, and anything bad raises
ResizeError(reason) so the caller quarantines it. Reasons: empty, too_large, not_an_image,
unsupported_format, decompression_bomb, truncated, corrupt.

Two backends give the same geometry and behaviour: "vips" (libvips, JPEG shrink-on-load; the fast
one) and "pillow" (draft + LANCZOS; used when pyvips cannot be imported).

resize_frame runs the decoders in the calling process; callers that must survive a native crash
run it in a child (resize/sandbox.py): resize_file does by default, the worker always does.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from resize.geometry import Plan, fits_already, plan
from resize.sandbox import shared_sandbox
from resize.probe import Probe, probe
from xdc.config import ResizeSettings
from xdc.errors import ResizeError

Backend = Literal["vips", "pillow"]
BACKENDS: tuple[Backend, ...] = ("vips", "pillow")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ResizedFrame:
    data: bytes | None  # None when skipped
    width: int  # output size as displayed; the source size when skipped or copied
    height: int
    source_width: int  # source size with its EXIF orientation applied
    source_height: int
    format: Literal["jpeg", "png"]
    action: Literal["resized", "skipped", "copied"]


@cache
def _module(backend: Backend) -> ModuleType:
    return importlib.import_module(f"resize._{backend}")


@cache
def default_backend() -> Backend:
    """ "vips" if pyvips loads here, else "pillow"; XDC_RESIZE_BACKEND overrides."""
    wanted = os.environ.get("XDC_RESIZE_BACKEND")
    if wanted:
        if wanted not in BACKENDS:
            raise ValueError(f"XDC_RESIZE_BACKEND must be one of {BACKENDS}, not {wanted!r}")
        return wanted  # type: ignore[return-value]
    try:
        _module("vips")
    except (ImportError, OSError):  # no pyvips, or no libvips shared library
        return "pillow"
    return "vips"


def available_backends() -> list[Backend]:
    out: list[Backend] = []
    for b in BACKENDS:
        try:
            _module(b)
            out.append(b)
        except (ImportError, OSError):
            pass
    return out


def output_format(p: Probe, settings: ResizeSettings) -> Literal["jpeg", "png"]:
    return "png" if p.format == "png" and settings.png_output == "png" else "jpeg"


def resize_frame(data: bytes, settings: ResizeSettings, *, backend: Backend | None = None) -> ResizedFrame:
    """Resize ``data`` (JPEG or PNG) to fit settings.width x settings.height; raise ResizeError for
    input that must be quarantined."""
    p = check(data, settings)
    fmt = output_format(p, settings)
    src_w, src_h = p.display_size
    if fits_already(p, settings.width, settings.height):
        if settings.small_input == "skip":
            return ResizedFrame(None, src_w, src_h, src_w, src_h, fmt, "skipped")
        if fmt == p.format:
            return ResizedFrame(data, src_w, src_h, src_w, src_h, fmt, "copied")
        # A small PNG that must become JPEG is transcoded at its own size, so the bytes match the
        # .jpg derivative key; it still counts as copied (no resampling).
        target = Plan(src_w, src_h, p.width, p.height, 1)
    else:
        target = plan(p, settings.width, settings.height)
    mod = _module(backend or default_backend())
    im = mod.render(data, p, target, flatten=fmt == "jpeg")
    out = mod.encode(im, fmt, settings.quality, settings.subsampling)
    action: Literal["resized", "copied"] = "resized" if target.shrink > 1 or (target.width, target.height) != (src_w, src_h) else "copied"
    return ResizedFrame(out, target.width, target.height, src_w, src_h, fmt, action)


def check(data: bytes, settings: ResizeSettings) -> Probe:
    """The guards that run before any decoder: size limit, then the header probe."""
    limit = settings.max_input_mib * 2**20
    if len(data) > limit:
        raise ResizeError("too_large", f"{len(data)} bytes > {settings.max_input_mib} MiB")
    return probe(data, settings.max_pixels)


def render_pixels(data: bytes, settings: ResizeSettings, *, backend: Backend | None = None) -> Any:
    """The resized pixels before encoding, as an HxWxC uint8 numpy array (bench / quality checks)."""
    p = check(data, settings)
    mod = _module(backend or default_backend())
    im = mod.render(data, p, plan(p, settings.width, settings.height), flatten=output_format(p, settings) == "jpeg")
    return mod.pixels(im)


def resize_file(src: Path, dst: Path, settings: ResizeSettings, *, backend: Backend | None = None,
                contained: bool = True) -> ResizedFrame:
    """Resize the file ``src`` into ``dst`` (nothing is written when the frame is skipped).

    ``contained`` (the default) decodes and encodes in a resident child process (resize/sandbox.py),
    so a native crash on this file raises ResizeError("worker_crashed", "SIGSEGV while resizing
    <src>") here instead of killing the caller.
    """
    if contained:
        out: ResizedFrame = shared_sandbox().call((str(src), settings, backend), label=str(src))
    else:
        out = resize_path((str(src), settings, backend))
    if out.data is not None:
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        tmp.write_bytes(out.data)
        tmp.replace(dst)  # readers never see half a frame
    return out


def resize_bytes(job: tuple[bytes, ResizeSettings, Backend | None]) -> ResizedFrame:
    """resize_frame on one (data, settings, backend): for a Sandbox, where one argument is passed."""
    data, settings, backend = job
    return resize_frame(data, settings, backend=backend)


def resize_path(job: tuple[str, ResizeSettings, Backend | None]) -> ResizedFrame:
    """resize_file's work on one (path, settings, backend): what its sandboxed child runs."""
    path, settings, backend = job
    return resize_frame(Path(path).read_bytes(), settings, backend=backend)


def derived_key(key: str, settings: ResizeSettings) -> str | None:
    """The derivative's key for a frame key under one of settings.prefixes, else None.

    raw/cam0/000001.png -> 720p/cam0/000001.jpg (with png_output "jpeg"). Keys that are not JPEG/PNG
    frames by name (lidar .bin, manifests) and keys already under the derived prefix give None, so a
    derivative is never resized again even when the prefixes overlap.
    """
    if key.startswith(settings.derived_prefix) or not key.lower().endswith(_IMAGE_SUFFIXES):
        return None
    for prefix in settings.prefixes:
        if key.startswith(prefix):
            rel = key[len(prefix):]
            if settings.png_output == "jpeg" and rel.lower().endswith(".png"):
                rel = rel[:-4] + ".jpg"
            return settings.derived_prefix + rel
    return None
