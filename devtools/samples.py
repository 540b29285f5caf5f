"""Synthetic, photo-like camera frames and lidar sweeps for the demo, the tests and the benches.

Frames are not flat colour: a sky gradient, textured ground, a road with lane marks, buildings
with lit windows, blobs, and per-pixel sensor noise, so that JPEG sizes and resize costs are close
to real 4K camera frames (~2-3 MB at q90). Everything is deterministic per seed.

Speed matters (the demo writes hundreds of 4K frames on 2 cores): the scene is drawn at 480x270,
upscaled in two cheap steps, and the noise is one small random tile pasted over the frame and
added with wrap-around arithmetic (the scene is kept away from 0 and 255 so nothing wraps).
"""
from __future__ import annotations

import io
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

_SCENE = (480, 270)  # drawn at this size, then upscaled
_NOISE_TILE = 256
_NOISE_AMPLITUDE = 13  # +-; with _MARGIN the additions never wrap around
_MARGIN = 14
LIDAR_DTYPE = np.dtype("<f4")  # KITTI velodyne .bin: x, y, z, intensity as little-endian float32


def make_frame(seed: int, width: int = 3840, height: int = 2160, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """Encode one synthetic camera frame (``fmt`` "jpeg" or "png") of ``width`` x ``height``."""
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"fmt must be 'jpeg' or 'png', not {fmt!r}")
    image = render_frame(seed, width, height)
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, "PNG", compress_level=1)  # fast; sizes are still ~4x a q90 JPEG
    return buf.getvalue()


def render_frame(seed: int, width: int = 3840, height: int = 2160) -> Image.Image:
    """The RGB pixels of ``make_frame`` before encoding."""
    rng = np.random.default_rng(seed)
    scene = _draw_scene(rng)
    # Two-step upscale: bicubic to half size, nearest 2x (7 ms instead of 80 for one bicubic);
    # the 2x2 blocks disappear under the sensor noise.
    half = scene.resize((max(1, (width + 1) // 2), max(1, (height + 1) // 2)), Image.Resampling.BICUBIC)
    big = half.resize((width, height), Image.Resampling.NEAREST)
    return ImageChops.add_modulo(big, _noise_layer(rng, width, height))


def _draw_scene(rng: np.random.Generator) -> Image.Image:
    w, h = _SCENE
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    horizon = 0.42 + 0.12 * rng.random()
    sky_top = np.array([40, 90, 170]) + rng.integers(-25, 25, 3)
    sky_bottom = np.array([175, 200, 230]) + rng.integers(-25, 25, 3)
    t = np.clip(y / horizon, 0.0, 1.0)
    sky = sky_top * (1 - t) + sky_bottom * t  # (h, 1, 3)

    # Ground: smooth noise at three scales, tinted.
    texture = np.zeros((h, w), np.float32)
    for cells, amplitude in ((8, 35.0), (32, 22.0), (120, 14.0)):
        coarse = rng.standard_normal((max(2, h * cells // w + 2), cells + 2)).astype(np.float32)
        texture += amplitude * np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.Resampling.BICUBIC))
    ground_colour = np.array([95, 88, 70]) + rng.integers(-25, 25, 3)
    ground = ground_colour + texture[..., None] * np.array([1.0, 0.9, 0.7], np.float32)
    pixels = np.where(y >= horizon, ground, np.broadcast_to(sky, (h, w, 3)))
    # Clouds: a few soft brightenings of the sky.
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.random() * w, rng.random() * horizon * h, 20 + 40 * rng.random()
        xx = np.arange(w, dtype=np.float32)[None, :]
        yy = np.arange(h, dtype=np.float32)[:, None]
        blob = np.exp(-(((xx - cx) / (2.5 * r)) ** 2 + ((yy - cy) / r) ** 2))[..., None]
        pixels = np.where(y < horizon, pixels + 60 * blob, pixels)
    image = Image.fromarray(np.clip(pixels, _MARGIN, 255 - _MARGIN).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    hy = int(horizon * h)
    colour = lambda lo, hi: tuple(int(v) for v in rng.integers(lo, hi, 3))  # noqa: E731
    for _ in range(int(rng.integers(6, 14))):  # buildings with lit windows
        bw, bh = int(rng.integers(15, 80)), int(rng.integers(10, 120))
        bx = int(rng.integers(0, w - bw))
        draw.rectangle([bx, hy - bh, bx + bw, hy + int(rng.integers(0, 10))], fill=colour(30, 220))
        for _ in range(int(rng.integers(0, 8))):
            wx, wy = bx + int(rng.integers(0, bw)), hy - int(rng.integers(0, bh))
            draw.rectangle([wx, wy, wx + 3, wy + 3], fill=(230, 220, 150))
    draw.polygon([(w * 0.35, h), (w * 0.65, h), (w * 0.52, hy), (w * 0.48, hy)], fill=(62, 62, 66))
    for k in range(6):  # dashed centre line, thinner towards the horizon
        near, far = h - (h - hy) * k / 6, h - (h - hy) * (k + 0.5) / 6
        draw.line([(w / 2, near), (w / 2, far)], fill=(230, 230, 225), width=max(1, int(4 * (1 - k / 6))))
    for _ in range(int(rng.integers(2, 6))):  # cars, bushes
        r = int(rng.integers(6, 30))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(hy, h))
        draw.ellipse([cx - r, cy - r // 2, cx + r, cy + r // 2], fill=colour(20, 140))
    return image


def _noise_layer(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Uniform noise in [-A, A] as int8, viewed as uint8 (= value mod 256) so add_modulo adds it signed.
    a = _NOISE_AMPLITUDE
    noise = rng.integers(-a, a + 1, (_NOISE_TILE, _NOISE_TILE, 3), dtype=np.int8)
    tile = Image.fromarray(noise.view(np.uint8), "RGB")
    layer = Image.new("RGB", (width, height))
    for top in range(0, height, _NOISE_TILE):
        for left in range(0, width, _NOISE_TILE):
            layer.paste(tile, (left, top))
    return layer


def make_lidar(seed: int, points: int = 100_000) -> bytes:
    """One lidar sweep as a KITTI-style .bin: ``points`` rows of float32 (x, y, z, intensity)."""
    rng = np.random.default_rng(seed)
    n_ground = points * 6 // 10
    n_objects = points - n_ground
    # Ground returns: rings around the sensor (64 beams), denser close by.
    ring = rng.integers(0, 64, n_ground)
    rng_m = 3.0 + ring * 1.2 + rng.normal(0, 0.05, n_ground)
    az = rng.uniform(-np.pi, np.pi, n_ground)
    ground = np.stack(
        [rng_m * np.cos(az), rng_m * np.sin(az), -1.73 + rng.normal(0, 0.03, n_ground), rng.uniform(0.0, 0.4, n_ground)],
        axis=1,
    )
    # Objects: boxes (cars, walls) sampled on their surfaces.
    boxes = rng.uniform([-40, -40, -1.7, 1.5, 1.5, 1.2], [40, 40, -1.5, 6.0, 3.0, 3.5], (12, 6))
    which = rng.integers(0, len(boxes), n_objects)
    b = boxes[which]
    u = rng.uniform(-0.5, 0.5, (n_objects, 3))
    face = rng.integers(0, 3, n_objects)
    u[np.arange(n_objects), face] = np.sign(u[np.arange(n_objects), face]) * 0.5  # snap to a face
    objects = np.stack(
        [b[:, 0] + u[:, 0] * b[:, 3], b[:, 1] + u[:, 1] * b[:, 4], b[:, 2] + (u[:, 2] + 0.5) * b[:, 5], rng.uniform(0.1, 1.0, n_objects)],
        axis=1,
    )
    cloud = np.concatenate([ground, objects]).astype(LIDAR_DTYPE)
    return cloud.tobytes()


def _write_frame(path: Path, seed: int) -> Path:
    path.write_bytes(make_frame(seed))
    return path


def _write_lidar(path: Path, seed: int) -> Path:
    path.write_bytes(make_lidar(seed))
    return path


def write_samples(
    dir: Path, frames: int, lidar: int, seed: int = 0, progress: Callable[[Path], None] | None = None
) -> list[Path]:
    """Write ``frames`` 4K JPEGs (frames/cam0_000000.jpg ...) and ``lidar`` sweeps (lidar/000000.bin ...).

    Frame ``i`` uses seed ``seed + i``; lidar sweep ``i`` uses ``seed + 1_000_000 + i``. ``progress`` is
    called with each path written. More than 8 frames are made by a pool of 2 processes.
    """
    dir = Path(dir)
    jobs: list[tuple[Callable[[Path, int], Path], Path, int]] = []
    if frames:
        (dir / "frames").mkdir(parents=True, exist_ok=True)
        jobs += [(_write_frame, dir / "frames" / f"cam0_{i:06d}.jpg", seed + i) for i in range(frames)]
    if lidar:
        (dir / "lidar").mkdir(parents=True, exist_ok=True)
        jobs += [(_write_lidar, dir / "lidar" / f"{i:06d}.bin", seed + 1_000_000 + i) for i in range(lidar)]
    if frames <= 8:
        written = []
        for fn, path, s in jobs:
            written.append(fn(path, s))
            if progress:
                progress(path)
        return written
    # spawn, not fork: the caller may have threads (Kafka clients, thread pools) running.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, path, s) for fn, path, s in jobs]
        written = []
        for fut in futures:  # in order, so the returned list matches the names
            written.append(fut.result())
            if progress:
                progress(written[-1])
    return written
