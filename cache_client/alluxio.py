"""Alluxio 2.9 cache cluster: the workers are the nodes, Alluxio's own REST interfaces do the work.

A node is one Alluxio worker (config: `worker: host:rpc_port`); a file is the Alluxio path
/<bucket_root>/<bucket>/<key> (each S3 bucket mounted at /<bucket>, see devtools/alluxio.py).
How each operation is done, and why (measured on 2.9.6):

- stat / cached bytes: the proxy's `list-status` of a directory (when the list has several files
  there) or `get-status` per file. Each status carries `fileBlockInfos`: every block's exact
  length and the workers holding it, so a node's cached bytes of a file are the sum of its blocks'
  lengths on that worker, exact to the byte (not `inAlluxioPercentage`, which is rounded).
  The cluster runs with metadata sync interval 0: a status call sees S3 as it is now.
- warm: load jobs on the job master (`/api/v1/master/job/run`), `directCache`: the job worker
  sends a cache request to the chosen worker, which reads the block from S3 (or from a worker
  that has it). Alluxio places blocks itself; the job's `replication` counts every worker
  holding a block. So:
    * a file every node should hold (replicate placement, or one worker): a batched load with
      replication = number of workers, no worker named; this never over-asks and is idempotent;
    * a file one node should hold (shard placement): a load with `workerSet` = that worker's host
      and replication = (workers holding the block now) + 1, one file per job (a batch cannot
      carry a worker set: its configs are string maps). Loads of one file are serialised here so
      that count cannot go stale under our own feet; blocks of a file held by different numbers
      of workers take one round per count.
  Progress: files when their job completes (jobs are kept small), bytes from the workers' used
  bytes on the master (polled) when they are ahead of the completed jobs.
- free: the proxy's `free` per file (Alluxio frees a file from every worker at once), then poll
  until no node holds a block of it: workers drop freed blocks on their next heartbeat. Then the
  freed files' metadata is dropped from Alluxio only (S3 untouched), so their blocks get new ids
  when loaded again: works around a race in 2.9.6's worker that can pin a block id as "being
  removed" forever, after which frees of that block are ignored (see `_forget_file`).
  `free` is therefore done for the whole cluster here (exact before/after per node), and
  `evict_node` frees the files that node holds.
- usage: the master's `/api/v1/master/info` (each worker's used and capacity bytes).
"""
from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cache_client.alluxio_rest import (
    AlluxioNotFound,
    AlluxioRest,
    FileView,
    WorkerAddress,
)
from cache_client.base import (
    CacheCluster,
    CacheFile,
    FreeReport,
    NodeWarmResult,
    ProgressFn,
    ProgressSink,
    Traced,
    WarmReport,
)
from cache_client.plan import Plan
from xdc.config import CacheConfig
from xdc.errors import CacheError

LIST_MIN_FILES_PER_DIR = 8  # below this, get-status per file is cheaper than listing the directory
STATUS_THREADS = 8
SURVEY_MEMO_SECONDS = 1.0  # stat + per-node cached bytes of one check share one survey
FREE_POLL_SECONDS = 0.2
FREE_AGAIN_SECONDS = 3.0  # still held this long after a free: free it again
PROGRESS_POLL_SECONDS = 0.5  # the master's info is ~70 KB of JSON: polled at 10 Hz it slowed a warm ~20 %


@dataclass(frozen=True)
class BlockPlace:
    """One block of a file and the nodes (workers) holding it, for reports."""

    block_id: int
    offset: int
    length: int
    nodes: tuple[str, ...]


class AlluxioCluster(CacheCluster):
    name = "alluxio"

    def __init__(self, cache: CacheConfig) -> None:
        super().__init__([n.name for n in cache.nodes], placement=cache.placement,
                         virtual_nodes=cache.virtual_nodes, threads_per_node=cache.threads_per_node,
                         watermarks={n.name: cache.watermarks(n.name) for n in cache.nodes})
        if cache.alluxio is None:
            raise CacheError("backend alluxio needs cache.alluxio (master, job_master, proxy)")
        self.config = cache
        self.settings = cache.alluxio
        self.rest = AlluxioRest(proxy=cache.alluxio.proxy, master=cache.alluxio.master,
                                job_master=cache.alluxio.job_master)
        self.worker_of: dict[str, WorkerAddress] = {n.name: WorkerAddress.parse(n.worker or "") for n in cache.nodes}
        self.node_of: dict[WorkerAddress, str] = {w: n for n, w in self.worker_of.items()}
        self._memo_lock = threading.Lock()
        self._memo: dict[str, tuple[float, FileView | None]] = {}
        self._file_locks: dict[str, threading.Lock] = {}

    # -- namespace survey ------------------------------------------------------------------------
    @staticmethod
    def alluxio_path(f: CacheFile) -> str:
        return "/" + f.path.lstrip("/")

    def _forget(self) -> None:
        with self._memo_lock:
            self._memo.clear()

    def views(self, files: Sequence[CacheFile], *, fresh: bool = False) -> dict[str, FileView | None]:
        """path -> the file's status in Alluxio (blocks and where they are), None if absent."""
        now = time.monotonic()
        out: dict[str, FileView | None] = {}
        todo: list[CacheFile] = []
        with self._memo_lock:
            for f in files:
                hit = None if fresh else self._memo.get(f.path)
                if hit is not None and now - hit[0] < SURVEY_MEMO_SECONDS:
                    out[f.path] = hit[1]
                else:
                    todo.append(f)
        if todo:
            got = self._survey_now(todo)
            with self._memo_lock:
                t = time.monotonic()
                for p, v in got.items():
                    self._memo[p] = (t, v)
            out.update(got)
        return out

    def _survey_now(self, files: Sequence[CacheFile]) -> dict[str, FileView | None]:
        by_dir: dict[str, list[CacheFile]] = {}
        for f in files:
            by_dir.setdefault(posixpath.dirname(self.alluxio_path(f)), []).append(f)
        listed = [d for d, fs in by_dir.items() if d != "/" and len(fs) >= LIST_MIN_FILES_PER_DIR]
        single = [f for d, fs in by_dir.items() if d not in listed for f in fs]
        out: dict[str, FileView | None] = {}

        def list_dir(d: str) -> dict[str, FileView | None]:
            try:
                found = {v.path: v for v in self.rest.list_status(d)}
            except AlluxioNotFound:
                found = {}
            return {f.path: _file_or_none(found.get(self.alluxio_path(f))) for f in by_dir[d]}

        def one(f: CacheFile) -> dict[str, FileView | None]:
            try:
                return {f.path: _file_or_none(self.rest.get_status(self.alluxio_path(f)))}
            except AlluxioNotFound:
                return {f.path: None}

        jobs: list[Callable[[], dict[str, FileView | None]]] = [lambda d=d: list_dir(d) for d in listed]
        jobs += [lambda f=f: one(f) for f in single]
        if len(jobs) == 1:
            out.update(jobs[0]())
        elif jobs:
            with ThreadPoolExecutor(max_workers=min(STATUS_THREADS, len(jobs)), thread_name_prefix="alluxio-stat") as pool:
                for got in pool.map(lambda j: j(), jobs):
                    out.update(got)
        return out

    def locations(self, files: Sequence[CacheFile]) -> dict[str, list[BlockPlace] | None]:
        """path -> each block (offset, exact length) and the nodes holding it; None if absent.

        Alluxio decides where blocks go (and a client read may cache a copy anywhere): this is
        the truth the per-node numbers of `check` are taken from.
        """
        out: dict[str, list[BlockPlace] | None] = {}
        for path, v in self.views(files, fresh=True).items():
            if v is None:
                out[path] = None
                continue
            places, off = [], 0
            for b in v.blocks:
                nodes = tuple(sorted(self.node_of.get(w, str(w)) for w in b.workers))
                places.append(BlockPlace(b.block_id, off, b.length, nodes))
                off += b.length
            out[path] = places
        return out

    # -- primitives ------------------------------------------------------------------------------
    def stat(self, files: Sequence[CacheFile]) -> dict[str, int | None]:
        return {p: (None if v is None else v.length) for p, v in self.views(files).items()}

    def cached_bytes(self, node: str, files: Sequence[CacheFile]) -> dict[str, int]:
        worker = self.worker_of[node]
        return {p: (0 if v is None else v.bytes_on(worker)) for p, v in self.views(files).items()}

    def usage(self, node: str) -> tuple[int, int]:
        worker = self.worker_of[node]
        for w in self.rest.workers():
            if w.address == worker:
                return w.used, w.capacity
        raise CacheError(f"{node}: Alluxio worker {worker} is not registered with the master (lost or not started)")

    def warm_node(self, node: str, files: Sequence[CacheFile], threads: int, on_progress: ProgressFn) -> None:
        """Load the files into this one worker (the shard path of `warm`)."""
        self._forget()
        errors = self._run_pool(threads, [lambda f=f: self._load_on(node, f, on_progress) for f in files])
        self._forget()
        if errors:
            raise CacheError(f"warm on {node}: {len(errors)} of {len(files)} files failed: " + "; ".join(errors[:5]))

    def evict_node(self, node: str, files: Sequence[CacheFile]) -> None:
        """Free the files this node holds blocks of (Alluxio frees them from every worker)."""
        self._free_and_wait(files, lambda views: {self.worker_of[node]})

    # -- derived, done cluster-wide for Alluxio --------------------------------------------------
    def warm(self, plan: Plan, progress: ProgressSink | None = None, *, traced: Traced | None = None) -> WarmReport:
        """Warm the plan: files every node should hold in batched loads, the rest per file and node.

        `traced` files are not timed one by one here (loads are cluster-wide batches); their check
        is still recorded in their traces by the pipeline."""
        if progress is not None:
            progress.start(plan.warm_files, plan.warm_bytes)
        meter = _Meter(progress, plan.warm_bytes)
        on_progress = meter.job_done
        stop = threading.Event()
        poller = threading.Thread(target=self._poll_used, args=(meter, stop), name="alluxio-progress", daemon=True)
        if progress is not None:
            poller.start()
        t0 = time.monotonic()
        targets: dict[str, list[str]] = {}
        by_path: dict[str, CacheFile] = {}
        for node, share in plan.shares.items():
            for f in share.files:
                targets.setdefault(f.path, []).append(node)
                by_path[f.path] = f
        everyone = set(self.nodes)
        wide = [by_path[p] for p, ns in targets.items() if set(ns) == everyone]
        narrow = [(n, by_path[p]) for p, ns in targets.items() if set(ns) != everyone for n in ns]
        errors: dict[str, list[str]] = {n: [] for n in plan.shares}
        seconds: dict[str, float] = {n: 0.0 for n in plan.shares}
        self._forget()
        try:
            jobs: list[Callable[[], None]] = []
            for batch in self._batches(wide):
                jobs.append(lambda b=batch: self._load_everywhere(b, on_progress))
            for n, f in narrow:
                jobs.append(lambda n=n, f=f: self._load_on(n, f, on_progress))
            for err in self._run_pool(self.settings.active_jobs, jobs):
                node = err.split(":", 1)[0]  # "*" (a load for every node) or the node's name
                for n in ([node] if node in errors else list(errors)):
                    errors[n].append(err)
        finally:
            stop.set()
            if poller.is_alive():
                poller.join()
            self._forget()
            if progress is not None:
                progress.finish()
        total = time.monotonic() - t0
        for n in seconds:
            seconds[n] = total if plan.shares[n].files else 0.0
        return WarmReport(
            nodes=[NodeWarmResult(n, len(s.files), s.bytes, seconds[n],
                                  ("; ".join(errors[n][:5]) + (f" (+{len(errors[n]) - 5} more)" if len(errors[n]) > 5 else ""))
                                  if errors[n] else None)
                   for n, s in plan.shares.items()],
            seconds=total,
        )

    def free(self, files: Sequence[CacheFile]) -> FreeReport:
        """Free the files from every worker; freed / left bytes per node measured before and after."""
        views = self.views(files, fresh=True)
        present = [f for f in files if views.get(f.path) is not None]
        before = {n: sum(v.bytes_on(w) for v in views.values() if v is not None) for n, w in self.worker_of.items()}
        left_views = self._free_and_wait(present, lambda vs: set(self.worker_of.values()))
        after = {n: sum(v.bytes_on(w) for v in left_views.values() if v is not None) for n, w in self.worker_of.items()}
        return FreeReport(
            files=len(present),
            freed_bytes={n: max(0, before[n] - after[n]) for n in self.nodes},
            left_bytes=after,
            missing=len(files) - len(present),
        )

    def _poll_used(self, meter: _Meter, stop: threading.Event) -> None:
        """Feed the meter the workers' used bytes (master's view) while a warm runs."""
        def used() -> int:
            return sum(w.used for w in self.rest.workers() if w.address in self.node_of)

        try:
            base = used()
        except CacheError:
            return
        while not stop.wait(PROGRESS_POLL_SECONDS):
            try:
                meter.used(used() - base)
            except CacheError:
                pass  # the jobs' completions still count

    # -- loads -----------------------------------------------------------------------------------
    def _batches(self, files: Sequence[CacheFile]) -> Iterable[list[CacheFile]]:
        # Small enough that progress moves and every job runner has work, at most batch_files.
        per = max(1, min(self.settings.batch_files, -(-len(files) // (4 * self.settings.active_jobs))))
        for i in range(0, len(files), per):
            yield list(files[i : i + per])

    def _load_everywhere(self, batch: list[CacheFile], on_progress: ProgressFn) -> None:
        """One batched load of files every worker should hold: replication = number of workers."""
        n = len(self.nodes)
        paths = [self.alluxio_path(f) for f in batch]
        job = self.rest.run_load(paths, replication=n)
        st = self.rest.wait_job(job, self.settings.job_timeout_seconds)
        if st.status == "COMPLETED":
            on_progress(n * len(batch), n * sum(f.size or 0 for f in batch))
            return
        if len(batch) == 1:
            if self._vanished(batch[0]):
                on_progress(n, 0)
                return
            raise CacheError(f"*: load {paths[0]}: job {job} {st.status}: {st.error[:300]}")
        # One bad file fails the whole batch (e.g. deleted since the plan): redo them one by one.
        errors = self._run_pool(len(batch), [lambda f=f: self._load_everywhere([f], on_progress) for f in batch])
        if errors:
            raise CacheError("; ".join(errors))

    def _load_on(self, node: str, f: CacheFile, on_progress: ProgressFn) -> None:
        """Load one file into one worker: replication = holders of its blocks now + 1, rounds per count."""
        worker = self.worker_of[node]
        path = self.alluxio_path(f)
        with self._memo_lock:
            lock = self._file_locks.setdefault(f.path, threading.Lock())
        with lock:  # our own loads of this file must not change the holder count under us
            for _ in range(len(self.nodes) + 1):
                try:
                    v = _file_or_none(self.rest.get_status(path))
                except AlluxioNotFound:
                    v = None
                if v is None:  # vanished since the plan: nothing to load (like a skipped file)
                    on_progress(1, 0)
                    return
                lacking = [b for b in v.blocks if worker not in b.workers]
                if not lacking:
                    on_progress(1, f.size or v.length)
                    return
                replication = min(len(b.workers) for b in lacking) + 1
                job = self.rest.run_load([path], replication=replication, worker_hosts=[worker.host])
                st = self.rest.wait_job(job, self.settings.job_timeout_seconds)
                if st.status != "COMPLETED":
                    raise CacheError(f"{node}: load {path}: job {job} {st.status}: {st.error[:300]}")
        raise CacheError(f"{node}: load {path}: blocks still missing on {worker} after {len(self.nodes) + 1} rounds")

    def _vanished(self, f: CacheFile) -> bool:
        try:
            return _file_or_none(self.rest.get_status(self.alluxio_path(f))) is None
        except AlluxioNotFound:
            return True

    @staticmethod
    def _run_pool(width: int, jobs: Sequence[Callable[[], None]]) -> list[str]:
        """Run the jobs `width` at a time; return their CacheError messages (other errors raise)."""
        errors: list[str] = []

        def guarded(j: Callable[[], None]) -> None:
            try:
                j()
            except CacheError as exc:
                errors.append(str(exc))

        if not jobs:
            return errors
        with ThreadPoolExecutor(max_workers=max(1, min(width, len(jobs))), thread_name_prefix="alluxio-load") as pool:
            list(pool.map(guarded, jobs))
        return errors

    # -- free ------------------------------------------------------------------------------------
    def _free_and_wait(self, files: Sequence[CacheFile],
                       workers: Callable[[dict[str, FileView | None]], set[WorkerAddress]]) -> dict[str, FileView | None]:
        """Free every file with a block on the given workers; wait until those workers hold none."""
        self._forget()
        views = self.views(files, fresh=True)
        watch = workers(views)
        held = [f for f in files if (v := views.get(f.path)) is not None and any(v.bytes_on(w) for w in watch)]
        errors = self._run_pool(STATUS_THREADS, [lambda f=f: self._free_one(f) for f in held])
        if errors:
            raise CacheError(f"free: {len(errors)} files failed: " + "; ".join(errors[:5]))
        deadline = time.monotonic() + self.settings.free_timeout_seconds
        again = time.monotonic() + FREE_AGAIN_SECONDS
        by_path = {f.path: f for f in files}
        while True:
            views = self.views(files, fresh=True)
            left = [p for p, v in views.items() if v is not None and any(v.bytes_on(w) for w in watch)]
            if not left:
                # Reload the freed files' metadata on next use: new block ids (see _forget_file).
                self._run_pool(STATUS_THREADS, [lambda f=f: self._forget_file(f) for f in held])
                self._forget()
                return views
            if time.monotonic() > deadline:
                raise CacheError(f"free: {len(left)} files still cached after {self.settings.free_timeout_seconds:.0f}s: {left[:5]}")
            if time.monotonic() > again:
                # A block cached after our free (a reader's or a load's late cache request) stays:
                # free what is still there again.
                self._run_pool(STATUS_THREADS, [lambda f=by_path[p]: self._free_one(f) for p in left])
                again = time.monotonic() + FREE_AGAIN_SECONDS
            time.sleep(FREE_POLL_SECONDS)

    def _forget_file(self, f: CacheFile) -> None:
        # Alluxio 2.9.6's worker (AsyncBlockRemover.addBlocksToDelete) queues a block id before
        # marking it "being removed"; a remover thread that finishes first leaves the id marked
        # for good, and every later free of that block id is skipped ("is being removed"). Block
        # ids derive from the file's id: dropping the metadata (alluxioOnly, S3 untouched) gives
        # the file new ids when it is next loaded, so a stuck id never names a cached block.
        # Seen here: a file warmed again after a free stayed cached through every later free.
        try:
            self.rest.forget(self.alluxio_path(f))
        except AlluxioNotFound:
            pass

    def _free_one(self, f: CacheFile) -> None:
        try:
            self.rest.free(self.alluxio_path(f))
        except AlluxioNotFound:
            pass  # gone from S3 meanwhile: Alluxio dropped it (and its blocks) on the sync


class _Meter:
    """Warm progress: files when their load job completes; bytes from the jobs or, ahead of them,
    the growth of the workers' used bytes (blocks are committed as each finishes loading; other
    readers count too, so it is an estimate, capped at the plan, like JuiceFS's block counter)."""

    def __init__(self, sink: ProgressSink | None, total_bytes: int) -> None:
        self.sink = sink
        self.total = total_bytes
        self.lock = threading.Lock()
        self.files = self.job_bytes = self.used_bytes = 0
        self.sent_files = self.sent_bytes = 0

    def job_done(self, files: int, nbytes: int) -> None:
        with self.lock:
            self.files += files
            self.job_bytes += nbytes
            self._push()

    def used(self, delta: int) -> None:
        with self.lock:
            self.used_bytes = max(self.used_bytes, delta)
            self._push()

    def _push(self) -> None:
        b = min(self.total, max(self.job_bytes, self.used_bytes))
        df, db = self.files - self.sent_files, max(0, b - self.sent_bytes)
        if (df or db) and self.sink is not None:
            self.sink.add(df, db)
        self.sent_files += df
        self.sent_bytes += db


def _file_or_none(v: FileView | None) -> FileView | None:
    return None if v is None or v.folder else v


__all__ = ["AlluxioCluster", "BlockPlace"]
