"""Resize bench (run by hand): 4K camera frames -> 720p, the pipeline against a baseline and the floor.

    .venv/bin/python bench/resize.py [--frames 20] [--rounds 2]

Frames are photo-like synthetic 4K q90 JPEGs (devtools.samples.make_frame), made in this run. Prints,
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

Containment (resize/sandbox.py: native work in a resident child, so a crash costs the child only;
`--only-containment` for just these lines): the same work in-process and contained, back to back
per frame, as CPU ms (caller + child: what containment costs whatever the machine's load) and the
median wall ratio: resize_frame vs a Sandbox call (frame bytes over a pipe), resize_file in-process
vs contained (the CLI's path: only the file name goes over); the cost of starting one child (what a
process per frame would pay); f/s and CPU of the worker's SandboxPool on 2 children vs a plain
2-process pool doing the same work.
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

from devtools.samples import make_frame  # noqa: E402
from resize.frame import (  # noqa: E402
    available_backends,
    default_backend,
    render_pixels,
    resize_frame,
)
from xdc.config import ResizeSettings  # noqa: E402

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


def _proc_cpu_s(pid: int | None) -> float:
    """utime + stime of a live process we started (from /proc: a child not yet waited for)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _paired(direct: Callable[[Any], Any], boxed: Callable[[Any], Any], pid: Callable[[], int | None],
            items: list[Any], rounds: int) -> tuple[float, float, float]:
    """CPU ms/item in-process, CPU ms/item contained (caller + child), median wall ratio per item.

    Each item is run both ways back to back, in alternating order, so a change in the machine's
    load hits both; CPU time is what the containment costs whatever the load.
    """
    direct(items[0])
    boxed(items[0])
    cpu_d = cpu_b = 0.0
    ratios = []
    for r in range(rounds):
        for i, it in enumerate(items):
            walls = {}
            for kind in (("d", "b") if (i + r) % 2 == 0 else ("b", "d")):
                child = pid()
                c0, k0, t0 = time.process_time(), _proc_cpu_s(child), time.perf_counter()
                (direct if kind == "d" else boxed)(it)
                walls[kind] = time.perf_counter() - t0
                used = time.process_time() - c0 + (_proc_cpu_s(child) - k0 if kind == "b" else 0.0)
                if kind == "d":
                    cpu_d += used
                else:
                    cpu_b += used
            ratios.append(walls["b"] / walls["d"])
    n = rounds * len(items)
    return cpu_d * 1000 / n, cpu_b * 1000 / n, float(np.median(ratios))


def _pool_run(kind: str, frames: list[bytes], total: int) -> tuple[float, float]:
    """frames/s (wall) and CPU ms/frame (caller + its children, start-up included) of one pool's
    whole life: start, warm up, ``total`` frames, stop."""
    import resource

    from resize.sandbox import SandboxPool

    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    c0 = cpu()
    if kind == "plain":
        with mp.get_context("spawn").Pool(2, _init, (frames,)) as pool:
            pool.map(_work, range(4), chunksize=1)
            t = time.perf_counter()
            pool.map(_work, range(total), chunksize=2)
            wall = time.perf_counter() - t
            pool.close()
            pool.join()
    else:
        with SandboxPool(2, "bench.resize:_work", initializer="bench.resize:_init", initargs=(frames,)) as sp:
            for f in [sp.submit(i, label="warm") for i in range(4)]:
                f.result()
            t = time.perf_counter()
            for f in [sp.submit(i, label="bench") for i in range(total)]:
                f.result()
            wall = time.perf_counter() - t
    return total / wall, (cpu() - c0) * 1000 / total


def containment(frames: list[bytes], rounds: int) -> None:
    import tempfile

    from resize.frame import resize_file
    from resize.sandbox import Sandbox, shared_sandbox

    print("\ncontainment: the same work in-process and in a resident child, back to back per frame")
    t = time.perf_counter()
    with Sandbox("resize.frame:resize_bytes") as box:
        box.start()
        start_ms = (time.perf_counter() - t) * 1000
        fr = _paired(lambda d: resize_frame(d, SETTINGS), lambda d: box.call((d, SETTINGS, None), label="bench"),
                     lambda: box.pid, frames, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, f in enumerate(frames):
            paths.append(Path(tmp, f"{i}.jpg"))
            paths[-1].write_bytes(f)
        out = Path(tmp, "out.jpg")
        shared_sandbox().start()
        fi = _paired(lambda p: resize_file(p, out, SETTINGS, contained=False), lambda p: resize_file(p, out, SETTINGS),
                     lambda: shared_sandbox().pid, paths, rounds)
    for name, (d, b, ratio) in (("resize_frame, frame bytes piped", fr), ("resize_file (the CLI's path)", fi)):
        print(f"  {name:34s} CPU {d:6.1f} ms in-process, {b:6.1f} ms contained ({b - d:+5.1f} ms, {b / d:.3f}x);"
              f" wall median ratio {ratio:.3f}x")
    print(f"  starting one child (spawn + imports): {start_ms:.0f} ms wall = {start_ms / fr[0]:.1f} frames' CPU:"
          " why the child is resident, not one per frame")
    # The worker's pool against a plain process pool, same work (frames preloaded, an index goes
    # over), each pool's whole life, alternated so a change in the machine's load hits both
    total = max(40, 4 * len(frames))
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "sandbox": []}
    for _ in range(2):
        for kind in ("plain", "sandbox"):
            runs[kind].append(_pool_run(kind, frames, total))
    med = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in runs.items()}
    print(f"  2 processes x {total} frames (x2 each): SandboxPool (the worker's) {med['sandbox'][0]:.1f} f/s,"
          f" {med['sandbox'][1]:.1f} CPU ms/frame; plain process pool {med['plain'][0]:.1f} f/s,"
          f" {med['plain'][1]:.1f} CPU ms/frame: {med['sandbox'][0] / med['plain'][0]:.2f}x f/s,"
          f" {med['sandbox'][1] / med['plain'][1]:.2f}x CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20, help="distinct 4K frames (default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the frames per method (median)")
    ap.add_argument("--only-containment", action="store_true", help="only the containment lines")
    args = ap.parse_args()

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; backend {default_backend()};"
          f" available {available_backends()}")
    t = time.perf_counter()
    frames = [make_frame(seed) for seed in range(args.frames)]
    print(f"made {len(frames)} 4K q90 frames in {time.perf_counter() - t:.1f}s,"
          f" mean {np.mean([len(f) for f in frames]) / 1e6:.2f} MB")
    if args.only_containment:
        containment(frames, args.rounds)
        return

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

    containment(frames, args.rounds)

    png = make_frame(0, fmt="png")
    png_base = cpu_ms(baseline, [png], args.rounds)
    png_pipe = cpu_ms(lambda d: resize_frame(d, SETTINGS), [png], args.rounds)
    out = resize_frame(png, SETTINGS)
    print(f"\nPNG 3840x2160 ({len(png) / 1e6:.1f} MB) -> 720p {out.format} ({len(out.data or b'') / 1e6:.2f} MB):"
          f" baseline {png_base:.0f} ms, resize_frame {png_pipe:.0f} ms, {png_base / png_pipe:.2f}x faster")


if __name__ == "__main__":
    main()
