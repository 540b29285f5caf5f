"""The async copy engine on real endpoints: the JuiceFS S3 gateways of the local stack (which cannot
tell part sizes: the engine infers them) and a moto server (which reports them through HeadObject
PartNumber). Expected ETags come from the source endpoint itself and from hashlib (not from the
engine's code); bytes are compared whole."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aioboto3
import pytest
from moto.server import ThreadedMotoServer

from devtools.faultproxy import FaultPlan, FaultProxy, Rule
from devtools.procs import free_port
from tests.support import blob as _blob
from tests.support import put_multipart, s3_multipart_etag, site
from xdc import trace
from xdc.config import TracingSettings, XdcConfig
from xdc.errors import SupersededError, UnavailableError
from xdc.io.objects import CopyJob
from xdc.io.s3client import S3Connection
from xdc.io.s3copy import CopyEngine, EngineSettings
from xdc.io.store import S3Store
from xdc.retry import RetryPolicy

MIB = 2**20
SRC, DST = "idca-drive", "idcb-drive"
ROOT = Path(__file__).resolve().parents[3]


def open_uploads(store: S3Store, bucket: str, prefix: str) -> list[str]:
    return [u["Key"] for u in store.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]


@pytest.fixture
def engine() -> Iterator[CopyEngine]:
    with CopyEngine(EngineSettings(concurrency=8, buffer_bytes=64 * MIB, retry=RetryPolicy(5))) as e:
        yield e


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"  # type: ignore[union-attr]
    finally:
        server.stop()


def _stores(cfg: XdcConfig) -> tuple[S3Store, S3Store]:
    return site(cfg, "A").store, site(cfg, "B").store


def test_three_part_object_keeps_its_etag_metadata_and_bytes(stack_cfg: XdcConfig, engine: CopyEngine, tag: str) -> None:
    a, b = _stores(stack_cfg)
    parts = [_blob(5 * MIB, 1), _blob(5 * MIB, 2), _blob(3 * MIB, 3)]
    key = f"camera/{tag}/three.bin"
    etag = put_multipart(a, SRC, key, parts, ContentType="image/x-test", CacheControl="max-age=600",
                         Metadata={"owner": "perception", "run": tag})
    assert etag == s3_multipart_etag(parts)  # the gateway keeps S3's ETag (--keep-etag)
    res = engine.copy(a.conn, b.conn, CopyJob(SRC, key, DST, key, expect_etag=etag, metadata={"xdc-source-sequencer": "1"}))
    assert res.layout == "inferred" and res.parts == 3 and res.passes == 1  # JuiceFS cannot tell: inferred
    head = b.client.head_object(Bucket=DST, Key=key)
    assert head["ETag"].strip('"') == etag and res.etag_kept
    assert head["ContentType"] == "image/x-test" and head["CacheControl"] == "max-age=600"
    assert head["Metadata"]["owner"] == "perception" and head["Metadata"]["run"] == tag
    assert head["Metadata"]["xdc-source-etag"] == etag and head["Metadata"]["xdc-source-sequencer"] == "1"
    assert b.get(DST, key) == b"".join(parts)
    assert not open_uploads(b, DST, f"camera/{tag}/")


def test_single_part_object_streams_into_one_put_with_the_same_etag(stack_cfg: XdcConfig, engine: CopyEngine,
                                                                     tag: str) -> None:
    a, b = _stores(stack_cfg)
    data = _blob(40 * MIB, 5)  # above small_bytes: streamed, never whole in memory
    key = f"camera/{tag}/one.bin"
    a.client.put_object(Bucket=SRC, Key=key, Body=data, ContentType="application/x-lidar",
                        ContentDisposition="inline", Metadata={"frame": "7"})
    small = f"camera/{tag}/small.bin"
    a.put(SRC, small, b"tiny")
    results = engine.copy_many(a.conn, b.conn, [CopyJob(SRC, key, DST, key), CopyJob(SRC, small, DST, small)])
    for r in results:
        assert not isinstance(r, BaseException) and r.layout == "single" and r.etag_kept
    head = b.client.head_object(Bucket=DST, Key=key)
    assert head["ETag"].strip('"') == hashlib.md5(data).hexdigest()
    assert head["ContentType"] == "application/x-lidar" and head["ContentDisposition"] == "inline"
    assert head["Metadata"]["frame"] == "7"
    assert b.get(DST, key) == data and b.get(DST, small) == b"tiny"
    with pytest.raises(SupersededError):  # the event's ETag is not the object's any more
        engine.copy(a.conn, b.conn, CopyJob(SRC, key, DST, key + ".x", expect_etag="0" * 32))


def test_warmed_endpoints_need_no_client_made_at_the_first_copy(stack_cfg: XdcConfig, engine: CopyEngine, tag: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _stores(stack_cfg)
    key = f"camera/{tag}/warm.bin"
    a.put(SRC, key, b"warm")
    engine.warm([(a.conn, SRC), (b.conn, DST)])

    def no_new_client(*_: object, **__: object) -> None:
        raise AssertionError("a client was made inside the copy")
    monkeypatch.setattr(aioboto3.Session, "client", no_new_client)
    engine.copy(a.conn, b.conn, CopyJob(SRC, key, DST, key))
    assert b.get(DST, key) == b"warm"


def test_warming_an_endpoint_that_is_down_is_logged_and_its_copies_report_it(
        stack_cfg: XdcConfig, engine: CopyEngine, tag: str, caplog: pytest.LogCaptureFixture) -> None:
    a, _ = _stores(stack_cfg)
    down = S3Connection(f"http://127.0.0.1:{free_port()}", "k", "s", connect_timeout_s=1.0)
    key = f"camera/{tag}/to-nowhere.bin"
    a.put(SRC, key, b"x")
    with caplog.at_level(logging.WARNING, logger="xdc.io.s3copy"):
        engine.warm([(a.conn, SRC), (down, DST)], timeout_s=5.0)  # best effort: no error
    assert f"warming {down.endpoint_url}" in caplog.text
    [res] = engine.copy_many(a.conn, down, [CopyJob(SRC, key, DST, key)])
    assert isinstance(res, UnavailableError)


def test_second_candidate_part_size_is_found_and_the_copy_redone(stack_cfg: XdcConfig, engine: CopyEngine,
                                                                  tag: str) -> None:
    """15 MiB in 3 parts: 5 MiB (a common writer default) is tried first; the writer used 6 MiB."""
    a, b = _stores(stack_cfg)
    parts = [_blob(6 * MIB, 11), _blob(6 * MIB, 12), _blob(3 * MIB, 13)]
    key = f"camera/{tag}/six.bin"
    etag = put_multipart(a, SRC, key, parts)
    res = engine.copy(a.conn, b.conn, CopyJob(SRC, key, DST, key))
    assert res.layout == "inferred" and res.passes == 2 and res.etag_kept
    assert b.head(DST, key).etag == etag and b.get(DST, key) == b"".join(parts)
    assert engine.stats["aborted"] >= 1 and not open_uploads(b, DST, f"camera/{tag}/")  # the first pass was aborted
    # the part size learned for this bucket comes first next time: one pass
    key2 = f"camera/{tag}/six-again.bin"
    put_multipart(a, SRC, key2, [_blob(6 * MIB, 14), _blob(6 * MIB, 15), _blob(1 * MIB, 16)])
    assert engine.copy(a.conn, b.conn, CopyJob(SRC, key2, DST, key2)).passes == 1


def test_irregular_layout_is_copied_rechunked_and_says_why(stack_cfg: XdcConfig, engine: CopyEngine, tag: str) -> None:
    a, b = _stores(stack_cfg)
    parts = [_blob(6 * MIB, 21), _blob(5 * MIB, 22), _blob(3 * MIB, 23)]  # no single part size
    key = f"camera/{tag}/odd.bin"
    etag = put_multipart(a, SRC, key, parts)
    res = engine.copy(a.conn, b.conn, CopyJob(SRC, key, DST, key))
    assert res.layout == "rechunked" and not res.etag_kept
    assert "none of" in res.note and etag in res.note
    assert b.head(DST, key).etag == res.landed.etag != etag
    assert b.get(DST, key) == b"".join(parts)  # the bytes are right all the same
    assert not open_uploads(b, DST, f"camera/{tag}/")


def test_reported_layout_and_tags_from_an_endpoint_that_tells(moto_url: str, stack_cfg: XdcConfig,
                                                              engine: CopyEngine, tag: str) -> None:
    """moto answers HeadObject?partNumber with PartsCount: irregular parts are copied as they are."""
    moto = S3Store(moto_url, "testing", "testing")
    moto.ensure_bucket("src-bucket")
    moto.ensure_bucket("dst-bucket")
    parts = [_blob(6 * MIB, 31), _blob(5 * MIB, 32), _blob(2 * MIB, 33)]
    key = f"{tag}/irregular.bin"
    etag = put_multipart(moto, "src-bucket", key, parts, ContentType="image/jpeg", Metadata={"k": "v"},
                         Tagging="team=perception&tier=hot")
    assert etag == s3_multipart_etag(parts)
    res = engine.copy(moto.conn, moto.conn, CopyJob("src-bucket", key, "dst-bucket", key))
    assert res.layout == "reported" and res.etag_kept
    head = moto.client.head_object(Bucket="dst-bucket", Key=key)
    assert head["ETag"].strip('"') == etag and head["ContentType"] == "image/jpeg" and head["Metadata"]["k"] == "v"
    tags = moto.client.get_object_tagging(Bucket="dst-bucket", Key=key)["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {"team": "perception", "tier": "hot"}
    # and into the JuiceFS gateway of B (which stores no tags: GetObjectTagging is NotImplemented there)
    b = site(stack_cfg, "B").store
    res = engine.copy(moto.conn, b.conn, CopyJob("src-bucket", key, DST, f"camera/{tag}/from-moto.bin"))
    assert res.layout == "reported" and b.head(DST, f"camera/{tag}/from-moto.bin").etag == etag


def test_transient_faults_are_retried_part_by_part(stack_cfg: XdcConfig, tag: str) -> None:
    """Through the fault proxy (503s, resets, truncated bodies on GETs of A): every part is retried
    on its own and the copy still lands with the source's ETag."""
    a, b = _stores(stack_cfg)
    parts = [_blob(5 * MIB, 41), _blob(5 * MIB, 42), _blob(5 * MIB, 43), _blob(1 * MIB, 44)]
    key = f"camera/{tag}/faulty.bin"
    etag = put_multipart(a, SRC, key, parts)
    seed = int.from_bytes(os.urandom(2), "big")
    print(f"fault seed {seed}")
    # a reset and a truncated part body for sure (a random plan alone can land no fault on a few
    # GETs), then random faults on top
    sure = [Rule("reset", f"/{SRC}/{key}", ("GET",), times=1), Rule("truncate", f"/{SRC}/{key}", ("GET",), times=1)]
    plan = FaultPlan(slowdown=0.15, reset=0.1, truncate=0.15, truncate_min_bytes=MIB, methods=("GET",), seed=seed,
                     rules=sure)
    with FaultProxy(a.endpoint_url, plan) as p, \
            CopyEngine(EngineSettings(concurrency=4, retry=RetryPolicy(12, base_s=0.01, cap_s=0.1))) as eng:
        faulty = S3Connection(p.url, a.conn.access_key, a.conn.secret_key)
        res = eng.copy(faulty, b.conn, CopyJob(SRC, key, DST, key))
        assert p.counts["reset"] >= 1 and p.counts["truncate"] >= 1, p.counts
    assert res.etag_kept and b.head(DST, key).etag == etag and b.get(DST, key) == b"".join(parts)


def test_cancel_mid_copy_aborts_the_upload(stack_cfg: XdcConfig, tag: str) -> None:
    a, b = _stores(stack_cfg)
    key = f"camera/{tag}/cancelled.bin"
    put_multipart(a, SRC, key, [_blob(8 * MIB, 50 + i) for i in range(24)])  # 192 MiB
    eng = CopyEngine(EngineSettings(concurrency=1, buffer_bytes=16 * MIB))
    outcome: list[object] = []
    t = threading.Thread(target=lambda: outcome.append(_try(lambda: eng.copy(a.conn, b.conn, CopyJob(SRC, key, DST, key)))))
    t.start()
    deadline = time.monotonic() + 60
    while eng.stats["parts"] < 2:  # mid-copy: an upload is open and parts are in it
        assert time.monotonic() < deadline and t.is_alive(), f"copy did not get going: {outcome}"
        time.sleep(0.05)
    assert open_uploads(b, DST, f"camera/{tag}/") == [key]
    eng.close()
    t.join(30)
    assert outcome and isinstance(outcome[0], BaseException), outcome  # cancelled, not completed
    assert open_uploads(b, DST, f"camera/{tag}/") == []  # aborted, nothing left open
    assert not b.exists(DST, key)


def _try(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
        return exc


def test_sweep_aborts_abandoned_uploads_under_the_prefix_only(stack_cfg: XdcConfig, engine: CopyEngine, tag: str) -> None:
    b = site(stack_cfg, "B").store
    c = b.client
    left = c.create_multipart_upload(Bucket=DST, Key=f"camera/{tag}/left-by-a-killed-copier.bin")
    other = c.create_multipart_upload(Bucket=DST, Key=f"lidar/{tag}/not-ours.bin")
    mine = c.create_multipart_upload(Bucket=DST, Key=f"camera/{tag}/in-flight.bin")
    b.engine = engine
    engine.open_uploads[mine["UploadId"]] = (b.endpoint_url, DST, f"camera/{tag}/in-flight.bin")
    assert b.sweep_uploads(DST, f"camera/{tag}/", older_than_s=3600) == []  # too young
    assert b.sweep_uploads(DST, f"camera/{tag}/", older_than_s=0) == [f"camera/{tag}/left-by-a-killed-copier.bin"]
    assert open_uploads(b, DST, f"camera/{tag}/") == [f"camera/{tag}/in-flight.bin"]
    assert open_uploads(b, DST, f"lidar/{tag}/") == [f"lidar/{tag}/not-ours.bin"]
    for u, k in ((other, f"lidar/{tag}/not-ours.bin"), (mine, f"camera/{tag}/in-flight.bin")):
        c.abort_multipart_upload(Bucket=DST, Key=k, UploadId=u["UploadId"])
    del left


def test_copy_of_1_gib_stays_under_its_memory_bound(stack_cfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    """A 1 GiB object (128 parts of 8 MiB, as boto3 writes it) copied by a process of its own:
    peak RSS (VmHWM) < 320 MiB with a 64 MiB part buffer and 8 transfers (the interpreter, boto3
    and aioboto3 take about 110 MiB of it)."""
    a, b = _stores(stack_cfg)
    key = f"camera/{tag}/1gib.bin"
    parts = 128
    md5s = []
    c = a.client
    up = c.create_multipart_upload(Bucket=SRC, Key=key)
    done = []
    for i in range(1, parts + 1):
        p = _blob(8 * MIB, i)
        md5s.append(hashlib.md5(p).digest())
        r = c.upload_part(Bucket=SRC, Key=key, UploadId=up["UploadId"], PartNumber=i, Body=p)
        done.append({"ETag": r["ETag"], "PartNumber": i})
    etag = c.complete_multipart_upload(Bucket=SRC, Key=key, UploadId=up["UploadId"],
                                       MultipartUpload={"Parts": done})["ETag"].strip('"')
    assert etag == hashlib.md5(b"".join(md5s)).hexdigest() + f"-{parts}"
    script = tmp_path / "copy1g.py"
    script.write_text(f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from xdc.io.objects import CopyJob
from xdc.io.s3client import S3Connection
from xdc.io.s3copy import CopyEngine, EngineSettings
a = S3Connection({a.endpoint_url!r}, {a.conn.access_key!r}, {a.conn.secret_key!r})
b = S3Connection({b.endpoint_url!r}, {b.conn.access_key!r}, {b.conn.secret_key!r})
t0 = time.perf_counter()
with CopyEngine(EngineSettings(concurrency=8, buffer_bytes=64 * 2**20)) as e:
    r = e.copy(a, b, CopyJob({SRC!r}, {key!r}, {DST!r}, {key!r}))
secs = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"etag": r.landed.etag, "layout": r.layout, "seconds": secs, "hwm_kib": int(hwm)}}))
""")
    cp = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr[-3000:]
    import json
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    print(f"1 GiB copy: {out['seconds']:.1f} s ({1024 / out['seconds']:.0f} MiB/s), "
          f"peak RSS {out['hwm_kib'] / 1024:.0f} MiB, layout {out['layout']}")
    assert out["etag"] == etag and out["layout"] == "inferred"
    assert out["hwm_kib"] < 320 * 1024
    assert b.head(DST, key).etag == etag
    a.delete(SRC, key)
    b.delete(DST, key)


class _Spans:
    """The built-in sink's rows, kept in memory."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __call__(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def under(self, parent: dict) -> dict[str, dict]:
        kids = [r for r in self.rows if r["parent_id"] == parent["span_id"] and r["trace_id"] == parent["trace_id"]]
        assert len({r["name"] for r in kids}) == len(kids), kids  # one of each step
        return {r["name"]: r for r in kids}


@pytest.fixture
def spans() -> Iterator[_Spans]:
    sink = _Spans()
    trace.configure(TracingSettings(sample_ratio=1.0, export_interval_ms=10), component="mirror", dc="B",
                    exporters=[trace.RowExporter(sink)])
    try:
        yield sink
    finally:
        trace.shutdown()


def test_traced_jobs_get_the_copy_steps_under_their_own_span(stack_cfg: XdcConfig, engine: CopyEngine,
                                                              spans: _Spans, tag: str) -> None:
    """Concurrent jobs, each with its event's span as parent: every sampled one gets COPY and the
    steps inside it (source read, transfer, target write), in order and within the copy; a job with
    an unsampled or no parent records nothing; a failed copy's steps say so."""
    a, b = _stores(stack_cfg)
    parts = [_blob(5 * MIB, 61), _blob(5 * MIB, 62), _blob(2 * MIB, 63)]
    multi, small, plain, gone = (f"camera/{tag}/{n}" for n in ("multi.bin", "small.bin", "plain.bin", "gone.bin"))
    put_multipart(a, SRC, multi, parts)
    a.put(SRC, small, b"tiny frame")
    a.put(SRC, plain, b"not traced")
    roots = {k: trace.root("mirror.apply", always=True, attributes=trace.attrs(dc="B", key=f"{DST}/{k}"))
             for k in (multi, small, gone)}
    unsampled = trace.parse_traceparent(f"00-{'1' * 32}-{'2' * 16}-00")
    jobs = [CopyJob(SRC, multi, DST, multi, trace=roots[multi]), CopyJob(SRC, small, DST, small, trace=roots[small]),
            CopyJob(SRC, plain, DST, plain, trace=unsampled), CopyJob(SRC, plain, DST, plain + ".2"),
            CopyJob(SRC, gone, DST, gone, trace=roots[gone])]
    results = engine.copy_many(a.conn, b.conn, jobs)
    assert [type(r).__name__ for r in results] == ["CopyResult"] * 4 + ["ObjectNotFound"]
    for r in roots.values():
        trace.end(r)
    trace.flush()
    rows = {(r["name"], r["span_id"]): r for r in spans.rows}
    assert sum(1 for name, _ in rows if name == trace.COPY) == 3  # the traced ones only
    for key, writes in ((multi, 3), (small, None)):
        root = next(r for r in spans.rows if r["span_id"] == f"{trace.context_of(roots[key]).span_id:016x}")
        (copy,) = spans.under(root).values()
        assert copy["name"] == trace.COPY and copy["key"] == f"{DST}/{key}" and copy["dc"] == "B"
        steps = spans.under(copy)
        order = [steps[n] for n in (trace.SOURCE_READ, trace.TRANSFER, trace.TARGET_WRITE)]
        assert len(steps) == 3, steps.keys()
        for prev, nxt in zip(order, order[1:]):
            assert prev["end_time"] <= nxt["start_time"] + 1e-6, (prev["name"], nxt["name"])
        assert all(copy["start_time"] <= s["start_time"] <= s["end_time"] <= copy["end_time"] for s in order)
        assert all(s["status"] == "ok" and s["dc"] == "B" for s in order)
        assert order[2]["attributes"].get("xdc.parts") == writes  # a multipart upload completed, or one PUT
    failed = next(r for r in spans.rows if r["span_id"] == f"{trace.context_of(roots[gone]).span_id:016x}")
    (copy,) = spans.under(failed).values()
    assert copy["status"] == "error" and spans.under(copy)[trace.SOURCE_READ]["status"] == "error"


def test_a_copy_through_the_store_is_a_step_of_the_callers_span(stack_cfg: XdcConfig, engine: CopyEngine,
                                                                spans: _Spans, tag: str) -> None:
    """`S3Store.copy_to` (reconciliations) hands the caller's current span to the engine's thread:
    the steps land under it, with no second COPY."""
    a, b = _stores(stack_cfg)
    a = S3Store(a.endpoint_url, a.conn.access_key, a.conn.secret_key, engine=engine)
    key = f"camera/{tag}/reconciled.bin"
    a.put(SRC, key, b"reconciled")
    root = trace.root("mirror.apply", always=True, attributes=trace.attrs(dc="B"))
    with trace.use(root), trace.step(trace.COPY) as copy_span:
        a.copy_to(b, SRC, key, DST, key)
    trace.end(root)
    trace.flush()
    copy = next(r for r in spans.rows if r["span_id"] == f"{trace.context_of(copy_span).span_id:016x}")
    assert set(spans.under(copy)) == {trace.SOURCE_READ, trace.TRANSFER, trace.TARGET_WRITE}
    assert sum(1 for r in spans.rows if r["name"] == trace.COPY) == 1
