"""Faults of the servers under the mirror: S3 errors through a fault-injecting proxy, and kill -9 of
a real Kafka broker (log on disk) restarted on its data directory while the mirror runs. Nothing
may be lost; what can never succeed goes to the dead-letter topic with its reason, and the rest
proceeds; the running mirror must resume by itself."""
from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools import stack
from devtools.faultproxy import FaultPlan, FaultProxy, Rule
from mirror.dlq import read_letters
from mirror.runner import Mirror
from tests.mirror.chaos_support import (
    DST_BUCKET,
    SRC_BUCKET,
    Workload,
    committed_offsets,
    compare_data,
    compare_metadata,
    variant,
)
from tests.support import restore_env, site, topo
from xdc.config import XdcConfig
from xdc.metrics import Metrics, new_registry

REPORT: dict[str, Any] = {}  # numbers for the report, printed by the last test of the module


def _objects(cfg: XdcConfig, tag: str, n: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    src = site(cfg, "A", seen_from="A").store  # the store announces each put
    out: dict[str, bytes] = {}
    for i in range(n):
        key = f"camera/{tag}/o{i}.bin"
        data = rng.randbytes(rng.randint(200, 60_000))
        src.put(SRC_BUCKET, key, data)
        out[key] = data
    return out


def _through(cfg: XdcConfig, src_proxy: FaultProxy, dst_proxy: FaultProxy, attempts: int) -> XdcConfig:
    """The mirror in B reads A through A's external URL and writes B through B's internal one."""
    return variant(cfg, {"datacenters": {"A": {"s3": {"external_url": src_proxy.url}},
                                         "B": {"s3": {"internal_url": dst_proxy.url}}},
                         "mirror": {"max_attempts": attempts}})


def _run_once(cfg: XdcConfig) -> Any:
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
        return m.run(once=True)


def test_transient_s3_faults_lose_nothing(xcfg: XdcConfig, tag: str) -> None:
    n = 40
    _objects(xcfg, tag, n)
    up_a, up_b = xcfg.dc("A").s3.external_url, xcfg.dc("B").s3.internal_url
    plan = dict(slowdown=0.08, reset=0.05, latency=0.1, latency_s=0.02, truncate=0.1)
    with FaultProxy(up_a, FaultPlan(**plan, seed=1)) as pa, FaultProxy(up_b, FaultPlan(**plan, seed=2)) as pb:
        stats = _run_once(_through(xcfg, pa, pb, attempts=6))
        injected = {k: pa.counts[k] + pb.counts[k] for k in ("slowdown", "reset", "latency", "truncate")}
        requests = pa.counts["requests"] + pb.counts["requests"]
    REPORT["transient"] = {"injected": injected, "requests": requests, "objects": n}
    assert stats.dead_letters == 0
    d = compare_data(xcfg, tag)
    assert d.ok and d.matched == n, d
    REPORT["transient"].update(lost=len(d.missing), diverged=len(d.differ))
    assert all(injected[k] > 0 for k in ("slowdown", "reset", "truncate")), injected


def test_permanent_failures_go_to_the_dead_letter_topic(xcfg: XdcConfig, tag: str) -> None:
    files = _objects(xcfg, tag, 12)
    denied, torn = f"camera/{tag}/o3.bin", f"camera/{tag}/o7.bin"
    rules_b = [Rule("access_denied", f"/{DST_BUCKET}/{denied}", ("PUT",))]
    rules_a = [Rule("truncate", f"/{SRC_BUCKET}/{torn}", ("GET",))]
    up_a, up_b = xcfg.dc("A").s3.external_url, xcfg.dc("B").s3.internal_url
    with FaultProxy(up_a, FaultPlan(rules=rules_a)) as pa, FaultProxy(up_b, FaultPlan(rules=rules_b)) as pb:
        stats = _run_once(_through(xcfg, pa, pb, attempts=2))
        REPORT["permanent"] = {"access_denied": pb.counts["access_denied"], "truncate": pa.counts["truncate"]}
    assert stats.dead_letters == 2 and stats.applied == 10
    letters = {json.loads(d.value)["Records"][0]["s3"]["object"]["key"]: d
               for d in read_letters(site(xcfg, "B"))}
    assert set(letters) == {denied, torn}
    assert letters[denied].reason == "copy_failed" and "AccessDenied" in letters[denied].detail
    assert letters[torn].reason == "copy_failed_after_retries"
    assert letters[torn].origin_topic == xcfg.dc("A").kafka.topics.events
    dst = site(xcfg, "B", seen_from="B").store
    for key, data in files.items():
        if key in (denied, torn):
            assert not dst.exists(DST_BUCKET, key)
        else:
            assert dst.get(DST_BUCKET, key) == data
    # the catalog does not claim what never landed; the offsets moved past the letters
    cat = site(xcfg, "B").state.catalog
    assert cat.get(DST_BUCKET, denied) is None and cat.get(DST_BUCKET, torn) is None
    assert sum(cat.offsets(f"{xcfg.mirror.group_id}.B").values()) == 12


# -- broker restart ------------------------------------------------------------------------------
CRED_VARS = [f"XDC_{dc}_{k}" for dc in ("A", "B") for k in ("ACCESS_KEY", "SECRET_KEY")]


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, XdcConfig, dict[str, str]]]:
    """A second stack of our own (its brokers get killed); stack.up puts its credentials into
    os.environ, so the session stack's are put back at once and the test sets these only while it runs."""
    run = tmp_path_factory.mktemp("restart")
    saved = {k: os.environ.get(k) for k in CRED_VARS}
    try:
        cfg = stack.up(run, nodes=0, config_overrides={"mirror": {"batch_max_records": 20, "batch_max_seconds": 0.2}})
        creds = {k: os.environ[k] for k in CRED_VARS}
        restore_env(saved)
        yield run, cfg, creds
    finally:
        restore_env(saved)
        stack.down(run)


@pytest.mark.slow
def test_broker_kill_mid_stream_mirror_resumes_and_loses_nothing(
        own_stack: tuple[Path, XdcConfig, dict[str, str]], tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the source broker, then of the target broker, each restarted on its data dir while
    events flow. The mirror that was running must converge by itself (no second mirror, no drain):
    if it is stuck, the test fails with what is missing."""
    from tests.conftest import isolated
    run, base, creds = own_stack
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    cfg = isolated(base, tag)
    work = Workload(cfg, tag, seed=7)
    stop = threading.Event()
    errors: list[BaseException] = []

    def mirror_loop() -> None:
        try:
            with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
                m.run(stop=stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=mirror_loop, name="mirror")
    t.start()
    restarts: dict[str, float] = {}
    converge_s = None
    try:
        for dc in ("A", "B"):
            for _ in range(25):
                work.step()
            work.flush()
            time.sleep(1.0)  # the mirror is joined and applying
            restarts[dc] = stack.restart_broker(run, dc, hard=True).ready_s or 0.0
        for _ in range(25):
            work.step()
        work.flush()
        work.close()
        t_done = time.monotonic()
        deadline = t_done + 120
        while time.monotonic() < deadline and t.is_alive() and not errors:
            if compare_data(cfg, tag).ok and compare_metadata(cfg, tag).ok:
                converge_s = time.monotonic() - t_done
                break
            time.sleep(0.5)
    finally:
        stop.set()
        t.join(timeout=60)
    assert not errors, errors
    d, dm = compare_data(cfg, tag), compare_metadata(cfg, tag)
    REPORT["broker_restart"] = {"kill9": list(restarts), "ready_s": restarts, "events": work.published,
                                "converged_s": None if converge_s is None else round(converge_s, 1),
                                "lost": len(d.missing) + len(dm.missing),
                                "diverged": len(d.differ) + len(dm.differ) + len(d.extra) + len(dm.extra)}
    assert converge_s is not None, f"the running mirror did not catch up within 120 s after the restarts: {d} {dm}"
    assert d.ok and dm.ok, (d, dm)
    cat = site(cfg, "B").state.catalog
    group = f"{cfg.mirror.group_id}.B"
    done = cat.offsets(group)
    committed = committed_offsets(cfg, "A", group)
    assert committed, "the mirror's group has no committed offsets on the restarted broker"
    for tp, off in committed.items():
        assert off <= done.get(tp, 0), (tp, off, done)


def test_report(capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\nFAULTS REPORT " + json.dumps(REPORT, sort_keys=True))
