"""Resize bench (run by hand): 4K camera frames -> 720p, the pipeline against a baseline and the floor.

    .venv/bin/python bench/resize.py [--frames 20] [--rounds 2]

Frames are photo-like synthetic 4K q90 JPEGs (xdc.samples.make_frame), made in this run. Prints,
per frame (CPU ms, one thread; libvips is single-threaded per process here):
  (a) baseline   Pillow full decode + LANCZOS + q90 4:2:0 encode
  (b) pipeline   resize.frame.resize_frame (default backend; the Pillow fallback on its own line)
  (c) opencv     IMREAD_REDUCED_COLOR_2 + INTER_AREA + imencode (the fastest reduced decode here)
  floor          half-scale decode + resize + encode, each piece measured on its own (the best
                 decoder of libvips / OpenCV)
with ratios vs the baseline and vs the floor; frames/s of resize_frame on 1 and 2 processes and
the scaling; PSNR of the pipeline's pixels before encoding (and of its final JPEG) vs the baseline's
full-decode LANCZOS pixels; one line for a 4K PNG. Goals: JPEG <= 1.1x the floor, >= 1.8x on 2
processes, PSNR >= 40 dB.

Containment (resize/sandbox.py: native work in a resident child, so a crash costs the child only),
wall ms per frame against the same work in-process, measured in the same run: resize_frame vs a
Sandbox call (frame bytes over a pipe), resize_file in-process vs contained (the CLI's path: only
the file name goes over), the cost of starting one child (what a process per frame would pay), and
frames/s of the worker's SandboxPool on 2 children vs the plain 2-process pool above.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from resize.frame import available_backends, default_backend, render_pixels, resize_frame  # noqa: E402
from xdc.config import ResizeSettings  # noqa: E402
from xdc.samples import make_frame  # noqa: E402

SETTINGS = ResizeSettings(bucket="frames")
BOX = (SETTINGS.width, SETTINGS.height)
FLOOR_FACTS_MS = 36.0  # facts/resize.md: 27.9 half decode + 5.8 resize + 2.5 encode


def cpu_ms(fn: Callable[[bytes], Any], frames: list[bytes], rounds: int) -> float:
    """Median over rounds of the mean CPU ms per frame."""
    fn(frames[0])  # warm up (imports, libvips init)
    per_round = []
    for _ in range(rounds):
        t = time.process_time()
        for f in frames:
            fn(f)
        per_round.append((time.process_time() - t) * 1000 / len(frames))
    return float(np.median(per_round))


def pillow_reference(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im.resize(BOX, Image.Resampling.LANCZOS)


def baseline(data: bytes) -> bytes:
    buf = io.BytesIO()
    pillow_reference(data).save(buf, "JPEG", quality=90, subsampling="4:2:0")
    return buf.getvalue()


def opencv(data: bytes) -> bytes:
    import cv2

    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    small = cv2.resize(a, BOX, interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def opencv_pixels(data: bytes) -> np.ndarray:
    import cv2

    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    return cv2.cvtColor(cv2.resize(a, BOX, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def floor_pieces(frames: list[bytes], rounds: int) -> dict[str, float]:
    """Half-scale decode, resize and encode, each timed alone."""
    import cv2
    import pyvips

    out: dict[str, float] = {}
    out["decode 1/2 libvips"] = cpu_ms(
        lambda d: pyvips.Image.jpegload_buffer(d, shrink=2).copy_memory(), frames, rounds)
    out["decode 1/2 opencv"] = cpu_ms(
        lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_REDUCED_COLOR_2), frames, rounds)
    halves = [pyvips.Image.jpegload_buffer(d, shrink=2).copy_memory() for d in frames[:4]]
    it = iter(range(10**9))
    out["resize 1920->1280 lanczos3"] = cpu_ms(
        lambda _: halves[next(it) % len(halves)].resize(2 / 3, kernel="lanczos3").copy_memory(), frames, rounds)
    smalls = [h.resize(2 / 3, kernel="lanczos3").copy_memory() for h in halves]
    out["encode 720p q90 4:2:0"] = cpu_ms(
        lambda _: smalls[next(it) % len(smalls)].jpegsave_buffer(Q=90, subsample_mode="on"), frames, rounds)
    return out


# -- throughput on N processes ----------------------------------------------------------------
_FRAMES: list[bytes] = []


def _init(frames: list[bytes]) -> None:
    _FRAMES[:] = frames
    resize_frame(frames[0], SETTINGS)  # warm up before the clock starts


def _work(i: int) -> int:
    out = resize_frame(_FRAMES[i % len(_FRAMES)], SETTINGS)
    return len(out.data or b"")


def frames_per_second(frames: list[bytes], procs: int, total: int) -> float:
    with mp.get_context("spawn").Pool(procs, _init, (frames,)) as pool:
        pool.map(_work, range(procs * 2), chunksize=1)  # every worker up and warm
        t = time.perf_counter()
        pool.map(_work, range(total), chunksize=2)
        return total / (time.perf_counter() - t)


def wall_ms(fn: Callable[[Any], Any], items: list[Any], rounds: int) -> float:
    """Median over rounds of the mean wall ms per item (a child's CPU is not the caller's)."""
    fn(items[0])
    per_round = []
    for _ in range(rounds):
        t = time.perf_counter()
        for it in items:
            fn(it)
        per_round.append((time.perf_counter() - t) * 1000 / len(items))
    return float(np.median(per_round))


def containment(frames: list[bytes], rounds: int, two_proc_fps: float) -> None:
    import tempfile

    from resize.frame import resize_file
    from resize.sandbox import Sandbox, SandboxPool

    print("\ncontainment (wall ms/frame, 1 frame at a time; ratios against in-process in this run)")
    t = time.perf_counter()
    with Sandbox("resize.frame:resize_bytes") as box:
        box.start()
        start_ms = (time.perf_counter() - t) * 1000
        inproc = wall_ms(lambda d: resize_frame(d, SETTINGS), frames, rounds)
        boxed = wall_ms(lambda d: box.call((d, SETTINGS, None), label="bench"), frames, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, f in enumerate(frames):
            paths.append(Path(tmp, f"{i}.jpg"))
            paths[-1].write_bytes(f)
        out = Path(tmp, "out.jpg")
        file_in = wall_ms(lambda p: resize_file(p, out, SETTINGS, contained=False), paths, rounds)
        file_box = wall_ms(lambda p: resize_file(p, out, SETTINGS), paths, rounds)
    print(f"  resize_frame in-process {inproc:6.1f} ms   in a resident child (bytes piped) {boxed:6.1f} ms"
          f"   {boxed / inproc:.3f}x ({boxed - inproc:+.1f} ms)")
    print(f"  resize_file  in-process {file_in:6.1f} ms   contained (CLI path)               {file_box:6.1f} ms"
          f"   {file_box / file_in:.3f}x ({file_box - file_in:+.1f} ms)")
    print(f"  starting one child (spawn + imports) {start_ms:.0f} ms = {start_ms / inproc:.1f} frames' work:"
          " why the child is resident, not one per frame")
    # The worker's pool against the plain one, same work (frames preloaded, an index goes over),
    # alternated so a change in the machine's load hits both
    total = max(40, 4 * len(frames))
    runs: dict[str, list[float]] = {"plain": [two_proc_fps], "sandbox": []}
    with SandboxPool(2, "bench.resize:_work", initializer="bench.resize:_init", initargs=(frames,)) as pool:
        pool.start()
        for f in [pool.submit(i, label="warm") for i in range(4)]:
            f.result()
        for rep in range(3):
            t = time.perf_counter()
            for f in [pool.submit(i, label="bench") for i in range(total)]:
                f.result()
            runs["sandbox"].append(total / (time.perf_counter() - t))
            if rep < 2:
                runs["plain"].append(frames_per_second(frames, 2, total))
    plain, boxed_fps = (float(np.median(v)) for v in (runs["plain"], runs["sandbox"]))
    print(f"  2 processes, {total} frames x3, median: SandboxPool (the worker's) {boxed_fps:.1f} f/s,"
          f" plain process pool {plain:.1f} f/s: {boxed_fps / plain:.2f}x"
          f"  (runs {[round(x, 1) for x in runs['sandbox']]} vs {[round(x, 1) for x in runs['plain']]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20, help="distinct 4K frames (default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the frames per method (median)")
    args = ap.parse_args()

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; backend {default_backend()};"
          f" available {available_backends()}")
    t = time.perf_counter()
    frames = [make_frame(seed) for seed in range(args.frames)]
    print(f"made {len(frames)} 4K q90 frames in {time.perf_counter() - t:.1f}s,"
          f" mean {np.mean([len(f) for f in frames]) / 1e6:.2f} MB")

    base = cpu_ms(baseline, frames, args.rounds)
    pipe = cpu_ms(lambda d: resize_frame(d, SETTINGS), frames, args.rounds)
    pil = cpu_ms(lambda d: resize_frame(d, SETTINGS, backend="pillow"), frames, args.rounds)
    cv = cpu_ms(opencv, frames, args.rounds)
    pieces = floor_pieces(frames, args.rounds)
    floor = min(pieces["decode 1/2 libvips"], pieces["decode 1/2 opencv"]) + pieces["resize 1920->1280 lanczos3"] \
        + pieces["encode 720p q90 4:2:0"]

    print("\nJPEG 3840x2160 -> 1280x720, CPU ms/frame (1 thread)")
    rows = [("(a) baseline Pillow full decode + LANCZOS", base),
            (f"(b) resize_frame [{default_backend()}]", pipe),
            ("    resize_frame [pillow fallback]", pil),
            ("(c) OpenCV REDUCED_COLOR_2 + INTER_AREA", cv),
            ("floor (measured: best 1/2 decode + resize + encode)", floor)]
    for name, ms in rows:
        print(f"  {name:55s} {ms:7.1f} ms   {base / ms:5.2f}x faster than baseline   {ms / floor:5.2f}x floor")
    for name, ms in pieces.items():
        print(f"      floor piece: {name:34s} {ms:6.1f} ms")
    print(f"  resize_frame vs measured floor {pipe / floor:.2f}x (goal <= 1.1), vs facts floor {FLOOR_FACTS_MS:.0f} ms:"
          f" {pipe / FLOOR_FACTS_MS:.2f}x")

    ref = [np.asarray(pillow_reference(f)) for f in frames[:5]]
    pre = np.mean([psnr(render_pixels(f, SETTINGS), r) for f, r in zip(frames, ref)])
    final = np.mean([psnr(np.asarray(Image.open(io.BytesIO(resize_frame(f, SETTINGS).data or b""))), r)
                     for f, r in zip(frames, ref)])
    pil_pre = np.mean([psnr(render_pixels(f, SETTINGS, backend="pillow"), r) for f, r in zip(frames, ref)])
    cv_pre = np.mean([psnr(opencv_pixels(f), r) for f, r in zip(frames, ref)])
    print(f"\nPSNR vs Pillow full-decode LANCZOS pixels (5 frames): resize_frame pixels {pre:.1f} dB (goal >= 40),"
          f" its q90 JPEG {final:.1f} dB; pillow fallback pixels {pil_pre:.1f} dB; OpenCV pixels {cv_pre:.1f} dB")

    total = max(40, 4 * len(frames))
    one = frames_per_second(frames, 1, total)
    two = frames_per_second(frames, 2, total)
    print(f"\nthroughput resize_frame ({total} frames, wall clock): 1 process {one:.1f} f/s, 2 processes {two:.1f} f/s,"
          f" scaling {two / one:.2f}x (goal >= 1.8)")

    containment(frames, args.rounds, two)

    png = make_frame(0, fmt="png")
    png_base = cpu_ms(baseline, [png], args.rounds)
    png_pipe = cpu_ms(lambda d: resize_frame(d, SETTINGS), [png], args.rounds)
    out = resize_frame(png, SETTINGS)
    print(f"\nPNG 3840x2160 ({len(png) / 1e6:.1f} MB) -> 720p {out.format} ({len(out.data or b'') / 1e6:.2f} MB):"
          f" baseline {png_base:.0f} ms, resize_frame {png_pipe:.0f} ms, {png_base / png_pipe:.2f}x faster")


if __name__ == "__main__":
    main()
