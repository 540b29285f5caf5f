"""Dataset releases on Kafka: the follower prewarms each datacenter a release names, retries what
may pass, dead-letters the rest, records every release in the ledger, and commits only after one of
the two; the reconciler drives again what has no result (`xdc prewarm follow`, `xdc prewarm reconcile`). The first
runs on each cache backend: the JuiceFS stack and the Alluxio stack (tests/conftest.py `cache_backend`)."""
from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from cache_client.prewarm.pipeline import Request, check_list, run_prewarm
from cache_client.prewarm.reconcile import reconcile
from cache_client.prewarm.release import (
    ReleaseFollower,
    follow_releases,
    publish_release,
)
from cache_client.selectors import roots_from_args
from devtools.faultproxy import FaultPlan, FaultProxy, Rule
from mirror.dlq import read_letters
from mirror.ingest import ingest
from mirror.runner import Mirror
from tests.cache_client.indexes import CAMS, nuscenes_v2_infos, under
from tests.mirror.chaos_support import committed_offsets, variant, write_config
from tests.support import brokers, produce, read_topic, site, topo
from xdc.app.cli import main as cli_main
from xdc.config import XdcConfig
from xdc.events import ReadyEvent, ReleaseEvent, parse_message
from xdc.io.kafka import Record, client_kwargs
from xdc.metrics import Metrics, new_registry

SRC, DST = "idca-drive", "idcb-drive"
pytestmark = pytest.mark.both_backends(postgres="stress")



def _consumed(cfg: XdcConfig, dc: str, group: str, topic: str) -> list[Record]:
    """The messages of `topic` below the group's committed offsets."""
    done = committed_offsets(cfg, dc, group)
    return [r for r in read_topic(cfg, dc, topic) if r.offset < done.get((topic, r.partition), 0)]


def _ready(records: list[Record], dataset: str) -> list[Record]:
    """Those of `records` that are the dataset.ready event of `dataset`."""
    out = []
    for r in records:
        try:
            evs = parse_message(r.value)
        except Exception:  # noqa: BLE001 - a malformed message is not a ready event
            continue
        if len(evs) == 1 and isinstance(evs[0], ReadyEvent) and evs[0].dataset == dataset:
            out.append(r)
    return out

def _mirrored_files(cfg: XdcConfig, tmp_path: Path, tag: str, n: int = 4) -> list[str]:
    """n files ingested into A and mirrored into B; their keys as a file list names them."""
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    for i in range(n):
        (files / f"{i}.bin").write_bytes(bytes([i]) * 300_000)
    ingest(site(cfg, "A"), files, SRC, f"camera/{tag}/")
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
        assert m.run(once=True).applied == n
    return [f"{SRC}/camera/{tag}/{i}.bin" for i in range(n)]


def _list(tmp_path: Path, keys: list[str], name: str = "release.txt") -> Path:
    p = tmp_path / name
    p.write_text("".join(k + "\n" for k in keys))
    return p


def test_release_event_prewarms_every_named_datacenter(cache_xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    xcfg = cache_xcfg
    keys = _mirrored_files(xcfg, tmp_path, tag)
    manifest = tmp_path / "release.txt"
    manifest.write_text("".join(k + "\n" for k in keys) + "\n" + keys[0] + "\n")
    publish_release(site(xcfg, "A"), ReleaseEvent(f"ds-{tag}", "v1", str(manifest), time.time(), ("A", "B")))

    for dc in ("A", "B"):
        reports = follow_releases(topo(xcfg, dc), once=True)
        assert [r.dataset for r in reports] == [f"ds-{tag}"]
        assert reports[0].complete
        check = check_list(site(xcfg, dc), Request(str(manifest)))
        assert check.cached_ratio == 1.0 and check.counts.get("cached") == 4
        entry = site(xcfg, dc).state.releases.get(f"ds-{tag}", "v1")
        assert entry is not None and (entry.state, entry.attempts) == ("warm", 1)
    # a datacenter the release does not name does nothing, and says so in its ledger
    publish_release(site(xcfg, "A"), ReleaseEvent(f"other-{tag}", "v1", str(manifest), time.time(), ("A",)))
    assert follow_releases(topo(xcfg, "B"), once=True) == []
    assert site(xcfg, "B").state.releases.get(f"other-{tag}", "v1").state == "not_here"  # type: ignore[union-attr]


def test_list_unreadable_twice_ends_warm_and_the_offset_moves_on_only_after(
        xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    """The release's file list is in B's store, but its first two reads fail (500 from the
    endpoint); the third works. The follower tries three times, warms the dataset, and commits the
    release's offset only then: sampled while it retries, the group's committed offset never passes
    the release before the third read."""
    keys = _mirrored_files(xcfg, tmp_path, tag)
    list_key = f"releases/{tag}/list.txt"
    site(xcfg, "B").store.put(DST, list_key, "".join(k + "\n" for k in keys).encode())
    uri = f"s3://{DST}/{list_key}"
    dataset = f"ds-{tag}"
    rule = Rule("internal_error", f"/{DST}/{list_key}", ("GET",), times=2)
    with FaultProxy(xcfg.dc("B").s3.internal_url, FaultPlan(rules=[rule])) as proxy:
        # one S3 call per try (no retry inside the store), so "a try" is one read of the list
        cfg = variant(xcfg, {"datacenters": {"B": {"s3": {"internal_url": proxy.url}}}, "mirror": {"max_attempts": 1},
                             "prewarm": {"release_attempts": 5, "release_retry_seconds": 0.5}})
        publish_release(site(cfg, "B"), ReleaseEvent(dataset, "v1", uri, time.time(), ("B",)))
        topic = cfg.dc("B").kafka.topics.releases
        (rec,) = read_topic(cfg, "B", topic)
        tp = (topic, rec.partition)
        group = f"{cfg.prewarm.group_id}.B"
        samples: list[tuple[float, int | None]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                t = time.time()
                samples.append((t, committed_offsets(cfg, "B", group).get(tp)))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, name="offsets")
        with ReleaseFollower(topo(cfg, "B")) as follower:
            sampler.start()
            try:
                reports = follower.run(once=True, max_seconds=120)
            finally:
                stop.set()
                sampler.join(timeout=30)
            retries = follower.loop.stats.retries
        reads = proxy.requests_to(f"/{DST}/{list_key}", "GET")
    assert [fate for _, _, _, fate in reads] == ["internal_error", "internal_error", "ok"], reads
    assert retries == 2 and [r.dataset for r in reports] == [dataset] and reports[0].complete
    third = reads[2][0]
    while_retrying = [c for t, c in samples if t < third]
    assert while_retrying, "no sample of the committed offset was taken while the follower retried"
    assert all(c is None or c <= rec.offset for c in while_retrying), (rec.offset, while_retrying)
    # moved past the release; whatever else it passed is the dataset.ready the warm published
    past = [r for r in _consumed(cfg, "B", group, topic) if r.partition == rec.partition and r.offset > rec.offset]
    assert committed_offsets(cfg, "B", group)[tp] == rec.offset + 1 + len(_ready(past, dataset)) \
        and len(_ready(past, dataset)) == len(past), [r.value[:80] for r in past]
    entry = site(xcfg, "B").state.releases.get(dataset, "v1")
    assert entry is not None and (entry.state, entry.attempts) == ("warm", 3), entry
    assert check_list(site(xcfg, "B"), Request(uri)).cached_ratio == 1.0


def test_malformed_and_permanently_failing_releases_are_dead_lettered_once(
        xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    """A release message that does not validate and one whose file list does not exist go to the
    dead-letter topic with their reason (no retries for either), the ledger says so, and the offset
    moves past both: the release behind them is warmed."""
    keys = _mirrored_files(xcfg, tmp_path, tag, n=2)
    topic = xcfg.dc("B").kafka.topics.releases
    bad = json.dumps({"type": "dataset.released", "dataset": f"bad-{tag}", "manifest": "x"}).encode()  # no version
    produce(xcfg, "B", topic, [(b"k", bad)])
    publish_release(site(xcfg, "B"), ReleaseEvent(f"gone-{tag}", "v1", str(tmp_path / "missing.txt"), time.time(), ("B",)))
    publish_release(site(xcfg, "B"), ReleaseEvent(f"ok-{tag}", "v1", str(_list(tmp_path, keys)), time.time(), ("B",)))
    with ReleaseFollower(topo(xcfg, "B")) as follower:
        reports = follower.run(once=True, max_seconds=120)
        assert follower.loop.stats.retries == 0
    assert [r.dataset for r in reports] == [f"ok-{tag}"]
    letters = {d.reason: d for d in read_letters(site(xcfg, "B"))}
    assert set(letters) == {"bad_release", "file_list"}, letters
    assert letters["bad_release"].value == bad and letters["bad_release"].origin_topic == topic
    ledger = site(xcfg, "B").state.releases
    gone = ledger.get(f"gone-{tag}", "v1")
    assert gone is not None and gone.state == "dead_lettered" and "missing.txt" in gone.detail
    group = f"{xcfg.prewarm.group_id}.B"
    # past all three; beyond them only the dataset.ready the warm published (same topic), if read
    got = _consumed(xcfg, "B", group, topic)
    releases = [r for r in got if r.value == bad or isinstance(parse_message(r.value)[0], ReleaseEvent)]
    assert len(releases) == 3 and len(got) == 3 + len(_ready(got, f"ok-{tag}")), [r.value[:80] for r in got]


@pytest.mark.both_backends  # on PostgreSQL in CI too (the module's other tests: with --stress)
def test_reconciler_drives_again_a_release_whose_offset_was_committed_before_it_was_stored(
        xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    """The Airflow trigger commits a release's offset before the asset event is stored: a crash in
    between loses the release for the DAG. The reconciler compares the releases topics, the ledger
    and the registrations, and warms what has no result; a release with a result is left alone."""
    keys = _mirrored_files(xcfg, tmp_path, tag, n=3)
    manifest = str(_list(tmp_path, keys))
    lost = [f"lost{i}-{tag}" for i in range(2)]
    for ds in lost:
        publish_release(site(xcfg, "A"), ReleaseEvent(ds, "v1", manifest, time.time(), ("B",)))
    # the trigger's consumer: reads the releases, commits their offsets, then dies before storing them
    c = KafkaConsumer(xcfg.dc("A").kafka.topics.releases, **client_kwargs(brokers(xcfg, "A")),
                      group_id=f"{tag}-airflow-trigger", enable_auto_commit=False, auto_offset_reset="earliest",
                      session_timeout_ms=6000, heartbeat_interval_ms=1000)
    try:
        got: list[object] = []
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            got += [m for ms in c.poll(timeout_ms=500).values() for m in ms]
        assert len(got) == 2
        c.commit()
    finally:
        c.close()
    # what another path did: warmed by hand with a registration (no ledger), and one for A only
    run_prewarm(site(xcfg, "B"), Request(manifest, f"byhand-{tag}", "v1"))
    publish_release(site(xcfg, "A"), ReleaseEvent(f"byhand-{tag}", "v1", manifest, time.time(), ("B",)))
    publish_release(site(xcfg, "A"), ReleaseEvent(f"elsewhere-{tag}", "v1", manifest, time.time(), ("A",)))

    b = site(xcfg, "B")
    recent = reconcile(b)  # default grace (10 min): everything is too recent to touch
    assert not recent.redriven and sorted(recent.recent) == sorted(f"{d}@v1" for d in lost)
    dry = reconcile(b, grace_s=0, dry_run=True)
    assert sorted(r["release"] for r in dry.redriven) == sorted(f"{d}@v1" for d in lost)
    assert all(b.state.releases.get(d, "v1") is None for d in lost)  # a dry run records nothing
    rep = reconcile(b, grace_s=0)
    print("\nRECONCILE REPORT " + json.dumps(rep.to_dict()))
    assert (rep.on_topics, rep.registered, rep.in_ledger) == (3, 1, 0), rep.to_dict()
    assert sorted((r["release"], r["outcome"]) for r in rep.redriven) == sorted((f"{d}@v1", "warm") for d in lost)
    for ds in lost:
        entry = b.state.releases.get(ds, "v1")
        assert entry is not None and (entry.state, entry.attempts) == ("warm", 1)
        assert entry.origin.startswith(f"A:{xcfg.dc('A').kafka.topics.releases}[")
    assert check_list(b, Request(manifest)).cached_ratio == 1.0
    again = reconcile(b, grace_s=0)
    assert not again.redriven and again.in_ledger == 2 and again.registered == 1
    # the follower, given the same deliveries later, finds the reconciled ones' result and does not
    # warm them again; the one warmed by hand has no ledger entry for its delivery: warmed (cheaply)
    assert [r.dataset for r in follow_releases(topo(xcfg, "B"), once=True)] == [f"byhand-{tag}"]


def _nuscenes_release(xcfg: XdcConfig, tmp_path: Path, tag: str) -> tuple[str, list[str], list[str]]:
    """A nuScenes v2 index (relative file names, numpy inside) and its files, ingested into IDC-A
    under camera/<tag>/ and mirrored into IDC-B. Returns (index URI, --root args, keys in A)."""
    doc, placed = nuscenes_v2_infos(2, sweeps=1)
    data = tmp_path / "data"
    for d, names in placed.items():
        for name in names:
            p = data / "nuscenes" / d / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(name.encode() * 500)
    (data / "idx").mkdir()
    (data / "idx" / "infos_train.pkl").write_bytes(pickle.dumps(doc, protocol=4))
    ingest(site(xcfg, "A"), data, SRC, f"camera/{tag}/")
    with Mirror(topo(xcfg, "B"), metrics=Metrics(new_registry())) as m:
        m.run(once=True)
    roots = [f"s3://{SRC}/camera/{tag}/nuscenes", "pts=samples/LIDAR_TOP", "sweeps=sweeps/LIDAR_TOP",
             *[f"{c}=samples/{c}" for c in CAMS]]
    return f"s3://{SRC}/camera/{tag}/idx/infos_train.pkl", roots, under(f"{SRC}/camera/{tag}/nuscenes", placed)


def test_an_index_with_roots_from_the_cli_and_in_a_release(xcfg: XdcConfig, tmp_path: Path, tag: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`xdc prewarm plan --list s3://.../infos_train.pkl --root ...` in IDC-B (the index is read from
    B's own store, where it was mirrored), then `xdc release` with the same roots: both datacenters
    warm every file; each says `dataset.ready` once on its releases topic, which the follower ignores."""
    index, roots, keys = _nuscenes_release(xcfg, tmp_path, tag)
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml")
    root_args = [a for r in roots for a in ("--root", r)]
    assert cli_main(["--config", str(cfg_file), "--dc", "B", "prewarm", "plan", "--list", index, *root_args]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["list"]["shape"] == "mmdet3d-v2" and plan["list"]["root"]["pts"].endswith("/nuscenes/samples/LIDAR_TOP")
    assert (plan["files"], plan["present_files"], plan["rejected_count"]) == (len(keys), len(keys), 0)
    assert plan["warm_files"] == 2 * len(keys)  # two nodes, replicate

    assert cli_main(["--config", str(cfg_file), "release", "--dataset", f"nusc-{tag}", "--version", "v2",
                     "--manifest", index, "--datacenters", "A", "B", *root_args]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert sent["root"][""] == roots[0] and sent["root"]["CAM_BACK"] == "samples/CAM_BACK" and "select" not in sent
    for dc in ("A", "B"):
        (report,) = follow_releases(topo(xcfg, dc), once=True)
        assert report.complete and len(report.check.files) == len(keys), report.summary()
        assert report.ready_event is not None and report.ready_event.dc == dc
        mapped = check_list(site(xcfg, dc), Request(index, root=roots_from_args(root_args[1::2])))
        assert mapped.cached_ratio == 1.0 and len(mapped.files) == len(keys)
    # the ready events went out on A's and B's releases topics; a follower reading them does nothing
    for dc in ("A", "B"):
        ready = [json.loads(r.value) for r in read_topic(xcfg, dc, xcfg.dc(dc).kafka.topics.releases)]
        assert [(m["type"], m.get("dc")) for m in ready] == ([("dataset.released", None)] if dc == "A" else []) + [
            ("dataset.ready", dc)]
    assert follow_releases(topo(xcfg, "B"), once=True) == []
    assert read_topic(xcfg, "B", xcfg.dc("B").kafka.topics.dead_letter) == []
    assert [(r["dataset"], r["ready"]) for r in site(xcfg, "B").state.prewarm.readiness()] == [(f"nusc-{tag}", True)]
