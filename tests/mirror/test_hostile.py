"""Hostile input on the real stack: every bad message lands in the dead-letter topic with a clear
reason, the rest of the batch is applied, and no crafted event writes outside the configured target
buckets and prefixes (asserted by listing every bucket of the target datacenter)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mirror.dlq import read_letters
from mirror.runner import Mirror
from tests.mirror.chaos_support import DST_BUCKET, SRC_BUCKET, child_env, write_config
from tests.support import produce, read_topic, silent_store, site, topo
from xdc.config import XdcConfig
from xdc.events import encode_notification, message_key, new_sequencer, s3_record
from xdc.io.store import S3Store
from xdc.metrics import Metrics, new_registry

ROOT = Path(__file__).resolve().parents[2]


def _raw(key: str, *, op: str = "put", **obj: Any) -> bytes:
    """A notification whose key is put in as given (not URL-encoded): what an attacker controls."""
    rec = s3_record(op, SRC_BUCKET, "camera/x", size=1, etag="0" * 32, sequencer=new_sequencer())  # type: ignore[arg-type]
    rec["s3"]["object"]["key"] = key
    rec["s3"]["object"].update(obj)
    return encode_notification([rec])


def _everything(store: S3Store) -> set[tuple[str, str]]:
    out = set()
    for b in store.client.list_buckets().get("Buckets", []):
        out |= {(o.bucket, o.key) for o in store.list(b["Name"])}
    return out


def test_hostile_messages_are_dead_lettered_and_nothing_escapes(xcfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    src = silent_store(xcfg, "A")  # the test publishes each event itself, in among the hostile ones
    dst = site(xcfg, "B", seen_from="B").store
    before = _everything(dst)

    good: list[tuple[bytes | None, bytes]] = []
    expect_written = set()
    for key in [f"camera/{tag}/ok.bin", f"camera/{tag}/%2e%2e/literal.bin", f"camera/{tag}/\u2025/lookalike-dots.bin",
                f"camera/{tag}/caf\u00e9 \u6f22\u5b57.bin"]:
        info = src.put(SRC_BUCKET, key, key.encode() * 10)
        good.append((message_key(SRC_BUCKET, key), encode_notification(
            [s3_record("put", SRC_BUCKET, key, size=info.size, etag=info.etag, sequencer=new_sequencer())])))
        expect_written.add((DST_BUCKET, key))
    lidar = f"lidar/{tag}/meta.bin"
    good.append((message_key(SRC_BUCKET, lidar), encode_notification(
        [s3_record("put", SRC_BUCKET, lidar, size=5, etag="1" * 32, sequencer=new_sequencer())])))
    # unrouted lookalikes: in the source, but no route covers them
    for key in [f"camera\uff0f{tag}/fullwidth-slash.bin", f"cam\u0435ra/{tag}/cyrillic-e.bin"]:
        info = src.put(SRC_BUCKET, key, b"x")
        good.append((None, encode_notification([s3_record("put", SRC_BUCKET, key, size=1, etag=info.etag)])))

    valid = json.loads(good[0][1])
    unknown = json.loads(good[0][1])
    unknown["Records"][0]["eventName"] = "s3:ReducedRedundancyLostObject"
    big = json.dumps({"Records": valid["Records"], "pad": "x" * 10_000_000}).encode()
    hostile: dict[str, tuple[bytes, str]] = {
        "malformed json": (b'{"Records": [', "bad_json"),
        "not utf-8": (b"\xff\xfe\xfd", "bad_json"),
        "nesting bomb": (b"[" * 100_000, "bad_json"),
        "array": (b"[1, 2, 3]", "bad_shape"),
        "no records": (b'{"hello": "world"}', "bad_shape"),
        "record missing s3": (b'{"Records": [{"eventName": "ObjectCreated:Put"}]}', "bad_shape"),
        "unknown eventName": (json.dumps(unknown).encode(), "unknown_event"),
        "dot-dot": (_raw("camera/../lidar/x"), "bad_key"),
        "encoded dot-dot": (_raw("camera/%2e%2e/lidar/x"), "bad_key"),
        "encoded slashes": (_raw("camera%2F..%2F..%2Fidcb-datasets%2Fx"), "bad_key"),
        "absolute": (_raw("/etc/passwd"), "bad_key"),
        "encoded absolute": (_raw("%2Fetc%2Fpasswd"), "bad_key"),
        "backslash": (_raw("camera\\..\\x"), "bad_key"),
        "NUL": (_raw("camera/a%00b"), "bad_key"),
        "control char": (_raw("camera/a\x1bb"), "bad_key"),
        "long key": (_raw("camera/" + "k" * 2000), "bad_key"),
        "lone surrogate": (_raw("camera/x").replace(b'"camera/x"', b'"camera/\\udc80"'), "bad_key"),
        "huge size": (_raw("camera/x", size=10**30), "bad_shape"),
        "bad sequencer": (_raw("camera/x", sequencer="not-hex"), "bad_sequencer"),
        "10 MB message": (big, "too_large"),
    }
    msgs = good[:2] + [(b"hostile", v) for v, _ in hostile.values()] + good[2:]
    produce(xcfg, "A", xcfg.dc("A").kafka.topics.events, msgs)  # 16 MiB max request: the broker takes 10 MB

    with Mirror(topo(xcfg, "B"), metrics=Metrics(new_registry())) as m:
        stats = m.run(once=True)
    assert stats.dead_letters == len(hostile)
    assert stats.applied == len(good) - 2 and stats.ignored["unrouted"] == 2

    letters = list(read_letters(site(xcfg, "B")))
    by_value = {d.value: d for d in letters}
    for name, (value, reason) in hostile.items():
        assert value in by_value, f"{name}: no dead letter"
        assert by_value[value].reason == reason, (name, by_value[value].reason, by_value[value].detail)
        assert by_value[value].origin_topic == xcfg.dc("A").kafka.topics.events

    after = _everything(dst)
    new = after - before
    assert new == expect_written, sorted(new ^ expect_written)
    assert all(k.startswith("camera/") for _, k in new)
    for _, key in expect_written:
        assert dst.get(DST_BUCKET, key) == key.encode() * 10

    print(f"\nHOSTILE REPORT tried={len(hostile)} dead_letters={stats.dead_letters} "
          f"applied={stats.applied} unrouted={stats.ignored['unrouted']} escaped={len(new - expect_written)}")


def test_dlq_replay_puts_letters_back_on_the_origin_topic(xcfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    origin = xcfg.dc("A").kafka.topics.events
    rec = s3_record("put", SRC_BUCKET, f"camera/{tag}/x", size=1, etag="0" * 32, sequencer=new_sequencer())
    rec["eventName"] = "s3:ReducedRedundancyLostObject"
    bad = encode_notification([rec])
    produce(xcfg, "A", origin, [(b"k", bad)])
    with Mirror(topo(xcfg, "B"), metrics=Metrics(new_registry())) as m:
        assert m.run(once=True).dead_letters == 1
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml")
    out = subprocess.run([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file), "--dc", "B", "dlq", "replay",
                          "--reason", "unknown_event"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "replayed 1 dead letters" in out.stdout
    again = [r for r in read_topic(xcfg, "A", origin) if r.value == bad]
    assert len(again) == 2
    assert any(k == "xdc-replayed-from" for r in again for k, _ in r.headers)
