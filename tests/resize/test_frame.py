"""resize.frame: geometry, orientation, small inputs, formats, encoder settings and the guards."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from devtools.samples import make_frame, render_frame
from resize.frame import (
    available_backends,
    derived_key,
    render_pixels,
    resize_file,
    resize_frame,
)
from resize.geometry import fit_box
from xdc.config import ResizeSettings
from xdc.errors import ResizeError, XdcError

BACKENDS = available_backends()
SETTINGS = ResizeSettings(bucket="frames")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def encode(im: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        kw.setdefault("compress_level", 1)  # fast; the noisy frames make level 6 slow
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def frame(width: int, height: int, seed: int = 0, fmt: str = "JPEG", **kw: object) -> bytes:
    return encode(render_frame(seed, width, height), fmt, **kw)


def opened(data: bytes | None) -> Image.Image:
    assert data is not None
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -- geometry --------------------------------------------------------------------------------
def test_both_backends_are_installed() -> None:
    assert BACKENDS == ["vips", "pillow"]


def test_4k_frame_becomes_exactly_720p(backend: str) -> None:
    out = resize_frame(make_frame(1), SETTINGS, backend=backend)
    assert (out.width, out.height, out.action, out.format) == (1280, 720, "resized", "jpeg")
    assert (out.source_width, out.source_height) == (3840, 2160)
    im = opened(out.data)
    assert (im.format, im.size, im.mode) == ("JPEG", (1280, 720), "RGB")


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1600, 1200), (960, 720)), ((1080, 1920), (405, 720)), ((1921, 1081), (1279, 720)),
     ((3000, 40), (1280, 17)), ((40, 5000), (6, 720)), ((20000, 3), (1280, 1))],
)
def test_other_aspect_ratios_fit_inside_the_box(backend: str, size: tuple[int, int], expected: tuple[int, int]) -> None:
    out = resize_frame(frame(*size), SETTINGS, backend=backend)
    assert (out.width, out.height) == expected == fit_box(*size, 1280, 720)
    assert opened(out.data).size == expected


def test_fit_box_keeps_the_ratio_and_at_least_one_pixel() -> None:
    for w, h in [(3840, 2160), (1600, 1200), (1, 10_000), (7, 3), (4096, 2160)]:
        ow, oh = fit_box(w, h, 1280, 720)
        assert 1 <= ow <= 1280 and 1 <= oh <= 720
        assert ow == 1280 or oh == 720
        assert abs(ow / oh - w / h) <= max(w / h / ow, 1 / oh) * 2  # within a pixel's rounding


def test_backends_agree_on_geometry_and_pixels() -> None:
    if len(BACKENDS) < 2:
        pytest.fail(f"only {BACKENDS} importable: pyvips and pyvips-binary are dependencies")
    for size in [(3840, 2160), (1600, 1200), (1000, 1777), (2001, 999)]:
        data = frame(*size, seed=3)
        a, b = (render_pixels(data, SETTINGS, backend=be) for be in BACKENDS)
        assert a.shape == b.shape
        assert psnr(a, b) > 35


# -- orientation ------------------------------------------------------------------------------
def with_orientation(im: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes())


def test_portrait_photo_stored_landscape_comes_out_portrait(backend: str) -> None:
    stored = render_frame(5, 1920, 1080)  # a phone's sensor: landscape pixels + Orientation=6
    out = resize_frame(with_orientation(stored, 6, "JPEG"), SETTINGS, backend=backend)
    assert (out.source_width, out.source_height) == (1080, 1920)
    assert (out.width, out.height) == (405, 720)
    im = opened(out.data)
    assert im.size == (405, 720)
    assert im.getexif().get(0x0112, 1) == 1  # applied, so not applied twice by a viewer


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_exif_orientation_matches_pillow_exif_transpose(backend: str, orientation: int, fmt: str) -> None:
    # An asymmetric picture: a bright block in one corner, so any wrong flip shows.
    a = np.full((900, 1600, 3), 40, np.uint8)
    a[:300, :400] = (250, 30, 30)
    a[600:, 1300:] = (30, 30, 250)
    data = with_orientation(Image.fromarray(a), orientation, fmt)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    expected = np.asarray(expected.convert("RGB").resize(fit_box(*expected.size, 1280, 720), Image.Resampling.LANCZOS))
    got = render_pixels(data, SETTINGS, backend=backend)
    assert got.shape == expected.shape
    assert psnr(got, expected) > 30


# -- small inputs -----------------------------------------------------------------------------
def test_small_input_is_skipped(backend: str) -> None:
    out = resize_frame(frame(1280, 720), SETTINGS, backend=backend)
    assert out.data is None and out.action == "skipped"
    assert (out.width, out.height, out.source_width, out.source_height) == (1280, 720, 1280, 720)


def test_small_input_is_copied_byte_for_byte(backend: str) -> None:
    data = frame(640, 480)
    out = resize_frame(data, SETTINGS.model_copy(update={"small_input": "copy"}), backend=backend)
    assert out.action == "copied" and out.data == data and (out.width, out.height) == (640, 480)


def test_small_png_that_must_become_jpeg_is_transcoded_at_its_size(backend: str) -> None:
    data = frame(640, 480, fmt="PNG")
    out = resize_frame(data, SETTINGS.model_copy(update={"small_input": "copy"}), backend=backend)
    assert (out.action, out.format) == ("copied", "jpeg")
    assert opened(out.data).format == "JPEG" and opened(out.data).size == (640, 480)


def test_one_side_over_the_box_is_resized(backend: str) -> None:
    out = resize_frame(frame(1300, 700), SETTINGS, backend=backend)
    assert out.action == "resized" and (out.width, out.height) == (1280, 689)


# -- formats and encoder settings ---------------------------------------------------------------
def test_png_to_png_keeps_alpha(backend: str) -> None:
    rgba = render_frame(2, 1920, 1080).convert("RGBA")
    rgba.putalpha(128)
    out = resize_frame(encode(rgba, "PNG"), SETTINGS.model_copy(update={"png_output": "png"}), backend=backend)
    im = opened(out.data)
    assert (out.format, im.format, im.size, im.mode) == ("png", "PNG", (1280, 720), "RGBA")
    assert abs(int(np.asarray(im)[..., 3].mean()) - 128) <= 1


def test_png_to_jpeg_flattens_alpha_on_white(backend: str) -> None:
    rgba = Image.new("RGBA", (1920, 1080), (0, 0, 0, 0))  # fully transparent
    out = resize_frame(encode(rgba, "PNG"), SETTINGS, backend=backend)
    im = opened(out.data)
    assert (out.format, im.format, im.size, im.mode) == ("jpeg", "JPEG", (1280, 720), "RGB")
    assert np.asarray(im).min() >= 250


def test_palette_and_grey_pngs(backend: str) -> None:
    grey = render_frame(4, 1920, 1080).convert("L")
    out = resize_frame(encode(grey, "PNG"), SETTINGS, backend=backend)
    assert opened(out.data).mode == "L" and (out.width, out.height) == (1280, 720)
    pal = render_frame(4, 1920, 1080).convert("P")
    out = resize_frame(encode(pal, "PNG"), SETTINGS.model_copy(update={"png_output": "png"}), backend=backend)
    assert opened(out.data).mode == "RGB" and (out.width, out.height) == (1280, 720)


@pytest.mark.parametrize(("subsampling", "pillow_code"), [("4:2:0", 2), ("4:2:2", 1), ("4:4:4", 0)])
def test_quality_and_subsampling_are_honoured(backend: str, subsampling: str, pillow_code: int) -> None:
    data = frame(1920, 1080, subsampling="4:4:4")
    sizes = {}
    for q in (50, 95):
        out = resize_frame(data, SETTINGS.model_copy(update={"quality": q, "subsampling": subsampling}), backend=backend)
        im = opened(out.data)
        assert JpegImagePlugin.get_sampling(im) == pillow_code
        # The luma quantisation table is the standard one scaled for q; compare with Pillow's.
        ref = opened(encode(Image.new("RGB", (16, 16)), "JPEG", quality=q))
        assert im.quantization[0] == ref.quantization[0]
        sizes[q] = len(out.data)
    assert sizes[50] < sizes[95]


def test_default_is_q90_420(backend: str) -> None:
    out = resize_frame(frame(1920, 1080), SETTINGS, backend=backend)
    im = opened(out.data)
    ref = opened(encode(Image.new("RGB", (16, 16)), "JPEG", quality=90))
    assert JpegImagePlugin.get_sampling(im) == 2 and im.quantization[0] == ref.quantization[0]


# -- guards -----------------------------------------------------------------------------------
def reason(data: bytes, backend: str, settings: ResizeSettings = SETTINGS) -> str:
    with pytest.raises(ResizeError) as info:
        resize_frame(data, settings, backend=backend)
    assert isinstance(info.value, XdcError) and not info.value.retriable
    return info.value.reason


def test_zero_bytes(backend: str) -> None:
    assert reason(b"", backend) == "empty"


def test_text_is_not_an_image(backend: str) -> None:
    assert reason(b"frame_id,timestamp\n1,2\n" * 100, backend) == "not_an_image"


def test_other_image_formats_are_unsupported(backend: str) -> None:
    assert reason(encode(Image.new("RGB", (2000, 2000)), "GIF"), backend) == "unsupported_format"


def test_input_over_max_input_mib(backend: str) -> None:
    data = frame(1920, 1080) + bytes(2**20)  # trailing bytes after the end-of-image marker
    assert reason(data, backend, SETTINGS.model_copy(update={"max_input_mib": 1})) == "too_large"


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose IHDR claims width x height."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_with_header_size(width: int, height: int) -> bytes:
    data = bytearray(frame(64, 64))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_decompression_bombs_are_refused_from_the_header(backend: str) -> None:
    assert reason(png_with_header_size(20000, 20000), backend) == "decompression_bomb"
    assert reason(jpeg_with_header_size(20000, 20000), backend) == "decompression_bomb"
    tight = SETTINGS.model_copy(update={"max_pixels": 4_000_000})
    assert reason(make_frame(0), backend, tight) == "decompression_bomb"


def test_truncated_jpeg(backend: str) -> None:
    data = make_frame(7)
    assert reason(data[: len(data) // 2], backend) == "truncated"
    assert reason(data[:300], backend) == "truncated"


def test_truncated_png(backend: str) -> None:
    data = frame(1920, 1080, fmt="PNG")
    assert reason(data[: len(data) // 2], backend) == "truncated"
    assert reason(data[:-12], backend) == "truncated"  # only IEND missing
    assert reason(data[:20], backend) == "truncated"


def test_corrupt_jpeg_header(backend: str) -> None:
    data = bytearray(frame(1920, 1080))
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 40] = bytes(35)  # Huffman table zeroed
    assert reason(bytes(data), backend) == "corrupt"
    assert reason(b"\xff\xd8\xff" + bytes(range(256)) * 4, backend) == "corrupt"


def test_corrupt_png_data(backend: str) -> None:
    data = bytearray(frame(1920, 1080, fmt="PNG"))
    mid = len(data) // 2
    data[mid : mid + 100] = bytes(100)  # inside IDAT: CRC and zlib stream both broken
    assert reason(bytes(data), backend) == "corrupt"


def test_damaged_jpeg_scan_is_quarantined_by_libvips() -> None:
    # A marker in the middle of the entropy-coded data: libjpeg only warns and pads the rest with
    # grey; the libvips backend turns that warning into an error. (Pillow ignores it: see _pillow.py.)
    if "vips" not in BACKENDS:
        pytest.fail("pyvips not importable: pyvips and pyvips-binary are dependencies")
    data = bytearray(make_frame(8))
    sos = data.index(b"\xff\xda")
    mid = (sos + len(data)) // 2
    data[mid:mid] = b"\xff\xe5\x00\x04ab"
    assert reason(bytes(data), "vips") == "corrupt"


# -- keys and files ---------------------------------------------------------------------------
def test_derived_key() -> None:
    s = ResizeSettings(bucket="frames", prefixes=["raw/", "cams/"], derived_prefix="720p/")
    assert derived_key("raw/cam0/000001.jpg", s) == "720p/cam0/000001.jpg"
    assert derived_key("cams/x/1.JPEG", s) == "720p/x/1.JPEG"
    assert derived_key("raw/cam0/000001.png", s) == "720p/cam0/000001.jpg"
    assert derived_key("raw/cam0/000001.png", s.model_copy(update={"png_output": "png"})) == "720p/cam0/000001.png"
    assert derived_key("other/1.jpg", s) is None
    assert derived_key("raw/lidar/000001.bin", s) is None
    # Overlapping prefixes never resize a derivative again.
    loop = ResizeSettings(bucket="frames", prefixes=[""], derived_prefix="720p/")
    assert derived_key("720p/a.jpg", loop) is None
    assert derived_key("a.jpg", loop) == "720p/a.jpg"


def test_resize_file(tmp_path: Path) -> None:
    src = tmp_path / "in.jpg"
    src.write_bytes(frame(1920, 1080))
    out = resize_file(src, tmp_path / "out" / "f.jpg", SETTINGS)
    assert opened((tmp_path / "out" / "f.jpg").read_bytes()).size == (1280, 720) == (out.width, out.height)
    src.write_bytes(frame(100, 100))
    assert resize_file(src, tmp_path / "small.jpg", SETTINGS).action == "skipped"
    assert not (tmp_path / "small.jpg").exists()
