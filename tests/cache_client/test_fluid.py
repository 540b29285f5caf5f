"""Fluid DataLoads for a file list: valid against Fluid's own CRD schemas, every file exactly once.

The schemas are Fluid's CRDs read from the workspace's shared specs (tests/fluid_crd.py), with
unknown fields refused as a strict API server would. The expected paths come from the list the
test wrote, never from the code under test.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from cache_client import fluid
from cache_client.prewarm.fluid import (
    export_fluid,
    settings_of,
    store_sizes,
    write_export,
)
from cache_client.prewarm.pipeline import Request, resolve, wait_ready
from tests.cache_client.conftest import xdc_config
from tests.fluid_crd import crd, errors, validate
from tests.support import site
from xdc.app.cli import main as cli_main
from xdc.config import CacheConfig, CacheNode, FluidSettings, XdcConfig, parse_config
from xdc.errors import CacheError, ConfigError, NotReadyError

BUCKET = "idca-data"
CACHE = CacheConfig(meta_url="sqlite3:///unused.db",
                    nodes=[CacheNode(name="n1", mount=Path("/unused/n1"), cache_dir=Path("/unused"))])


def keys(n: int, seed: int) -> list[str]:
    """n distinct keys of the shapes a training list holds: deep dirs, spaces, non-ASCII, long names."""
    rnd = random.Random(seed)
    print(f"keys seed {seed}")
    out = set()
    while len(out) < n:
        i = rnd.randrange(10**9)
        shape = rnd.choice([
            f"camera/raw/2026-11-{i % 28 + 1:02d}/cam{i % 6}/{i:09d}.jpg",
            f"lidar/top/sweeps/{i % 97}/{i}.pcd.bin",
            f"labels/scène {i % 13}/frame ü{i}.json",
            f"deep/{'/'.join(str(i)[:k] for k in range(1, 8))}/x{i}",
            f"long/{'n' * 180}{i}",
        ])
        out.add(shape)
    return sorted(out, key=lambda _: rnd.random())


def targets(docs: list[dict[str, Any]]) -> list[str]:
    return [t["path"] for d in docs for t in d["spec"]["target"]]


def one_dc(tmp_path: Path, **fluid_settings: Any) -> XdcConfig:
    cfg = xdc_config(CACHE, tmp_path, [BUCKET])
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    data["datacenters"]["dca"]["cache"]["fluid"] = {"dataset": "drive-data", "namespace": "ml", **fluid_settings}
    return parse_config(data)


def test_crds_are_fluid_s_own() -> None:
    d = crd("DataLoad")
    assert d["metadata"]["name"] == "dataloads.data.fluid.io" and d["spec"]["scope"] == "Namespaced"
    assert "target" in d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_large_list_is_chunked_valid_and_covers_every_file_once() -> None:
    ks = keys(12_345, seed=14)
    settings = FluidSettings(dataset="drive-data", namespace="ml", chunk_files=5000, replicas=2)
    name = fluid.k8s_name("xdc", "cams-2026", "v3", "b")
    docs = fluid.dataloads([f"{BUCKET}/{k}" for k in ks], settings, name=name,
                           labels={"dataset": "cams-2026", "version": "v3", "dc": "B"}, annotations={"manifest": "x"})
    assert [len(d["spec"]["target"]) for d in docs] == [5000, 5000, 2345]
    for d in docs:
        validate(d)
    want = [f"/{BUCKET}/{k}" for k in ks]
    got = targets(docs)
    assert got == want  # in list order
    assert Counter(got) == Counter(want) and max(Counter(got).values()) == 1  # each file exactly once
    names = [d["metadata"]["name"] for d in docs]
    assert len(set(names)) == 3 and all(len(n) <= 46 for n in names)
    assert [d["spec"]["loadMetadata"] for d in docs] == [True, False, False]  # one metadata sync
    assert [d["spec"].get("runAfter", {}).get("name") for d in docs] == [None, names[0], names[1]]
    assert all(d["spec"]["dataset"] == {"name": "drive-data", "namespace": "ml"} for d in docs)
    assert {t["replicas"] for d in docs for t in d["spec"]["target"]} == {2}
    assert [d["metadata"]["labels"]["xdc.io/part"] for d in docs] == ["1-of-3", "2-of-3", "3-of-3"]


def test_long_paths_are_cut_by_size_too() -> None:
    ks = [f"p/{i:04d}/{'x' * 1000}" for i in range(1200)]  # ~1.2 MB of paths: over one part's budget
    docs = fluid.dataloads(ks, FluidSettings(dataset="d", chunk_files=100_000), name="big")
    assert len(docs) == 3 and targets(docs) == [f"/{k}" for k in ks]
    for d in docs:
        validate(d)


def test_options_and_what_the_schema_refuses() -> None:
    cron = FluidSettings(dataset="d", policy="Cron", schedule="*/30 * * * *", load_metadata=False,
                         ttl_seconds_after_finished=3600, path_root="/data")
    (doc,) = fluid.dataloads(["b/k"], cron, name="n")
    validate(doc)
    assert doc["spec"] | {"target": None} == {
        "dataset": {"name": "d", "namespace": "default"}, "loadMetadata": False, "target": None, "policy": "Cron",
        "schedule": "*/30 * * * *", "ttlSecondsAfterFinished": 3600}
    assert targets([doc]) == ["/data/b/k"]
    # the validator itself refuses what Fluid would: a misspelt field, a policy it does not know
    assert any("loadMetaData" in e for e in errors(doc | {"spec": doc["spec"] | {"loadMetaData": True}}))
    assert any("Weekly" in e for e in errors(doc | {"spec": doc["spec"] | {"policy": "Weekly"}}))
    with pytest.raises(ValueError, match="Cron needs schedule"):
        FluidSettings(dataset="d", policy="Cron")
    with pytest.raises(ValueError, match="not a Kubernetes name"):
        FluidSettings(dataset="Drive_Data")


def test_names_are_kubernetes_names() -> None:
    assert fluid.k8s_name("xdc", "cams", "v1", "b") == "xdc-cams-v1-b"
    long = fluid.k8s_name("xdc", "Front_Cameras 2026 (night)" * 3, "v1.2", "b")
    other = fluid.k8s_name("xdc", "Front_Cameras 2026 (night)" * 3, "v1.3", "b")
    assert long != other and len(long) <= 40
    for n in (long, other):
        validate({"apiVersion": fluid.API_VERSION, "kind": "DataLoad", "metadata": {"name": n},
                  "spec": {"dataset": {"name": "d"}}})
    assert fluid.label_value("scène/é 1") == "sc-ne-1" and fluid.label_value("-x" * 40) == "x" + "-x" * 31


def test_cli_export_writes_every_file_of_the_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.mirror.chaos_support import write_config

    ks = keys(300, seed=7)
    lst = tmp_path / "release.txt"
    lst.write_text("".join(f"{BUCKET}/{k}\n" for k in ks) + f"{BUCKET}/{ks[0]}\nnot-a-bucket-here/x\n")
    cfg_file = write_config(one_dc(tmp_path, chunk_files=128), tmp_path / "xdc.yaml")
    capsys.readouterr()

    assert cli_main(["--config", str(cfg_file), "prewarm", "export", "--format", "fluid", "--list", str(lst),
                     "--dataset", "cams-2026", "--version", "v3", "--no-wait", "--policy", "OnEvent"]) == 0
    out = capsys.readouterr()
    docs = list(yaml.safe_load_all(out.out))
    assert len(docs) == 3 and "3 DataLoad(s) of ml/drive-data for 300 files, 1 entries rejected" in out.err
    for d in docs:
        validate(d)
        assert d["spec"]["policy"] == "OnEvent" and "runAfter" not in d["spec"]  # chained only with Once
        assert d["metadata"]["labels"]["xdc.io/dataset"] == "cams-2026"
    assert Counter(targets(docs)) == Counter(f"/{BUCKET}/{k}" for k in ks)  # duplicate line once, bad line out

    out_dir = tmp_path / "manifests"
    assert cli_main(["--config", str(cfg_file), "prewarm", "export", "--list", str(lst), "--dataset", "cams-2026",
                     "--version", "v3", "--no-wait", "--out", str(out_dir), "--fluid-dataset", "other"]) == 0
    (written,) = out_dir.iterdir()
    docs = list(yaml.safe_load_all(written.read_text()))
    assert written.name == "xdc-cams-2026-v3-dca.yaml" and {d["spec"]["dataset"]["name"] for d in docs} == {"other"}


def test_a_fluid_only_datacenter(tmp_path: Path) -> None:
    base = {"local_dc": "dca", "datacenters": {"dca": {
        "s3": {"internal_url": "http://127.0.0.1:1", "external_url": "http://127.0.0.1:1",
               "credentials": {"access_key_env": "X", "secret_key_env": "Y"}},
        "kafka": {"bootstrap_servers": ["127.0.0.1:1"]}, "state_url": f"sqlite:///{tmp_path / 's.db'}",
        "buckets": [BUCKET], "cache": {"mode": "fluid", "fluid": {"dataset": "d"}}}}}
    with pytest.raises(ConfigError, match="mode fluid needs fluid"):
        parse_config(base)  # no output: the DAG would not know where to write
    base["datacenters"]["dca"]["cache"]["fluid"]["output"] = str(tmp_path / "out")
    cfg = parse_config(base)  # no nodes: Fluid runs the cache
    with pytest.raises(CacheError, match="run by Fluid"):
        _ = site(cfg, "dca").cache
    with pytest.raises(ConfigError, match="at least one"):
        parse_config(base | {"datacenters": {"dca": base["datacenters"]["dca"] | {"cache": {"meta_url": "x"}}}})
    lst = tmp_path / "l.txt"
    lst.write_text(f"{BUCKET}/a\n{BUCKET}/b\n")
    export = export_fluid(site(cfg, "dca"), Request(str(lst), "ds", "1"), settings_of(site(cfg, "dca")))
    assert targets(export.manifests) == [f"/{BUCKET}/a", f"/{BUCKET}/b"]
    assert Path(write_export(site(cfg, "dca"), export, str(tmp_path / "out"))).exists()


# -- against the stack's object store: the ready gate and an s3:// output -------------------------------
def test_export_gates_on_the_object_store_and_writes_to_it(xcfg: XdcConfig, tmp_path: Path, tag: str) -> None:
    a = site(xcfg, "A")
    bucket = xcfg.dc("A").buckets[0]
    sizes = {f"{tag}/flat/{i:03d}.bin": 1000 + i for i in range(12)} | {f"{tag}/one/{i}.bin": 7 for i in range(2)}
    for k, n in sizes.items():
        a.store.put(bucket, k, b"z" * n)
    lst = tmp_path / "l.txt"
    lst.write_text("".join(f"{bucket}/{k}\n" for k in sizes))
    req = Request(str(lst), f"ds-{tag}", "v1")
    res = resolve(a, req)
    stat = store_sizes(a)
    wait_ready(a, res.files, timeout=0, stat=stat)  # all there: returns at once
    got = stat(res.files)
    assert {f.bucket_key.partition("/")[2]: got[f.path] for f in res.files} == sizes  # listed and HEAD'ed alike
    export = export_fluid(a, req, FluidSettings(dataset="drive-a", namespace="ml"), res=res, sizes=got)
    assert export.bytes == sum(sizes.values())
    uri = write_export(a, export, f"s3://{bucket}/{tag}/fluid/")
    assert uri == f"s3://{bucket}/{tag}/fluid/xdc-ds-{tag}-v1-a.yaml"
    docs = list(yaml.safe_load_all(a.store.get(bucket, uri.split("/", 3)[3])))
    for d in docs:
        validate(d)
    assert Counter(targets(docs)) == Counter(f"/{bucket}/{k}" for k in sizes)

    lst.write_text(lst.read_text() + f"{bucket}/{tag}/flat/late.bin\n")
    with pytest.raises(NotReadyError, match=f"{tag}/flat/late.bin"):
        wait_ready(a, resolve(a, req).files, timeout=0, stat=stat)
