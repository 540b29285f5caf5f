"""`xdc verify`: the source listing against the target listing on the real stack (not the catalog),
rclone-check counts, multipart-aware ETags, repairs through the normal path, the recorded run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.runner import Mirror
from mirror.verify import verify_route
from tests.mirror.chaos_support import child_env, variant, write_config
from tests.support import silent_store, site, topo
from xdc.config import XdcConfig
from xdc.io.store import META_SOURCE_ETAG
from xdc.metrics import Metrics, new_registry

pytestmark = pytest.mark.both_backends(postgres="stress")

SRC, DST = "idca-drive", "idcb-drive"
ROOT = Path(__file__).resolve().parents[2]


def _mirror(cfg: XdcConfig) -> int:
    with Mirror(topo(cfg, "B"), metrics=Metrics(new_registry())) as m:
        return m.run(once=True).applied


def _narrow(cfg: XdcConfig, tag: str) -> XdcConfig:
    """The config with the camera and lidar routes narrowed to this test's prefix (the buckets are
    shared by every test: a verify of the whole route would see the others' objects)."""
    data_routes = [r.model_dump() for r in cfg.routes]
    for r in data_routes:
        r["source"]["prefix"] += f"{tag}/"
        r["target"]["prefix"] += f"{tag}/"
    return variant(cfg, {"routes": data_routes})


def test_out_of_band_changes_in_the_target_are_found_and_repaired(xcfg: XdcConfig, tag: str, tmp_path: Path) -> None:
    cfg = _narrow(xcfg, tag)
    src = site(cfg, "A").store
    keys = [f"camera/{tag}/f{i:02d}.bin" for i in range(12)]
    for k in keys:
        src.put(SRC, k, k.encode() * 50)  # announced by the store
    assert _mirror(cfg) == 12
    metrics = Metrics(new_registry())
    clean = verify_route(topo(cfg, "A"), "camera", metrics=metrics)
    assert (clean.source_listed, clean.target_listed, clean.matched, clean.drift) == (12, 12, 12, 0)

    # out of band in IDC-B: one object deleted, another overwritten (no event reaches the mirror)
    b = silent_store(cfg, "B")
    b.delete(DST, keys[3])
    b.put(DST, keys[7], b"tampered")
    rep = verify_route(topo(cfg, "A"), "camera", metrics=metrics)
    assert (rep.missing, rep.extra, rep.differ, rep.matched, rep.errors) == (1, 0, 1, 10, 0)
    assert {(d["kind"], d["key"]) for d in rep.sample} == {("missing", keys[3]), ("differ", keys[7])}
    assert metrics.registry.get_sample_value("xdc_verify_drift_objects", {"route": "camera"}) == 2.0
    # the catalog still believes all is well: only the target listing shows it
    assert all(not e.deleted for e in site(cfg, "B").state.catalog.iter_route("camera"))

    fixed = verify_route(topo(cfg, "A"), "camera", repair=True, metrics=metrics)
    assert fixed.repaired == 2
    assert _mirror(cfg) == 2  # the repairs go through the normal path
    dst = site(cfg, "B").store
    assert dst.get(DST, keys[3]) == keys[3].encode() * 50 and dst.get(DST, keys[7]) == keys[7].encode() * 50
    again = verify_route(topo(cfg, "A"), "camera", metrics=metrics)
    assert (again.drift, again.matched) == (0, 12)
    assert metrics.registry.get_sample_value("xdc_verify_drift_objects", {"route": "camera"}) == 0.0
    runs = site(cfg, "B").state.verify.history("camera")
    assert [r["missing"] + r["extra"] + r["differ"] for r in runs] == [0, 2, 2, 0]  # newest first
    assert site(cfg, "B").state.verify.latest()["camera"]["matched"] == 12

    # an object only the target has (its source was deleted with the notification lost) is extra
    silent_store(cfg, "A").delete(SRC, keys[0])
    cfg_file = write_config(cfg, tmp_path / "xdc.yaml")
    out = subprocess.run([sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file), "--dc", "A", "verify",
                          "--route", "camera", "--repair"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    (cli,) = json.loads(out.stdout)
    assert (cli["extra"], cli["missing"], cli["differ"], cli["repaired"]) == (1, 0, 0, 1)
    assert "1 differences found" in out.stderr and "1 extra in the target" in out.stderr
    assert _mirror(cfg) == 1 and not dst.exists(DST, keys[0])
    assert verify_route(topo(cfg, "A"), "camera").drift == 0


def test_multipart_etags_are_compared_through_the_recorded_source_etag(xcfg: XdcConfig, tag: str) -> None:
    cfg = _narrow(xcfg, tag)
    client = site(cfg, "A").store.client
    key = f"camera/{tag}/big.bin"
    mp = client.create_multipart_upload(Bucket=SRC, Key=key)
    parts = [client.upload_part(Bucket=SRC, Key=key, UploadId=mp["UploadId"], PartNumber=n, Body=body)
             for n, body in ((1, b"a" * 5 * 2**20), (2, b"b" * 1000))]
    client.complete_multipart_upload(Bucket=SRC, Key=key, UploadId=mp["UploadId"], MultipartUpload={
        "Parts": [{"PartNumber": n + 1, "ETag": p["ETag"]} for n, p in enumerate(parts)]})
    assert _mirror(cfg) == 1  # the store announced CompleteMultipartUpload
    s, t = site(cfg, "A").store.head(SRC, key), site(cfg, "B").store.head(DST, key)
    assert s.etag.endswith("-2") and t.etag == s.etag  # the copy kept the part layout
    rep = verify_route(topo(cfg, "A"), "camera")
    assert (rep.matched, rep.drift) == (1, 0)
    # a copy that could not keep the layout writes it in one PUT and records the source's ETag
    silent_store(cfg, "B").put(DST, key, b"a" * 5 * 2**20 + b"b" * 1000, metadata={META_SOURCE_ETAG: s.etag})
    assert "-" not in site(cfg, "B").store.head(DST, key).etag  # the ETags differ ...
    rep = verify_route(topo(cfg, "A"), "camera")
    assert (rep.matched, rep.drift) == (1, 0)  # ... and still match
    silent_store(cfg, "B").put(DST, key, b"c" * (5 * 2**20 + 1000))  # same size, other bytes
    rep = verify_route(topo(cfg, "A"), "camera")
    assert (rep.differ, rep.matched) == (1, 0)


def test_metadata_routes_are_verified_against_the_target_state(xcfg: XdcConfig, tag: str) -> None:
    cfg = _narrow(xcfg, tag)
    src = site(cfg, "A").store
    for i in range(3):
        src.put(SRC, f"lidar/{tag}/s{i}.bin", b"s" * (i + 1))
    assert _mirror(cfg) == 3
    silent_store(cfg, "A").put(SRC, f"lidar/{tag}/s1.bin", b"changed")  # notification lost
    rep = verify_route(topo(cfg, "A"), "lidar", repair=True)
    assert (rep.differ, rep.matched, rep.repaired) == (1, 2, 1)
    assert _mirror(cfg) == 1
    assert verify_route(topo(cfg, "A"), "lidar").drift == 0
