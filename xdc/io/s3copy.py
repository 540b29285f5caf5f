"""The async copy engine: objects from one S3 endpoint to another at wire speed, ETags kept.

    copy_many(src, dst, jobs)     a synchronous facade; the work runs on the engine's own event loop
    per object:
      HEAD source (+ tags) ── ETag != the event's ──> SupersededError
        │
        ├─ plain MD5 ETag (one PUT made it) ─> GET (If-Match) streamed into one PUT with
        │                                      Content-MD5 = the source's MD5: the target refuses
        │                                      any other bytes, and its ETag equals the source's
        └─ multipart "<md5>-N" ─> part sizes: reported by the source (GetObjectAttributes, or
                                  HeadObject PartNumber), else inferred (candidate part sizes)
                                  -> parts in parallel: ranged GET (If-Match) -> MD5 -> UploadPart
                                     (Content-MD5); other candidates hashed in order meanwhile
                                  -> the parts' ETag == the source's ? Complete
                                     : another candidate matched ? abort, redo with it
                                     : inferred ? complete re-chunked, say why : abort (IntegrityError)

Bounds: at most `concurrency` transfers (a streamed object or one part) at once across all
objects, and at most `buffer_bytes` of part buffers in memory (a part waits for room first), so
memory is about buffer_bytes + concurrency x chunk whatever the object sizes.

Retries follow the one policy (xdc.retry), one level per operation: a streamed single-part copy is
retried whole; a multipart copy retries each part (ranged GET + UploadPart) and each call (create,
complete) on its own, never the whole object. Errors are translated once (xdc.io.s3client).
A multipart upload the engine started is aborted when its copy fails or is cancelled (also by
`close()`); `open_uploads` names those in flight, which `S3Store.sweep_uploads` (the sweep of
uploads a killed process left behind) never touches.

Tracing: a job whose `trace` is a sampled span gets the steps of xdc.trace under it, as the sync
store opens them: COPY around the object, SOURCE_READ (its HEAD and tags), TRANSFER (the bytes;
a streamed copy writes inside it) and TARGET_WRITE (a PUT of bytes read whole, or completing a
multipart upload). Each copy runs in a task of its own, so its spans nest in that task's context.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future
import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from xdc import trace
from xdc.errors import (
    IntegrityError,
    ObjectNotFound,
    StoreError,
    SupersededError,
    TransientStoreError,
    XdcError,
)
from xdc.io.objects import META_SOURCE_ETAG, META_SOURCE_MTIME, CopyJob, CopyResult, Layout, ObjectInfo
from xdc.io.parts import (
    MAX_PARTS,
    MAX_SINGLE_PUT,
    LayoutHasher,
    candidate_part_sizes,
    multipart_etag,
    parts_in_etag,
    plain_md5_etag,
    uniform_layout,
)
from xdc.io.s3client import S3Connection, add_content_md5, translate
from xdc.retry import RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")
MIB = 2**20

# Headers that travel with an object (what S3 replication keeps), HEAD name -> PUT name.
_CARRIED_HEADERS = ("ContentType", "CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage",
                    "Expires")


@dataclass(frozen=True)
class EngineSettings:
    concurrency: int = 16  # transfers at once (a streamed object or one part), across all objects
    buffer_bytes: int = 256 * MIB  # part buffers in memory at once
    part_size: int = 8 * MIB  # parts of a copy whose source layout is unknown
    chunk: int = MIB  # read size of a streamed copy
    small_bytes: int = MIB  # objects up to this size are read whole, then PUT
    max_candidates: int = 4  # part sizes tried (hashed) when the source cannot tell its layout
    capability_ttl_s: float = 600.0  # an endpoint found lacking a feature is asked again after this
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class _Caps:
    """What one endpoint was found to support (None: not asked yet); a `False` expires."""

    attributes: bool | None = None  # GetObjectAttributes with ObjectParts
    part_head: bool | None = None  # HeadObject with PartNumber (PartsCount in the answer)
    tagging: bool | None = None
    checked: float = 0.0


class _ByteBudget:
    """FIFO budget of buffer bytes: a part waits until its bytes fit (a part larger than the whole
    budget waits until it is alone)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, n: int) -> int:
        n = min(n, self.total)
        if not self._waiters and self.free >= n:
            self.free -= n
            return n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted while being cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        return n

    def release(self, n: int) -> None:
        self.free += n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            n, fut = self._waiters.popleft()
            if not fut.done():
                self.free -= n
                fut.set_result(None)


class _StreamBody:
    """A GET body handed on to a PUT as it arrives: an async iterable for aiohttp, with a length;
    `read` only satisfies botocore's parameter check (nothing calls it)."""

    def __init__(self, body: Any, size: int, chunk: int, what: str) -> None:
        self._body, self.size, self._chunk, self._what = body, size, chunk, what
        self.sent = 0
        self.error: BaseException | None = None

    def __len__(self) -> int:
        return self.size

    def read(self, *_: Any) -> bytes:
        raise StoreError(f"{self._what}: a streamed body cannot be read synchronously")

    def __aiter__(self) -> Any:
        return self._chunks()

    async def _chunks(self) -> Any:
        try:
            while self.sent < self.size:
                data = await self._body.read(min(self._chunk, self.size - self.sent))
                if not data:
                    raise IntegrityError(f"{self._what}: source stream ended after {self.sent} of {self.size} bytes")
                self.sent += len(data)
                yield data
        except BaseException as exc:
            self.error = exc
            raise


class _Redo(Exception):
    """Internal: another candidate layout reproduced the source's ETag; copy again with it."""

    def __init__(self, layout: list[int]) -> None:
        super().__init__("redo")
        self.layout = layout


class CopyEngine:
    """Copies objects between S3 endpoints on one event loop in a thread of its own (started on
    first use); thread-safe; `close()` cancels what is in flight (aborting its uploads)."""

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._clients: dict[S3Connection, Any] = {}
        self._session: aioboto3.Session | None = None  # one: its clients share botocore's loaded models
        self._stack: contextlib.AsyncExitStack | None = None
        self._streams: asyncio.Semaphore | None = None
        self._budget: _ByteBudget | None = None
        self._caps: dict[str, _Caps] = {}
        self._learned: dict[tuple[str, str], int] = {}  # (endpoint, bucket) -> part size that matched
        self._tasks: set[asyncio.Task[Any]] = set()
        self._aborts: set[asyncio.Task[Any]] = set()
        self.open_uploads: dict[str, tuple[str, str, str]] = {}  # upload id -> (endpoint, bucket, key)
        self.stats: collections.Counter[str] = collections.Counter()

    # -- the synchronous facade ----------------------------------------------------------------
    def copy_many(self, src: S3Connection, dst: S3Connection, jobs: Sequence[CopyJob]
                  ) -> list[CopyResult | StoreError]:
        """Copy every job concurrently; each result is what landed or the StoreError it ended with."""
        if not jobs:
            return []
        return self._run(self._copy_all(src, dst, list(jobs)))

    def copy(self, src: S3Connection, dst: S3Connection, job: CopyJob) -> CopyResult:
        """One copy for a synchronous caller whose own span (`job.trace`) is the copy's step: the
        engine adds the steps inside it, not another COPY."""
        res = self._run(self._copy_all(src, dst, [job], own_step=False))[0]
        if isinstance(res, BaseException):
            raise res
        return res

    def warm(self, endpoints: Sequence[tuple[S3Connection, str]], timeout_s: float = 5.0) -> None:
        """Make each endpoint's client and open a connection to it (HEAD bucket), before the first
        copy needs them: a client's first use loads botocore's models and rules (about 0.4 s of CPU
        for two endpoints), which a copier that starts cold pays inside its first batch. Best
        effort, at most `timeout_s`: an endpoint that does not answer is logged; its copies report it."""
        async def one(conn: S3Connection, bucket: str) -> None:
            try:
                c = await self._client(conn)
                await asyncio.wait_for(self._call(conn, f"head bucket {bucket}", lambda: c.head_bucket(Bucket=bucket),
                                                  retry=False), timeout_s)
            except (XdcError, TimeoutError) as exc:
                log.warning("copy engine: warming %s: %r", conn.endpoint_url, exc)

        async def every() -> None:
            await asyncio.gather(*(one(c, b) for c, b in dict.fromkeys(endpoints)))
        self._run(every())

    def close(self, timeout_s: float = 30.0) -> None:
        """Cancel the copies in flight (their multipart uploads are aborted), close the clients and
        stop the loop."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout_s)
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.warning("copy engine: shutdown: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Awaitable[T]) -> T:
        loop = self._ensure_loop()
        fut: Future[T] = asyncio.run_coroutine_threadsafe(self._tracked(coro), loop)  # type: ignore[arg-type]
        try:
            return fut.result()
        except FutureCancelled as exc:  # close() from another thread: nothing copied is vouched for
            raise TransientStoreError("copies cancelled: the copy engine was closed") from exc
        except BaseException:
            fut.cancel()  # e.g. KeyboardInterrupt in the caller: the copies stop, their uploads abort
            raise

    async def _tracked(self, coro: Awaitable[T]) -> T:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        try:
            return await task
        finally:
            self._tasks.discard(task)

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()
                    loop.close()
                self._thread = threading.Thread(target=run, name="copy-engine", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    async def _shutdown(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._aborts, return_exceptions=True)
        if self._stack is not None:
            await self._stack.aclose()
        self._clients.clear()
        self._stack = self._session = None

    # -- clients -------------------------------------------------------------------------------
    async def _client(self, conn: S3Connection) -> Any:
        c = self._clients.get(conn)
        if c is None:
            if self._stack is None:
                self._stack = contextlib.AsyncExitStack()
            cfg = AioConfig(**conn.botocore_config(max_pool=self.settings.concurrency * 2 + 8))
            if self._session is None:
                self._session = aioboto3.Session()
            c = await self._stack.enter_async_context(self._session.client("s3", config=cfg, **conn.client_kwargs()))
            c.meta.events.register("before-sign.s3.DeleteObjects", add_content_md5)
            c.meta.events.register("before-sign.s3.GetObjectAttributes", _guard_attributes)
            self._clients[conn] = c
        return c

    def _limits(self) -> tuple[asyncio.Semaphore, _ByteBudget]:
        if self._streams is None or self._budget is None:
            self._streams = asyncio.Semaphore(self.settings.concurrency)
            self._budget = _ByteBudget(self.settings.buffer_bytes)
        return self._streams, self._budget

    def _cap(self, conn: S3Connection) -> _Caps:
        caps = self._caps.setdefault(conn.endpoint_url, _Caps())
        if time.monotonic() - caps.checked > self.settings.capability_ttl_s:
            for name in ("attributes", "part_head", "tagging"):
                if getattr(caps, name) is False:
                    setattr(caps, name, None)
            caps.checked = time.monotonic()
        return caps

    async def _call(self, conn: S3Connection, what: str, fn: Callable[[], Awaitable[T]], *,
                    retry: bool = True, side: str = "") -> T:
        """One S3 call, its errors translated, retried by the policy unless `retry` is off.

        `side="source"`: a read pinned with If-Match whose 412 means the source changed
        (SupersededError). `side="target"`: a missing bucket or upload there is not the source's
        absence (a plain StoreError, never ObjectNotFound, which callers read as "source gone")."""
        async def once() -> T:
            try:
                return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated at this one boundary
                if side == "source" and _status(exc) == 412:
                    raise SupersededError(f"{what}: the source changed during the copy") from exc
                err = translate(exc, what, conn)
                if side == "target" and isinstance(err, ObjectNotFound):
                    err = StoreError(f"{what}: bucket or upload not found at {conn.endpoint_url}")
                raise err from exc
        if not retry:
            return await once()
        return await self.settings.retry.acall(once, what=what)

    # -- copies --------------------------------------------------------------------------------
    async def _copy_all(self, src: S3Connection, dst: S3Connection, jobs: list[CopyJob], *, own_step: bool = True
                        ) -> list[CopyResult | StoreError]:
        return list(await asyncio.gather(*(self._copy_caught(src, dst, j, own_step) for j in jobs)))

    async def _copy_caught(self, src: S3Connection, dst: S3Connection, job: CopyJob, own_step: bool = True
                           ) -> CopyResult | StoreError:
        try:
            # the job's span (or a COPY step under it) is the current parent in this copy's task
            with (trace.step(trace.COPY, job.trace, key=f"{job.dst_bucket}/{job.dst_key}") if own_step
                  else trace.use(job.trace)):
                return await self.copy_async(src, dst, job)
        except StoreError as exc:
            return exc
        except XdcError as exc:
            return StoreError(f"copy {job.source}: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the other copies' results
            log.exception("copy %s: unexpected error", job.source)
            return StoreError(f"copy {job.source}: unexpected {exc!r}")

    async def copy_async(self, src: S3Connection, dst: S3Connection, job: CopyJob) -> CopyResult:
        """Copy one object (on the engine's loop)."""
        cs = await self._client(src)
        with trace.step(trace.SOURCE_READ, store="s3"):
            head = await self._call(src, f"head {job.source}", lambda: cs.head_object(Bucket=job.bucket, Key=job.key))
            etag = str(head.get("ETag", "")).strip('"')
            size = int(head["ContentLength"])
            if job.expect_etag and etag != job.expect_etag.strip('"'):
                raise SupersededError(f"{job.source}: source ETag {etag} != event's {job.expect_etag}")
            tags = await self._source_tags(src, cs, job, head)
        args = _put_args(head, job, etag, tags)
        n = parts_in_etag(etag)
        if n is None and size <= MAX_SINGLE_PUT:
            result = await self.settings.retry.acall(
                lambda: self._copy_single(src, dst, job, etag, size, args), what=f"copy {job.source}")
        else:
            result = await self._copy_multipart(src, dst, job, etag, size, n, args)
        self.stats[result.layout] += 1
        self.stats["bytes"] += size
        return dataclasses.replace(result, landed=dataclasses.replace(result.landed, tags=tags))

    async def _copy_single(self, src: S3Connection, dst: S3Connection, job: CopyJob, etag: str, size: int,
                           args: dict[str, Any]) -> CopyResult:
        """One GET streamed into one PUT (objects up to `small_bytes` are read whole first)."""
        cs, cd = await self._client(src), await self._client(dst)
        streams, _ = self._limits()
        kw = dict(args)
        if plain_md5_etag(etag):  # the target checks the bytes against the source's MD5
            kw["ContentMD5"] = base64.b64encode(bytes.fromhex(etag)).decode()
        small = size <= self.settings.small_bytes
        async with streams, contextlib.AsyncExitStack() as moving:
            # TRANSFER: the GET and its bytes; a streamed copy's PUT too (read and write interleave)
            moving.enter_context(trace.step(trace.TRANSFER, bytes=size, streamed=None if small else True))
            got = await self._call(src, f"get {job.source}", lambda: cs.get_object(
                Bucket=job.bucket, Key=job.key, **_if_match(etag)), retry=False, side="source")
            body = got["Body"]
            try:
                if int(got["ContentLength"]) != size:
                    raise SupersededError(f"{job.source}: changed during the copy")
                payload: Any
                if small:
                    payload = await self._call(src, f"read {job.source}", lambda: body.read(), retry=False)
                    if len(payload) != size:
                        raise IntegrityError(f"{job.source}: read {len(payload)} bytes, source says {size}")
                    await moving.aclose()  # read whole: its PUT is the TARGET_WRITE step
                    moving.enter_context(trace.step(trace.TARGET_WRITE, store="s3", bytes=size))
                else:
                    payload = _StreamBody(body, size, self.settings.chunk, f"read {job.source}")
                try:
                    put = await self._call(dst, f"put {job.dst_bucket}/{job.dst_key}", lambda: cd.put_object(
                        Bucket=job.dst_bucket, Key=job.dst_key, Body=payload, ContentLength=size, **kw),
                        retry=False, side="target")
                except StoreError as exc:
                    err = getattr(payload, "error", None)
                    if isinstance(err, XdcError):
                        raise err from exc
                    if err is not None:
                        raise translate(err, f"read {job.source}", src) from exc
                    raise
                if isinstance(payload, _StreamBody) and payload.sent != size:
                    raise IntegrityError(f"{job.source}: sent {payload.sent} bytes, source says {size}")
            finally:
                body.close()
        landed = str(put.get("ETag", "")).strip('"')
        if plain_md5_etag(etag) and landed != etag and plain_md5_etag(landed):
            raise IntegrityError(f"{job.dst_bucket}/{job.dst_key}: landed ETag {landed} != source MD5 {etag}")
        note = "" if landed == etag else f"source ETag {etag or '(none)'} is not an MD5 the target reproduces"
        return CopyResult(ObjectInfo(job.dst_bucket, job.dst_key, size, landed, dict(args.get("Metadata", {}))),
                          etag, "single", 1, note)

    async def _copy_multipart(self, src: S3Connection, dst: S3Connection, job: CopyJob, etag: str, size: int,
                              n: int | None, args: dict[str, Any]) -> CopyResult:
        kind: Layout
        if n is None:  # a plain or foreign ETag on an object too large for one PUT
            layout = uniform_layout(size, self._part_size_for(size))
            return await self._multipart(src, dst, job, etag, args, layout, [], kind="rechunked",
                                         note=f"{size} bytes is more than one PUT takes: ETag {etag!r} "
                                              f"cannot be kept; copied in {len(layout)} parts")
        reported = await self._reported_layout(src, job, n, size)
        if reported is not None:
            candidates, kind = [reported], "reported"
        else:
            learned = self._learned.get((src.endpoint_url, job.bucket))
            sizes = candidate_part_sizes(size, n, preferred=[p for p in (learned, self.settings.part_size) if p],
                                         limit=self.settings.max_candidates)
            candidates, kind = [uniform_layout(size, p) for p in sizes], "inferred"
        if not candidates:
            layout = uniform_layout(size, self._part_size_for(size))
            return await self._multipart(src, dst, job, etag, args, layout, [], kind="rechunked",
                                         note=f"no uniform part size gives {n} parts for {size} bytes; "
                                              f"copied in {len(layout)} parts of {layout[0]} bytes")
        try:
            return await self._multipart(src, dst, job, etag, args, candidates[0], candidates[1:], kind=kind,
                                         want=etag)
        except _Redo as redo:
            self.stats["redone"] += 1
            res = await self._multipart(src, dst, job, etag, args, redo.layout, [], kind="inferred", want=etag)
            return CopyResult(res.landed, res.source_etag, res.layout, res.parts, res.note, passes=2)

    def _part_size_for(self, size: int) -> int:
        p = self.settings.part_size
        while -(-size // p) > MAX_PARTS:
            p *= 2
        return p

    async def _multipart(self, src: S3Connection, dst: S3Connection, job: CopyJob, etag: str,
                         args: dict[str, Any], layout: list[int], others: list[list[int]], *, kind: Layout,
                         want: str | None = None, note: str = "") -> CopyResult:
        """Upload `layout`'s parts; complete when they reproduce `want` (or when nothing is wanted,
        or when the layout was only a guess); otherwise abort."""
        cd = await self._client(dst)
        dst_key = f"{job.dst_bucket}/{job.dst_key}"
        created = await self._call(dst, f"create upload {dst_key}", lambda: cd.create_multipart_upload(
            Bucket=job.dst_bucket, Key=job.dst_key, **args), side="target")
        upload_id = created["UploadId"]
        self.open_uploads[upload_id] = (dst.endpoint_url, job.dst_bucket, job.dst_key)
        completed = False
        try:
            with trace.step(trace.TRANSFER, bytes=sum(layout), parts=len(layout), streamed=True):
                digests, other_etags, part_etags = await self._upload_parts(src, dst, job, etag, upload_id, layout,
                                                                            others)
            got = multipart_etag(digests) if len(layout) > 0 else ""
            if want is not None and got != want:
                for cand, e in zip(others, other_etags):
                    if e == want:
                        raise _Redo(cand)
                if kind == "reported":
                    raise IntegrityError(f"{job.source}: the parts read give ETag {got}, the source says {want}")
                kind = "rechunked"
                note = (f"source part layout unknown: none of {1 + len(others)} candidate part sizes "
                        f"({', '.join(str(c[0]) for c in [layout, *others])}) reproduces ETag {want}; "
                        f"copied in {len(layout)} parts of {layout[0]} bytes")
            elif want is not None and kind == "inferred":
                self._learned[(src.endpoint_url, job.bucket)] = layout[0]
            with trace.step(trace.TARGET_WRITE, store="s3", bytes=sum(layout), parts=len(layout)):
                landed = await self._complete(dst, job, upload_id, part_etags, got)
            completed = True
            if landed != got and parts_in_etag(landed) is not None:
                raise IntegrityError(f"{dst_key}: completed with ETag {landed}, its parts give {got}")
            return CopyResult(ObjectInfo(job.dst_bucket, job.dst_key, sum(layout), landed,
                                         dict(args.get("Metadata", {}))), etag, kind, len(layout), note)
        finally:
            self.open_uploads.pop(upload_id, None)
            if not completed:
                self._abort_later(dst, job.dst_bucket, job.dst_key, upload_id)

    async def _complete(self, dst: S3Connection, job: CopyJob, upload_id: str, part_etags: list[str],
                        expect: str) -> str:
        """CompleteMultipartUpload; if it fails after the server completed it (a lost answer makes
        the retry find no upload), the object there with the expected ETag is the success."""
        cd = await self._client(dst)
        parts = [{"ETag": f'"{e}"', "PartNumber": i + 1} for i, e in enumerate(part_etags)]
        what = f"complete upload {job.dst_bucket}/{job.dst_key}"
        try:
            done = await self._call(dst, what, lambda: cd.complete_multipart_upload(
                Bucket=job.dst_bucket, Key=job.dst_key, UploadId=upload_id, MultipartUpload={"Parts": parts}),
                side="target")
        except StoreError:
            try:
                there = await self._call(dst, f"head {job.dst_bucket}/{job.dst_key}", lambda: cd.head_object(
                    Bucket=job.dst_bucket, Key=job.dst_key), retry=False)
            except StoreError:
                there = {}
            if str(there.get("ETag", "")).strip('"') != expect:
                raise
            return expect
        return str(done.get("ETag", "")).strip('"')

    def _abort_later(self, dst: S3Connection, bucket: str, key: str, upload_id: str) -> None:
        """Abort an upload, also while the copy is being cancelled (the abort runs on as a task of
        its own, which close() waits for)."""
        async def abort() -> None:
            try:
                cd = await self._client(dst)
                await self._call(dst, f"abort upload {bucket}/{key}", lambda: cd.abort_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id))
                self.stats["aborted"] += 1
            except ObjectNotFound:
                pass
            except Exception as exc:  # noqa: BLE001 - the sweep will find it
                log.warning("abort upload %s/%s (%s): %s", bucket, key, upload_id, exc)
        task = asyncio.get_running_loop().create_task(abort())
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _upload_parts(self, src: S3Connection, dst: S3Connection, job: CopyJob, etag: str, upload_id: str,
                            layout: list[int], others: list[list[int]]) -> tuple[list[bytes], list[str | None], list[str]]:
        """Every part of `layout`, in parallel within the limits. Returns the parts' MD5 digests,
        the ETags the `others` layouts would give (hashed in order), and the parts' ETags."""
        cs, cd = await self._client(src), await self._client(dst)
        streams, budget = self._limits()
        offsets = [0]
        for p in layout:
            offsets.append(offsets[-1] + p)
        digests: list[bytes] = [b""] * len(layout)
        part_etags: list[str] = [""] * len(layout)
        hashers = [LayoutHasher(o) for o in others]
        pending: dict[int, tuple[bytearray, int]] = {}
        cursor = 0
        hash_lock = asyncio.Lock()

        async def hash_in_order(i: int, buf: bytearray, held: int) -> None:
            nonlocal cursor
            pending[i] = (buf, held)
            async with hash_lock:
                while cursor in pending:
                    b, h = pending.pop(cursor)
                    try:
                        await asyncio.to_thread(_feed_all, hashers, b)
                    finally:
                        budget.release(h)
                    cursor += 1

        async def part_once(i: int) -> tuple[bytearray, bytes, str]:
            start, length = offsets[i], layout[i]
            rng = f"bytes={start}-{start + length - 1}"
            async with streams:
                got = await self._call(src, f"get {job.source} {rng}", lambda: cs.get_object(
                    Bucket=job.bucket, Key=job.key, Range=rng, **_if_match(etag)), retry=False, side="source")
                buf = await _read_exactly(got["Body"], length, f"read {job.source} {rng}", src)
                md5 = await asyncio.to_thread(lambda: hashlib.md5(buf, usedforsecurity=False).digest())
                up = await self._call(dst, f"upload part {i + 1} of {job.dst_bucket}/{job.dst_key}", lambda: cd.upload_part(
                    Bucket=job.dst_bucket, Key=job.dst_key, UploadId=upload_id, PartNumber=i + 1, Body=buf,
                    ContentLength=length, ContentMD5=base64.b64encode(md5).decode()), retry=False, side="target")
            part_etag = str(up.get("ETag", "")).strip('"')
            if plain_md5_etag(part_etag) and part_etag != md5.hex():
                raise IntegrityError(f"part {i + 1} of {job.dst_bucket}/{job.dst_key}: ETag {part_etag} != MD5 {md5.hex()}")
            return buf, md5, part_etag

        async def part(i: int) -> None:
            held = await budget.acquire(layout[i])
            try:
                buf, md5, pe = await self.settings.retry.acall(lambda: part_once(i),
                                                               what=f"copy part {i + 1} of {job.source}")
                digests[i], part_etags[i] = md5, pe
                self.stats["parts"] += 1
            except BaseException:
                budget.release(held)
                raise
            if hashers:
                await hash_in_order(i, buf, held)
            else:
                budget.release(held)

        tasks = [asyncio.ensure_future(part(i)) for i in range(len(layout))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for b, h in pending.values():
                budget.release(h)
            pending.clear()
            raise
        return digests, [h.etag() for h in hashers], part_etags

    # -- what the source can tell ------------------------------------------------------------------
    async def _reported_layout(self, src: S3Connection, job: CopyJob, n: int, size: int) -> list[int] | None:
        """The part sizes as the source endpoint reports them (HeadObject with PartNumber, else
        GetObjectAttributes), or None when it cannot tell."""
        caps = self._cap(src)
        if caps.part_head is not False:
            sizes = await self._parts_by_head(src, job, n, size, caps)
            if sizes is not None or caps.part_head:
                return sizes
        if caps.attributes is not False:
            return await self._parts_by_attributes(src, job, n, size, caps)
        return None

    async def _parts_by_head(self, src: S3Connection, job: CopyJob, n: int, size: int, caps: _Caps) -> list[int] | None:
        cs = await self._client(src)

        async def head(pn: int) -> tuple[int, int | None]:
            # no If-Match here (moto compares it with the part's ETag); the ranged reads are pinned
            r = await cs.head_object(Bucket=job.bucket, Key=job.key, PartNumber=pn)
            return int(r["ContentLength"]), r.get("PartsCount")
        try:
            first, count = await head(1)
            if count is None:  # the endpoint ignored PartNumber
                _lacks(caps, "part_head", src, "PartsCount missing from HeadObject?partNumber=1")
                return None
            caps.part_head = True
            if int(count) != n:
                return None
            if n == 1:
                return [first]
            last, _ = await head(n)
            layout = uniform_layout(size, first)
            if len(layout) == n and layout[-1] == last:
                return layout  # one part size (confirmed by the ETag at the end)
            streams, _ = self._limits()

            async def sized(pn: int) -> int:
                async with streams:
                    return (await head(pn))[0]
            middle = await asyncio.gather(*(sized(pn) for pn in range(2, n)))
            sizes = [first, *middle, last]
            return sizes if sum(sizes) == size else None
        except ClientError as exc:
            if _status(exc) == 404:
                raise ObjectNotFound(f"head parts of {job.source}: not found") from exc
            _lacks(caps, "part_head", src, _describe(exc))
            return None
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, f"head parts of {job.source}", src) from exc

    async def _parts_by_attributes(self, src: S3Connection, job: CopyJob, n: int, size: int, caps: _Caps
                                   ) -> list[int] | None:
        cs = await self._client(src)
        sizes: list[int] = []
        marker = 0
        try:
            while True:
                r = await cs.get_object_attributes(Bucket=job.bucket, Key=job.key, MaxParts=1000,
                                                   PartNumberMarker=marker, ObjectAttributes=["ObjectParts"])
                op = r.get("ObjectParts") or {}
                sizes += [int(p["Size"]) for p in op.get("Parts", []) if "Size" in p]
                if not op.get("IsTruncated"):
                    break
                marker = int(op["NextPartNumberMarker"])
        except (ClientError, BotoCoreError, ResponseParserError) as exc:
            if isinstance(exc, ClientError) and _status(exc) == 404:
                raise ObjectNotFound(f"attributes of {job.source}: not found") from exc
            _lacks(caps, "attributes", src, _describe(exc))
            return None
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, f"attributes of {job.source}", src) from exc
        caps.attributes = True
        return sizes if len(sizes) == n and sum(sizes) == size else None

    async def _source_tags(self, src: S3Connection, cs: Any, job: CopyJob, head: dict[str, Any]) -> dict[str, str]:
        """The source's tags; asked only when its HEAD counts some (x-amz-tagging-count), so an
        untagged object costs no call."""
        caps = self._cap(src)
        if caps.tagging is False or not int(head.get("TagCount") or 0):
            return {}
        try:
            r = await cs.get_object_tagging(Bucket=job.bucket, Key=job.key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"tags of {job.source}: not found") from exc
            _lacks(caps, "tagging", src, _describe(exc))
            return {}
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, f"tags of {job.source}", src) from exc
        caps.tagging = True
        return {t["Key"]: t["Value"] for t in r.get("TagSet", [])}


def _feed_all(hashers: list[LayoutHasher], data: bytearray) -> None:
    for h in hashers:
        h.feed(data)


def _status(exc: BaseException) -> int:
    if isinstance(exc, ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def _put_args(head: dict[str, Any], job: CopyJob, etag: str, tags: dict[str, str]) -> dict[str, Any]:
    """What travels with the object: its headers, user metadata (the caller's xdc-* keys over
    the source's) and tags."""
    args = {k: head[k] for k in _CARRIED_HEADERS if head.get(k)}
    meta = dict(head.get("Metadata") or {})
    meta.update(job.metadata)
    meta[META_SOURCE_ETAG] = etag
    if head.get("LastModified") is not None:  # the two-way conflict policy compares it
        meta[META_SOURCE_MTIME] = repr(head["LastModified"].timestamp())
    args["Metadata"] = meta
    if tags:
        args["Tagging"] = urlencode(tags)
    return args


def _if_match(etag: str) -> dict[str, str]:
    """Reads pinned to the version the copy started from (a change meanwhile: 412 -> superseded)."""
    return {"IfMatch": f'"{etag}"'} if etag else {}


def _lacks(caps: _Caps, name: str, conn: S3Connection, why: str) -> None:
    setattr(caps, name, False)
    caps.checked = time.monotonic()
    log.info("%s: no %s (%s): asked again later", conn.endpoint_url, name, why)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code') or _status(exc)} {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _guard_attributes(request: Any, **_: Any) -> None:
    """before-sign hook of GetObjectAttributes: an endpoint that does not know the call may serve the
    object instead (JuiceFS' gateway sends all of it, as the body of a 500): ask for one byte of it."""
    request.headers["Range"] = "bytes=0-0"


async def _read_exactly(body: Any, n: int, what: str, conn: S3Connection) -> bytearray:
    """n bytes of a response body into one buffer (a short or broken stream is a transient error)."""
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    try:
        while pos < n:
            chunk = await body.read(min(n - pos, MIB))
            if not chunk:
                break
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
    except asyncio.CancelledError:
        body.close()
        raise
    except Exception as exc:  # noqa: BLE001
        body.close()
        raise translate(exc, what, conn) from exc
    finally:
        view.release()
    if pos != n:
        body.close()
        raise IntegrityError(f"{what}: got {pos} of {n} bytes")
    return buf
