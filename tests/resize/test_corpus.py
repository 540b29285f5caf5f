"""Unusual but valid frames (tests/resize/corpus.py) resize to the right size and the right colour.

Tolerances, measured against Pillow's own rendering of each frame (ICC-aware for CMYK/YCCK):
- the pixels before encoding (render_pixels): mean abs diff <= 1.5 and PSNR >= 40 dB (measured
  0.26 / 54 dB for libvips, 0-0.8 / >= 47 dB for Pillow's backend);
- the final q90 JPEG, decoded: mean abs diff <= 7, PSNR >= 29 dB (measured 1.6-5.3 / 30.8-40 dB:
  JPEG loss on noisy synthetic frames), and every channel's mean within 2 levels (a colour cast).
For scale, a CMYK frame read with the naive formula instead of its profile is 26 off, an inverted
one 90 off: both fail.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resize import icc
from resize.frame import ResizedFrame, available_backends, render_pixels, resize_file, resize_frame
from resize.sandbox import Sandbox
from tests.resize.corpus import Sample, as_hwc, cmyk_profile, corpus, jpeg, reference, with_icc
from xdc.config import ResizeSettings
from devtools.samples import render_frame

SETTINGS = ResizeSettings(bucket="frames")
NAMES = ["cmyk_icc", "ycck_icc", "cmyk_plain", "progressive", "jpeg_444", "jpeg_422", "grey_jpeg",
         "png_16bit", "png_rgba", "jpeg_12mp_4x3", "exif_6", "exif_8"]


@pytest.fixture(params=available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    """Encodes run in a child, so a native crash fails one test instead of killing pytest."""
    with Sandbox("resize.frame:resize_bytes") as b:
        yield b


def test_the_corpus_is_what_it_says() -> None:
    c = corpus()
    assert sorted(c) == sorted(NAMES)
    probe = {name: Image.open(io.BytesIO(s.data)) for name, s in c.items()}
    assert probe["cmyk_icc"].mode == probe["cmyk_plain"].mode == "CMYK"
    assert probe["cmyk_icc"].info["adobe_transform"] == 0 and probe["ycck_icc"].info["adobe_transform"] == 2
    assert icc.colour_space(probe["cmyk_icc"].info["icc_profile"]) == "CMYK"
    assert icc.colour_space(probe["ycck_icc"].info["icc_profile"]) == "CMYK"
    assert "icc_profile" not in probe["cmyk_plain"].info
    assert probe["progressive"].info.get("progressive") == 1
    assert [probe[n].layers for n in ("jpeg_444", "jpeg_422")] == [3, 3]
    from PIL import JpegImagePlugin
    assert JpegImagePlugin.get_sampling(probe["jpeg_444"]) == 0
    assert JpegImagePlugin.get_sampling(probe["jpeg_422"]) == 1
    assert probe["grey_jpeg"].mode == "L"
    assert c["png_16bit"].data[24] == 16  # IHDR bit depth
    assert probe["png_rgba"].mode == "RGBA"
    assert probe["jpeg_12mp_4x3"].size == (4000, 3000)
    assert [probe[n].getexif().get(0x0112) for n in ("exif_6", "exif_8")] == [6, 8]


def expected_for(name: str, backend: str) -> np.ndarray:
    s = corpus()[name]
    if name == "cmyk_plain" and backend == "pillow":
        # no profile: Pillow's backend has only the naive formula (libvips uses its built-in profile)
        return reference(s.data)
    return s.expected


def diff(got: np.ndarray, exp: np.ndarray) -> tuple[float, float, float]:
    """mean abs diff, PSNR (dB), worst per-channel mean difference."""
    assert got.shape == exp.shape, (got.shape, exp.shape)
    d = got.astype(np.float64) - exp.astype(np.float64)
    mse = float((d**2).mean())
    psnr = 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return float(np.abs(d).mean()), psnr, float(np.abs(d.mean(axis=(0, 1))).max())


@pytest.mark.parametrize("name", NAMES)
def test_resizes_to_the_right_size_and_colour(name: str, backend: str, box: Sandbox) -> None:
    s: Sample = corpus()[name]
    exp = expected_for(name, backend)
    out: ResizedFrame = box.call((s.data, SETTINGS, backend), label=name)
    assert (out.action, out.format, (out.width, out.height)) == ("resized", "jpeg", s.size)
    im = Image.open(io.BytesIO(out.data or b""))
    im.load()
    assert (im.format, im.mode, im.size) == ("JPEG", s.mode, s.size)
    assert im.getexif().get(0x0112, 1) == 1  # applied, not left for a viewer to apply again
    profile = im.info.get("icc_profile")
    assert profile is None or icc.fits(profile, len(im.getbands())), icc.colour_space(profile)

    pre_mad, pre_psnr, _ = diff(render_pixels(s.data, SETTINGS, backend=backend), exp)
    mad, psnr, cast = diff(as_hwc(im), exp)
    print(f"{name} [{backend}] pre-encode {pre_mad:.2f} / {pre_psnr:.1f} dB; final {mad:.2f} / {psnr:.1f} dB,"
          f" cast {cast:.2f}")
    assert pre_mad <= 1.5 and pre_psnr >= 40
    assert mad <= 7 and psnr >= 29 and cast <= 2
    if s.source is not None and not (name == "cmyk_plain" and backend == "pillow"):
        # CMYK made from an sRGB picture comes back close to it (gamut and JPEG loss aside)
        src_mad, _, src_cast = diff(as_hwc(im), s.source)
        assert src_mad <= 10 and src_cast <= 8, (src_mad, src_cast)  # measured 6.7-6.9 / 4.2


@pytest.mark.parametrize("name", ["exif_6", "exif_8"])
def test_exif_rotated_frames_come_out_upright(name: str, backend: str) -> None:
    # The stored picture is landscape; rotated the other way round it must NOT match.
    s = corpus()[name]
    stored = render_frame(22, 4000, 3000)
    upright = stored.transpose(Image.Transpose.ROTATE_270 if name == "exif_6" else Image.Transpose.ROTATE_90)
    wrong = stored.transpose(Image.Transpose.ROTATE_90 if name == "exif_6" else Image.Transpose.ROTATE_270)
    got = render_pixels(s.data, SETTINGS, backend=backend)
    assert got.shape == (720, 540, 3)
    ok = diff(got, as_hwc(upright.resize((540, 720), Image.Resampling.LANCZOS)))
    bad = diff(got, as_hwc(wrong.resize((540, 720), Image.Resampling.LANCZOS)))
    assert ok[0] < 3 < bad[0], (ok, bad)


def test_cmyk_without_a_profile_is_not_read_naively_by_libvips() -> None:
    # libvips reads a profile-less CMYK frame through its built-in CMYK profile: the result is the
    # ICC reference, far from Pillow's naive formula (so the check above can tell them apart).
    if "vips" not in available_backends():
        pytest.fail("pyvips not importable: pyvips and pyvips-binary are dependencies")
    s = corpus()["cmyk_plain"]
    got = render_pixels(s.data, SETTINGS, backend="vips")
    assert diff(got, s.expected)[0] < 1.5
    assert diff(got, reference(s.data))[0] > 10


@pytest.mark.parametrize("profile_space", ["CMYK", "RGB"])
def test_a_profile_that_does_not_fit_the_pixels_is_dropped(backend: str, profile_space: str) -> None:
    rgb = render_frame(3, 1920, 1080)
    if profile_space == "CMYK":
        data, bands = with_icc(jpeg(rgb), cmyk_profile()), 3  # RGB pixels, CMYK profile
    else:
        from PIL import ImageCms
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        data, bands = with_icc(jpeg(rgb.convert("L")), srgb), 1  # grey pixels, RGB profile
    out = resize_frame(data, SETTINGS, backend=backend)
    im = Image.open(io.BytesIO(out.data or b""))
    assert len(im.getbands()) == bands and "icc_profile" not in im.info


def test_a_fitting_rgb_profile_is_kept(backend: str) -> None:
    import pyvips

    p3 = bytes(pyvips.Image.black(8, 8, bands=3).copy(interpretation="srgb").icc_export(output_profile="p3")
               .get("icc-profile-data"))
    assert icc.colour_space(p3) == "RGB"
    out = resize_frame(with_icc(jpeg(render_frame(4, 1920, 1080)), p3), SETTINGS, backend=backend)
    assert Image.open(io.BytesIO(out.data or b"")).info.get("icc_profile") == p3


def test_every_corpus_frame_through_resize_file(tmp_path: Path) -> None:
    # resize_file (what `xdc resize file` calls) runs in the contained child: same results.
    for name in NAMES:
        s = corpus()[name]
        src = tmp_path / f"{name}.{'png' if name.startswith('png') else 'jpg'}"
        src.write_bytes(s.data)
        out = resize_file(src, tmp_path / "out" / f"{name}.jpg", SETTINGS)
        im = Image.open(tmp_path / "out" / f"{name}.jpg")
        assert im.size == s.size == (out.width, out.height), name
        assert diff(as_hwc(im), expected_for(name, "vips"))[0] <= 7, name


def test_the_cmyk_jpeg_that_crashed_libvips(tmp_path: Path) -> None:
    # Issue 15: this frame (naive CMYK, no profile, as Pillow writes it) killed `xdc resize file`
    # with SIGSEGV in jpegsave_buffer: colourspace("srgb") left libvips' CMYK profile on the sRGB
    # pixels. Before the fix it died in every fresh child tried (3 of 3); an in-process run
    # depended on the heap, hence the fresh child here, as the CLI has.
    src = tmp_path / "cmyk.jpg"
    render_frame(1, 1920, 1080).convert("CMYK").save(src, "JPEG", quality=90)
    with Sandbox("resize.frame:resize_path") as fresh:
        out: ResizedFrame = fresh.call((str(src), SETTINGS, None), label=str(src))
    im = Image.open(io.BytesIO(out.data or b""))
    assert (im.mode, im.size, "icc_profile" in im.info) == ("RGB", (1280, 720), False)
    exp = reference(src.read_bytes(), cmyk_fallback=cmyk_profile())
    mad, psnr, cast = diff(as_hwc(im), exp)
    assert mad <= 7 and psnr >= 29 and cast <= 2, (mad, psnr, cast)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header_only", "srgb_on_cmyk"])
def test_a_broken_profile_on_a_cmyk_frame_is_ignored(backend: str, box: Sandbox, damage: str) -> None:
    # Hostile or damaged ICC data: the frame still resizes, as if it had no profile (libvips: its
    # own CMYK profile; Pillow's backend: the naive formula), never inverted, nothing kept.
    from PIL import ImageCms
    p = cmyk_profile()
    profile = {"garbage": b"not a profile" * 40, "truncated": p[:2000], "header_only": p[:128] + bytes(1000),
               "srgb_on_cmyk": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()}[damage]
    cmyk = render_frame(6, 1920, 1080).convert("CMYK")
    plain = jpeg(cmyk)
    out: ResizedFrame = box.call((with_icc(plain, profile), SETTINGS, backend), label=damage)
    im = Image.open(io.BytesIO(out.data or b""))
    assert (im.mode, im.size, "icc_profile" in im.info) == ("RGB", (1280, 720), False)
    exp = reference(plain) if backend == "pillow" else reference(plain, cmyk_fallback=p)
    mad, psnr, cast = diff(as_hwc(im), exp)
    assert mad <= 7 and psnr >= 29 and cast <= 2, (mad, psnr, cast)
