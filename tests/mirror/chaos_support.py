"""Helpers of the crash / fault / hostile-input tests: config copies, a source workload, and the
checks (source == target by march, applied once, committed offsets never ahead of the catalog)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devtools import stack
from mirror.march import march
from tests.support import brokers, site
from xdc.config import XdcConfig, parse_config
from xdc.events import (
    AppliedEvent,
)
from xdc.io.kafka import Record, group_offsets
from xdc.io.state import sqlite_path
from xdc.io.store import ObjectInfo, Store

SRC_BUCKET, DST_BUCKET = "idca-drive", "idcb-drive"


def config_data(cfg: XdcConfig) -> dict[str, Any]:
    """A config as plain data with absolute state paths, so it can live in any directory."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    for dc in cfg.datacenters:
        url = cfg.dc(dc).state_url
        if url.startswith("sqlite:///"):
            data["datacenters"][dc]["state_url"] = f"sqlite:///{sqlite_path(url, cfg.base_dir).resolve()}"
    data.pop("run_dir", None)
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def variant(cfg: XdcConfig, overrides: dict[str, Any]) -> XdcConfig:
    """A copy of `cfg` with nested overrides (e.g. an S3 URL pointed at a fault proxy)."""
    return parse_config(_merge(config_data(cfg), overrides), base_dir=cfg.base_dir)


def stores_without_notifications(cfg: XdcConfig) -> dict[str, Any]:
    """Overrides pointing every datacenter at its S3 gateway itself, without the notifying proxy
    (`s3.notifications: false`): xdc announces each write (and carries its traceparent)."""
    return {"datacenters": {dc: {"s3": {"internal_url": stack.gateway_url(cfg.base_dir, dc),
                                        "external_url": stack.gateway_url(cfg.base_dir, dc),
                                        "notifications": False}} for dc in cfg.datacenters}}


def write_config(cfg: XdcConfig, path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Dump `cfg` to a YAML file a subprocess can load (secrets stay in the environment)."""
    path.write_text(yaml.safe_dump(_merge(config_data(cfg), overrides or {}), sort_keys=False))
    return path


def blob(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


@dataclass
class Workload:
    """Writes real objects into the source, whose store announces each write (one key's events in
    order): puts (some keys overwritten), deletes, metadata-route puts."""

    cfg: XdcConfig
    tag: str
    seed: int = 0
    data_prefix: str = "camera/"
    meta_prefix: str = "lidar/"
    live: dict[str, int] = field(default_factory=dict)  # key -> size, what the source should hold
    written: dict[str, str] = field(default_factory=dict)  # key -> MD5 of the bytes last written (live keys)
    published: int = 0
    deletes: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.store: Store = site(self.cfg, "A").store
        assert self.cfg.dc("A").s3.notifications, "the workload relies on a store that announces its writes"

    def close(self) -> None:
        pass

    def step(self) -> None:
        r = self.rng.random()
        keys = sorted(self.live)
        if r < 0.12 and keys:  # delete
            key = self.rng.choice(keys)
            self.store.delete(SRC_BUCKET, key)  # announced by the store
            del self.live[key]
            del self.written[key]
            self.published += 1
            self.deletes += 1
            return
        if r < 0.3 and keys:  # overwrite an existing key with new bytes
            key = self.rng.choice(keys)
        elif r < 0.45:
            key = f"{self.meta_prefix}{self.tag}/m{self.published}.bin"
        else:
            key = f"{self.data_prefix}{self.tag}/d{self.published}.bin"
        data = blob(self.rng, self.rng.randint(1, 48_000))
        self.store.put(SRC_BUCKET, key, data)  # announced by the store
        self.live[key] = len(data)
        self.written[key] = md5(data)
        self.published += 1

    def flush(self) -> None:
        pass  # the store's notification is out when its write returns


@dataclass
class Diff:
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    differ: list[str] = field(default_factory=list)
    matched: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.differ)


def compare_listings(src: Iterable[ObjectInfo], dst: Iterable[ObjectInfo], src_prefix: str, dst_prefix: str) -> Diff:
    """March source against target: same keys (after prefix mapping), sizes and ETags (MD5)."""
    d = Diff()
    for a, b in march(src, dst, lambda o: o.key[len(src_prefix):], lambda o: o.key[len(dst_prefix):]):
        if b is None:
            d.missing.append(a.key)  # type: ignore[union-attr]
        elif a is None:
            d.extra.append(b.key)
        elif (a.size, a.etag) != (b.size, b.etag):
            d.differ.append(a.key)
        else:
            d.matched += 1
    return d


def compare_data(cfg: XdcConfig, tag: str, prefix: str = "camera/") -> Diff:
    src = site(cfg, "A", seen_from="A").store
    dst = site(cfg, "B", seen_from="B").store
    p = f"{prefix}{tag}/"
    return compare_listings(src.list(SRC_BUCKET, p), dst.list(DST_BUCKET, p), p, p)


def compare_metadata(cfg: XdcConfig, tag: str, prefix: str = "lidar/") -> Diff:
    """Metadata-mode route: the target catalog's live rows against the source listing."""
    src = site(cfg, "A", seen_from="A").store
    cat = site(cfg, "B").state.catalog
    p = f"{prefix}{tag}/"
    rows = [ObjectInfo(e.bucket, e.key, e.size, e.etag) for e in cat.live_objects(DST_BUCKET) if e.key.startswith(p)]
    return compare_listings(src.list(SRC_BUCKET, p), rows, p, p)


def applied_events(records: Iterable[Record]) -> list[AppliedEvent]:
    """Applied events from the applied topic, whichever message shape the mirror publishes."""
    out: list[AppliedEvent] = []
    for r in records:
        doc = json.loads(r.value)
        items = doc.get("records") if isinstance(doc, dict) and "records" in doc else [doc]
        for it in items:
            it = {k: v for k, v in it.items() if k != "type"}
            out.append(AppliedEvent(**it))
    return out


def committed_offsets(cfg: XdcConfig, dc: str, group: str) -> dict[tuple[str, int], int]:
    return {(tp.topic, tp.partition): off for tp, off in group_offsets(brokers(cfg, dc), group).items()}


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def child_env() -> dict[str, str]:
    """The environment for an `xdc` subprocess: this one's (it holds the stack's secrets)."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


ROOT = Path(__file__).resolve().parents[2]


def crash_seed() -> int:
    """The seed of a random kill schedule, printed so a failure can be replayed (XDC_CRASH_SEED)."""
    seed = int(os.environ.get("XDC_CRASH_SEED") or random.randrange(1, 2**32))
    print(f"\nrandom schedule seed {seed} (replay with XDC_CRASH_SEED={seed})")
    return seed


def spawn_xdc(cfg_file: Path, dc: str, command: Sequence[str], log: Path,
              crash_at: str | None = None) -> subprocess.Popen[bytes]:
    """`xdc --config CFG --dc DC COMMAND...` in a session of its own (killed as a group), its output
    appended to `log`; `crash_at` arms a named crash point (XDC_CRASH_AT=NAME[:N], xdc/faults.py)."""
    env = child_env()
    env.pop("XDC_CRASH_AT", None)
    if crash_at:
        env["XDC_CRASH_AT"] = crash_at
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file), "--dc", dc,
                                 *command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
