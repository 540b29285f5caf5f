"""devtools.samples: deterministic, photo-like frames and KITTI-style lidar sweeps."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.samples import LIDAR_DTYPE, make_frame, make_lidar, write_samples


def test_frames_are_deterministic_per_seed() -> None:
    assert make_frame(3, 640, 360) == make_frame(3, 640, 360)
    assert make_frame(3, 640, 360) != make_frame(4, 640, 360)


def test_4k_frame_looks_like_a_photograph() -> None:
    data = make_frame(11)
    assert 1.8e6 <= len(data) <= 4.5e6  # real 4K q90 camera frames are ~2-4 MB
    im = Image.open(io.BytesIO(data))
    assert (im.format, im.size, im.mode) == ("JPEG", (3840, 2160), "RGB")
    a = np.asarray(im.reduce(4)).astype(np.float64)
    assert a.std() > 30  # not flat colour
    top, bottom = a[: a.shape[0] // 5], a[-a.shape[0] // 5 :]
    assert top[..., 2].mean() > top[..., 0].mean()  # a blue sky above the ground
    assert abs(top.mean() - bottom.mean()) > 10
    # Fine detail everywhere (sensor noise): neighbouring pixels differ in every region.
    full = np.asarray(im.crop((0, 0, 512, 512))).astype(np.int16)
    assert np.abs(np.diff(full, axis=1)).mean() > 2


def test_png_frame_and_small_sizes() -> None:
    im = Image.open(io.BytesIO(make_frame(1, 320, 181, fmt="png")))
    assert (im.format, im.size) == ("PNG", (320, 181))


def test_lidar_is_a_kitti_style_point_cloud() -> None:
    data = make_lidar(2, points=10_000)
    assert data == make_lidar(2, points=10_000) != make_lidar(3, points=10_000)
    cloud = np.frombuffer(data, LIDAR_DTYPE).reshape(-1, 4)
    assert cloud.shape == (10_000, 4)
    assert np.isfinite(cloud).all()
    assert cloud[:, 2].min() < -1.5 and cloud[:, 2].max() > 0  # ground and objects
    assert 0 <= cloud[:, 3].min() and cloud[:, 3].max() <= 1


def test_write_samples(tmp_path: Path) -> None:
    seen: list[Path] = []
    paths = write_samples(tmp_path, frames=2, lidar=2, seed=5, progress=seen.append)
    names = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert names == ["frames/cam0_000000.jpg", "frames/cam0_000001.jpg", "lidar/000000.bin", "lidar/000001.bin"]
    assert seen == paths
    assert paths[0].read_bytes() == make_frame(5)
    assert paths[3].read_bytes() == make_lidar(1_000_006)


@pytest.mark.slow
def test_write_samples_with_a_process_pool(tmp_path: Path) -> None:
    paths = write_samples(tmp_path, frames=9, lidar=1, seed=0)
    assert len(paths) == 10 and all(p.stat().st_size > 0 for p in paths)
    assert paths[8].read_bytes() == make_frame(8)
