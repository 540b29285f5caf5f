"""Streaming file-list readers and dataset indexes (fixtures generated in tmp_path).

Plain lists (txt, csv, parquet, pkl) first, then the indexes driving teams keep: mmdetection3d
info pkls v1/v2 with numpy arrays, COCO, nuScenes sample_data.json, JSON Lines, Parquet/CSV
columns incl. list columns; then hostile and broken inputs.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_client import filelist
from cache_client.filelist import MAX_REASONS, ListEntry, read_file_list
from tests.cache_client.indexes import (
    CAMS,
    LOG,
    coco,
    nuscenes_v1_infos,
    nuscenes_v2_infos,
    plain,
    tok,
    under,
)
from xdc.errors import FileListError


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _keys(path: Path, **kw: object) -> list[str]:
    return [e.key for e in read_file_list(path, **kw)]  # type: ignore[arg-type]


# -- txt -----------------------------------------------------------------------------------------

def test_txt(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "list.txt",
        "\ufeffs3://bkt/a/1.jpg\n\n# a comment\n  bkt/a/2.jpg  \r\nbkt/a/1.jpg\nnot-a-key\nbkt/../x\nbkt/a/3.jpg",
    )
    fl = read_file_list(p)
    entries = list(fl)
    assert entries == [
        ListEntry("bkt/a/1.jpg", None, 1),
        ListEntry("bkt/a/2.jpg", None, 4),
        ListEntry("bkt/a/3.jpg", None, 8),
    ]
    s = fl.stats
    assert (s.entries, s.duplicates, s.blank, s.unreadable_count) == (3, 1, 2, 2)
    assert [line for line, _ in s.unreadable] == [6, 7]
    assert "missing_bucket" in s.unreadable[0][1] and "dot_segment" in s.unreadable[1][1]
    assert fl.complete


def test_txt_without_dedupe(tmp_path: Path) -> None:
    p = _write(tmp_path / "l.txt", "bkt/a\nbkt/a\ns3://bkt/a\n")
    fl = read_file_list(p, dedupe=False)
    assert [e.key for e in fl] == ["bkt/a"] * 3
    assert fl.stats.duplicates == 0


def test_undecodable_line_is_counted(tmp_path: Path) -> None:
    p = _write(tmp_path / "l.txt", b"bkt/a\n\xff\xfe\nbkt/b\n")
    fl = read_file_list(p)
    assert [e.key for e in fl] == ["bkt/a", "bkt/b"]
    assert fl.stats.unreadable == [(2, "not utf-8")]


def test_reasons_are_capped_but_all_counted(tmp_path: Path) -> None:
    p = _write(tmp_path / "l.txt", "bad\n" * (MAX_REASONS + 500) + "bkt/ok\n")
    fl = read_file_list(p)
    assert _keys(p) == ["bkt/ok"]
    list(fl)
    assert len(fl.stats.unreadable) == MAX_REASONS
    assert fl.stats.unreadable_count == MAX_REASONS + 500


def test_dedupe_table_grows(tmp_path: Path) -> None:
    n = 100_000  # more than the initial table holds
    p = _write(tmp_path / "l.txt", "".join(f"bkt/k{i}\n" for i in range(n)) + "bkt/k0\nbkt/k99999\n")
    fl = read_file_list(p)
    assert sum(1 for _ in fl) == n
    assert fl.stats.duplicates == 2


def test_iterating_again_restarts_stats(tmp_path: Path) -> None:
    fl = read_file_list(_write(tmp_path / "l.txt", "bkt/a\nbkt/a\n"))
    assert len(list(fl)) == 1 and len(list(fl)) == 1
    assert fl.stats.duplicates == 1


# -- csv -----------------------------------------------------------------------------------------

def test_csv(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "l.csv",
        "\ufeffPath,size,other\nbkt/a,12,x\nbkt/b,,y\nbkt/c,-1,z\n\n\"bkt/d,comma\",x,q\nbkt/e\n\"bkt/f\nsplit\",1\nbkt/g,7\n",
    )
    fl = read_file_list(p)
    assert list(fl) == [
        ListEntry("bkt/a", 12, 2),
        ListEntry("bkt/b", None, 3),
        ListEntry("bkt/e", None, 7),
        ListEntry("bkt/g", 7, 10),
    ]
    reasons = dict(fl.stats.unreadable)
    assert "bad size" in reasons[4] and "bad size" in reasons[6] and "control_char" in reasons[9]
    assert fl.stats.blank == 1


def test_csv_key_column_without_size(tmp_path: Path) -> None:
    p = _write(tmp_path / "l.csv", "n,key\n1,bkt/a\n2\n3,bkt/b\n")
    fl = read_file_list(p)
    assert [(e.key, e.size) for e in fl] == [("bkt/a", None), ("bkt/b", None)]
    assert fl.stats.unreadable[0][0] == 3


@pytest.mark.parametrize("content", ["", "name,size\nbkt/a,1\n"])
def test_csv_without_key_column_is_refused_early(tmp_path: Path, content: str) -> None:
    with pytest.raises(FileListError, match="key"):
        read_file_list(_write(tmp_path / "l.csv", content))


# -- parquet -------------------------------------------------------------------------------------

def test_parquet_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filelist, "_PARQUET_BATCH_ROWS", 3)
    p = tmp_path / "l.parquet"
    table = pa.table(
        {
            "key": ["bkt/a", None, "s3://bkt/b", "bkt/a", "bkt//c", "bkt/d", "bkt/e"],
            "size": pa.array([1, 2, None, 4, 5, -6, 7], pa.int64()),
        }
    )
    pq.write_table(table, p, row_group_size=4)
    fl = read_file_list(p)
    assert list(fl) == [ListEntry("bkt/a", 1, 1), ListEntry("bkt/b", None, 3), ListEntry("bkt/e", 7, 7)]
    assert [line for line, _ in fl.stats.unreadable] == [2, 5, 6]
    assert fl.stats.duplicates == 1


def test_parquet_path_column(tmp_path: Path) -> None:
    p = tmp_path / "l.pq"
    pq.write_table(pa.table({"path": pa.array(["bkt/a", "bkt/b"], pa.large_string())}), p)
    assert _keys(p) == ["bkt/a", "bkt/b"]


@pytest.mark.parametrize(
    "table",
    [
        pa.table({"name": ["bkt/a"]}),
        pa.table({"key": [1, 2]}),
        pa.table({"key": ["bkt/a"], "size": ["big"]}),
    ],
)
def test_parquet_bad_schema_is_refused_early(tmp_path: Path, table: pa.Table) -> None:
    p = tmp_path / "l.parquet"
    pq.write_table(table, p)
    with pytest.raises(FileListError):
        read_file_list(p)


def test_corrupt_parquet(tmp_path: Path) -> None:
    with pytest.raises(FileListError, match="cannot be read"):
        read_file_list(_write(tmp_path / "l.parquet", b"PAR1 this is not parquet"))


# -- pkl -----------------------------------------------------------------------------------------

def test_pkl_list_of_str(tmp_path: Path) -> None:
    p = _write(tmp_path / "l.pkl", pickle.dumps(["bkt/a", "s3://bkt/b", "bkt/a", 5, "nope"]))
    fl = read_file_list(p)
    assert list(fl) == [ListEntry("bkt/a", None, 1), ListEntry("bkt/b", None, 2)]
    assert [line for line, _ in fl.stats.unreadable] == [4, 5]


def test_pkl_list_of_dicts(tmp_path: Path) -> None:
    items = [{"path": "bkt/a", "size": 3}, {"key": "bkt/b"}, {"size": 1}, {"path": "bkt/c", "size": "x"}, {"path": 7}]
    fl = read_file_list(_write(tmp_path / "l.pickle", pickle.dumps(items, protocol=2)))
    assert list(fl) == [ListEntry("bkt/a", 3, 1), ListEntry("bkt/b", None, 2)]
    assert [line for line, _ in fl.stats.unreadable] == [3, 4, 5]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pkl_with_forbidden_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = _write(tmp_path / "l.pkl", pickle.dumps(["bkt/a", _Evil(marker)]))
    with pytest.raises(FileListError, match="not allowed"):
        list(read_file_list(p))
    assert not marker.exists()


@pytest.mark.parametrize("obj", [{"bkt/a": 1}, "bkt/a", {"bkt/a"}, 7, {"infos": 3}])
def test_pkl_of_unknown_shape_is_refused(tmp_path: Path, obj: object) -> None:
    with pytest.raises(FileListError, match="cannot tell which strings are file paths.*pass select="):
        read_file_list(_write(tmp_path / "l.pkl", pickle.dumps(obj)))


def test_pkl_tuple_is_a_list(tmp_path: Path) -> None:
    assert _keys(_write(tmp_path / "l.pkl", pickle.dumps(("bkt/a", "bkt/b")))) == ["bkt/a", "bkt/b"]


def test_pkl_truncated(tmp_path: Path) -> None:
    with pytest.raises(FileListError):
        list(read_file_list(_write(tmp_path / "l.pkl", pickle.dumps(["bkt/a"] * 10)[:-5])))


# -- files that cannot be read at all ------------------------------------------------------------

def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileListError, match="not found"):
        read_file_list(tmp_path / "missing.txt")
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(FileListError, match="directory"):
        read_file_list(tmp_path / "d.txt")
    with pytest.raises(FileListError, match="format"):
        read_file_list(_write(tmp_path / "l.xlsx", "[]"))
    with pytest.raises(FileListError, match="the list is empty"):
        read_file_list(_write(tmp_path / "l.json", "[]"))
    with pytest.raises(FileListError, match="format"):
        read_file_list(tmp_path / "l.txt", fmt="xlsx")


def test_fmt_overrides_extension(tmp_path: Path) -> None:
    p = _write(tmp_path / "manifest", "key\nbkt/a\n")
    assert _keys(p, fmt="csv") == ["bkt/a"]
    assert _keys(p, fmt="txt") == ["bkt/a"]  # "key" alone is not a bucket/key: unreadable


# -- streaming -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "head"), [("txt", "bkt/first\n"), ("csv", "key,size\nbkt/first,1\n")])
def test_first_entry_arrives_before_the_file_ends(tmp_path: Path, fmt: str, head: str) -> None:
    """A FIFO whose writer holds back the rest until the reader has its first entry."""
    fifo = tmp_path / f"list.{fmt}"
    os.mkfifo(fifo)
    got_first = threading.Event()
    rest_written = threading.Event()

    def writer() -> None:
        with open(fifo, "w") as fh:
            fh.write(head)
            fh.flush()
            got_first.wait(60)  # only a guard against hanging: a reader that slurps fails below
            fh.write("".join(f"bkt/k{i}\n" for i in range(1000)))
            rest_written.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        it = iter(read_file_list(fifo))
        first = next(it)
        streamed = not rest_written.is_set()
        got_first.set()
        rest = list(it)
    finally:
        got_first.set()
        t.join(60)
    assert first.key == "bkt/first"
    assert streamed
    assert len(rest) == 1000


# -- properties ----------------------------------------------------------------------------------

_LINE = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["bkt/a", "s3://bkt/b/c", "bkt/../x", "# c", "", "  ", "bkt//x", "x", "bkt/a,1", '"bkt/q', "\x00"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=30), tail=st.binary(max_size=30))
def test_txt_never_raises_and_accounts_for_every_line(tmp_path: Path, lines: list[str], tail: bytes) -> None:
    data = "\n".join(lines).encode("utf-8", "surrogatepass") + tail
    p = _write(tmp_path / "prop.txt", data)
    fl = read_file_list(p)
    entries = list(fl)
    s = fl.stats
    physical = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    assert s.entries + s.duplicates + s.blank + s.unreadable_count == physical
    assert len({e.key for e in entries}) == len(entries)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=30), tail=st.binary(max_size=30))
def test_csv_never_raises_on_garbage_rows(tmp_path: Path, lines: list[str], tail: bytes) -> None:
    data = ("key,size\n" + "\n".join(lines)).encode("utf-8", "surrogatepass") + tail
    p = _write(tmp_path / "prop.csv", data)
    fl = read_file_list(p)
    for e in fl:
        assert e.size is None or e.size >= 0
    assert fl.complete


# == dataset indexes ===============================================================================
# Generated by tests/cache_client/indexes.py with the nesting the real tools write; each generator
# also returns the file names it placed, from which the tests build the expected keys on their own.

def test_mmdet3d_v1_pkl_with_numpy_arrays(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    doc, placed = nuscenes_v1_infos(40)
    p = _write(tmp_path / "nuscenes_infos_train.pkl", pickle.dumps(doc, protocol=4))
    with caplog.at_level(logging.INFO, logger="xdc.filelist"):
        fl = read_file_list(p, root="s3://drive/nuscenes")
    assert fl.shape == "mmdet3d-v1"
    assert fl.selector == "infos[].[lidar_path, cams.*.data_path, sweeps[].data_path]"
    assert "mmdet3d-v1" in caplog.text and fl.selector in caplog.text  # the user sees what was used
    keys = set(_keys_of(fl))
    # "./data/nuscenes/samples/..." joined under the root, "./" dropped
    assert keys == set(under("drive/nuscenes/data/nuscenes", placed))
    assert fl.stats.records == 40 and fl.stats.unreadable_count == 0
    assert len(keys) == 40 * (1 + 6 + 3)


def test_mmdet3d_v1_without_root_reads_paths_as_keys(tmp_path: Path) -> None:
    doc, placed = nuscenes_v1_infos(3, sweeps=0)
    for info in doc["infos"]:  # some teams write the bucket into the paths
        info["lidar_path"] = "s3://drive/" + info["lidar_path"][2:]
        for cam in info["cams"].values():
            cam["data_path"] = "drive/" + cam["data_path"][2:]
    fl = read_file_list(_write(tmp_path / "infos.pkl", pickle.dumps(doc, protocol=2)))
    assert set(_keys_of(fl)) == set(under("drive/data/nuscenes", placed))


def test_mmdet3d_v2_pkl_needs_and_uses_per_modality_roots(tmp_path: Path) -> None:
    doc, placed = nuscenes_v2_infos(25)
    p = _write(tmp_path / "nuscenes_infos_train.pkl", pickle.dumps(doc, protocol=5))
    with pytest.raises(FileListError, match="relative to a data root.*root="):
        read_file_list(p)
    # the data_prefix of mmdet3d's nuScenes config, under the dataset's root
    root = {"": "s3://drive/nuscenes", "pts": "samples/LIDAR_TOP", "sweeps": "sweeps/LIDAR_TOP",
            **{cam: f"samples/{cam}" for cam in CAMS}}
    fl = read_file_list(p, root=root)
    assert fl.shape == "mmdet3d-v2"
    assert fl.selector.startswith("data_list[].[{pts: lidar_points.lidar_path}, {\"img:CAM_FRONT\": images.CAM_FRONT.img_path")
    assert set(_keys_of(fl)) == set(under("drive/nuscenes", placed))
    # cameras without their own prefix fall back to `img`, as in mmdet3d
    root2 = {"": "s3://drive/nuscenes", "pts": "samples/LIDAR_TOP", "sweeps": "sweeps/LIDAR_TOP", "img": "all_cams"}
    keys2 = set(_keys_of(read_file_list(p, root=root2)))
    assert {k for k in keys2 if "/all_cams/" in k} == {f"drive/nuscenes/all_cams/{n}" for c in CAMS for n in placed[f"samples/{c}"]}


def test_mmdet3d_v2_as_json_is_streamed(tmp_path: Path) -> None:
    doc, placed = nuscenes_v2_infos(30, sweeps=2)
    p = _write(tmp_path / "infos.json", json.dumps(doc, default=plain))
    root = {"": "drive/nuscenes", "pts": "samples/LIDAR_TOP", "sweeps": "sweeps/LIDAR_TOP", **{c: f"samples/{c}" for c in CAMS}}
    fl = read_file_list(p, root=root)
    assert fl.shape == "mmdet3d-v2"
    assert set(_keys_of(fl)) == set(under("drive/nuscenes", placed))
    assert fl.stats.records == 30


def _keys_of(fl: filelist.FileList) -> list[str]:
    return [e.key for e in fl]


@pytest.mark.parametrize("annotations_first", [False, True])
def test_coco_json(tmp_path: Path, annotations_first: bool) -> None:
    text, names = coco(200, annotations_first)
    fl = read_file_list(_write(tmp_path / "instances_train2017.json", text), root="s3://drive/coco/train2017/")
    assert (fl.shape, fl.selector) == ("coco", "images[].file_name")
    assert _keys_of(fl) == [f"drive/coco/train2017/{nm}" for nm in dict.fromkeys(names)]


def test_nuscenes_sample_data_json(tmp_path: Path) -> None:
    rng = random.Random(4)
    rows, expect = [], []
    for i in range(300):
        ch = ["CAM_FRONT", "LIDAR_TOP", "RADAR_FRONT"][i % 3]
        key_frame = i % 2 == 0
        name = f"{'samples' if key_frame else 'sweeps'}/{ch}/{LOG}__{ch}__{1532402927600000 + i}.{'jpg' if ch.startswith('CAM') else 'pcd'}"
        rows.append({"token": tok(rng), "sample_token": tok(rng), "ego_pose_token": tok(rng),
                     "calibrated_sensor_token": tok(rng), "timestamp": 1532402927600000 + i, "fileformat": name[-3:],
                     "is_key_frame": key_frame, "height": 900 if ch.startswith("CAM") else 0, "width": 1600,
                     "filename": name, "prev": "", "next": ""})
        expect.append(f"drive/nuscenes/{name}")
    fl = read_file_list(_write(tmp_path / "sample_data.json", json.dumps(rows, indent=0)), root="s3://drive/nuscenes")
    assert (fl.shape, fl.selector) == ("nuscenes", "[].filename")
    assert _keys_of(fl) == expect
    # a user narrows it to key frames with their own selector
    only = read_file_list(tmp_path / "sample_data.json", root="s3://drive/nuscenes", select="[?is_key_frame].filename")
    assert _keys_of(only) == expect[::2] and only.shape == "custom"


def test_json_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"path": f"s3://drive/lidar/{i:05d}.bin", "size": 1000 + i}) for i in range(50)]
    lines[7] = "{not json"
    lines[9] = ""
    lines[11] = json.dumps({"path": 5})
    p = _write(tmp_path / "manifest.jsonl", "\n".join(lines) + "\n")
    fl = read_file_list(p)
    entries = list(fl)
    assert fl.shape == "paths"
    expect = [(f"drive/lidar/{i:05d}.bin", 1000 + i, i + 1) for i in range(50) if i not in (7, 9, 11)]
    assert [(e.key, e.size, e.line) for e in entries] == expect
    assert [line for line, _ in fl.stats.unreadable] == [8, 12] and fl.stats.blank == 1


def test_json_lines_of_v1_records_and_a_custom_selector(tmp_path: Path) -> None:
    doc, placed = nuscenes_v1_infos(10, sweeps=1)

    p = _write(tmp_path / "infos.jsonl", "".join(json.dumps(info, default=plain) + "\n" for info in doc["infos"]))
    fl = read_file_list(p, root="drive/nuscenes")
    assert fl.shape == "mmdet3d-v1" and fl.selector == "[lidar_path, cams.*.data_path, sweeps[].data_path]"
    assert set(_keys_of(fl)) == set(under("drive/nuscenes/data/nuscenes", placed))
    front = read_file_list(p, root="drive/nuscenes", select="cams.CAM_FRONT.data_path")
    assert _keys_of(front) == [f"drive/nuscenes/data/nuscenes/samples/CAM_FRONT/{n}" for n in placed["samples/CAM_FRONT"]]


def test_parquet_sensor_columns_incl_list_columns(tmp_path: Path) -> None:
    n = 120
    table = pa.table({
        "frame": list(range(n)),
        "cam_front": [f"drive/cams/front/{i:06d}.jpg" for i in range(n)],
        "lidar": [f"s3://drive/lidar/{i:06d}.bin" if i % 10 else None for i in range(n)],
        "radars": pa.array([[f"drive/radar/{r}/{i:06d}.pcd" for r in ("fl", "fr")] for i in range(n)], pa.list_(pa.string())),
    })
    p = tmp_path / "frames.parquet"
    pq.write_table(table, p, row_group_size=50)
    fl = read_file_list(p, select="cam_front,lidar,radars")
    assert fl.selector == "cam_front,lidar,radars"
    expect = []
    for i in range(n):
        expect.append((f"drive/cams/front/{i:06d}.jpg", i + 1))
        if i % 10:
            expect.append((f"drive/lidar/{i:06d}.bin", i + 1))
        expect += [(f"drive/radar/{r}/{i:06d}.pcd", i + 1) for r in ("fl", "fr")]
    assert [(e.key, e.line) for e in fl] == expect
    with pytest.raises(FileListError, match="no column 'rear'"):
        read_file_list(p, select="cam_front,rear")
    with pytest.raises(FileListError, match="column 'frame' is int64"):
        read_file_list(p, select="frame")


def test_csv_named_and_list_columns_with_root(tmp_path: Path) -> None:
    p = _write(tmp_path / "frames.csv",
               'frame,front,cams,size\n1,a/1.jpg,"[""b/1.jpg"", ""c/1.jpg""]",10\n2,a/2.jpg,[],\n3,,"[""b/3.jpg""]",7\n4,a/4.jpg,"[1]",\n')
    fl = read_file_list(p, select="front,cams", root="s3://drive/ds")
    got = [(e.key, e.size, e.line) for e in fl]
    assert got == [("drive/ds/a/1.jpg", None, 2), ("drive/ds/b/1.jpg", None, 2), ("drive/ds/c/1.jpg", None, 2),
                   ("drive/ds/a/2.jpg", None, 3), ("drive/ds/b/3.jpg", 7, 4), ("drive/ds/a/4.jpg", None, 5)]
    assert fl.stats.unreadable == [(5, "list cell is not a list of strings: '[1]'")]
    single = read_file_list(p, select="front", root="drive/ds")
    assert [(e.key, e.size) for e in single] == [("drive/ds/a/1.jpg", 10), ("drive/ds/a/2.jpg", None), ("drive/ds/a/4.jpg", None)]


def test_root_refuses_paths_it_cannot_join(tmp_path: Path) -> None:
    p = _write(tmp_path / "l.jsonl", '"a/ok.jpg"\n"/abs/x.jpg"\n"../up.jpg"\n"s3://other/y.jpg"\n')
    fl = read_file_list(p, root="s3://drive/ds")
    assert _keys_of(fl) == ["drive/ds/a/ok.jpg", "other/y.jpg"]
    reasons = dict(fl.stats.unreadable)
    assert "absolute path '/abs/x.jpg' cannot be joined" in reasons[2] and "dot_segment" in reasons[3]
    for bad in ("s3://", "/abs", "b/../x", "b//x"):
        with pytest.raises(FileListError, match="bad root"):
            read_file_list(p, root=bad)


# -- selectors that find nothing, and hostile or broken indexes ------------------------------------

def test_selector_that_matches_nothing_says_so(tmp_path: Path) -> None:
    doc, _ = nuscenes_v1_infos(5)
    p = _write(tmp_path / "infos.pkl", pickle.dumps(doc))
    fl = read_file_list(p, select="infos[].lidar_pth", root="drive/x")
    with pytest.raises(FileListError, match=r"selector 'infos\[\].lidar_pth' matched nothing \(5 records read\).*"
                                            r"top-level keys \['infos', 'metadata'\]; infos\[0\] has keys \[.*'lidar_path'"):
        list(fl)
    pj = _write(tmp_path / "coco.json", coco(5)[0])
    with pytest.raises(FileListError, match=r"matched nothing.*images\[0\] has keys \[.*'file_name'"):
        list(read_file_list(pj, select="images[].filename"))
    with pytest.raises(FileListError, match="bad selector"):
        read_file_list(pj, select="images[.file_name")
    with pytest.raises(FileListError, match=r"cannot tell which strings are file paths in top-level keys \['a'\]"):
        read_file_list(_write(tmp_path / "other.json", '{"a": [{"b": 1}]}'))


def test_truncated_pkl(tmp_path: Path) -> None:
    doc, _ = nuscenes_v1_infos(20)
    data = pickle.dumps(doc, protocol=4)
    for cut in (len(data) - 1, len(data) // 2, 11):
        with pytest.raises(FileListError, match="truncated|cannot be read"):
            read_file_list(_write(tmp_path / "infos.pkl", data[:cut]))


def test_pkl_above_the_document_limit(tmp_path: Path) -> None:
    p = _write(tmp_path / "infos.pkl", pickle.dumps({"infos": [{"lidar_path": "drive/a/b"}] * 1000}))
    with pytest.raises(FileListError, match="above the 0 MiB limit"):
        read_file_list(p, max_document_bytes=1000)


def test_pkl_array_claiming_more_than_it_carries(tmp_path: Path) -> None:
    data = pickle.dumps({"infos": [{"lidar_path": "drive/a/b", "gt_boxes": np.zeros((2, 7))}]}, protocol=2)
    # rewrite the shape tuple (2, 7) as (2000000000, 7): the bytes stay 112
    forged = data.replace(b"K\x02K\x07\x86", b"J\x00\x94\x35\x77K\x07\x86", 1)
    assert forged != data
    with pytest.raises(FileListError, match=r"claims shape \(2000000000, 7\) of f8 .* but carries 112 bytes"):
        read_file_list(_write(tmp_path / "infos.pkl", forged))


def test_pkl_bomb_of_shared_references(tmp_path: Path) -> None:
    level: list[object] = ["drive/a/b"]
    for _ in range(40):  # 2**40 paths through 40 small lists
        level = [level, level]
    p = _write(tmp_path / "bomb.pkl", pickle.dumps({"infos": [{"lidar_path": "drive/x/y", "sweeps": level}]}))
    t0 = time.monotonic()
    with pytest.raises(FileListError, match="larger than the document itself"):
        list(read_file_list(p, select="infos[].sweeps"))
    assert time.monotonic() - t0 < 10


_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(("doc", "select"), [(_DEEP, "[].filename"), ('{"images": ' + _DEEP + "}", "images[].file_name"),
                                             ('[{"filename": "a", "token": "t"}, ' + _DEEP + "]", "[].filename")])
def test_json_nesting_bomb(tmp_path: Path, doc: str, select: str) -> None:
    p = _write(tmp_path / "bomb.json", doc)
    with pytest.raises(FileListError, match="nested too deeply|cannot tell"):
        list(read_file_list(p, root="drive/x"))
    with pytest.raises(FileListError, match="nested too deeply"):
        list(read_file_list(p, select=select, root="drive/x"))


def test_json_with_a_huge_array_in_one_record_is_refused(tmp_path: Path) -> None:
    big = ",".join(["0"] * (9 << 20))  # 18 Mi characters in one image record
    p = _write(tmp_path / "coco.json", '{"images": [{"file_name": "a.jpg", "x": [' + big + ']}]}')
    with pytest.raises(FileListError, match="larger than 16,777,216 characters: refused"):
        list(read_file_list(p, root="drive/coco"))


def test_invalid_json_says_where(tmp_path: Path) -> None:
    p = _write(tmp_path / "coco.json", '{"images": [{"file_name": "a.jpg"}, {"file_name": "b.jpg"} {"file_name": "c"}]}')
    fl = read_file_list(p, root="drive/coco")
    with pytest.raises(FileListError, match=r"invalid JSON at character 59: expected ',' or '\]'"):
        list(fl)


def test_streamed_json_memory_stays_bounded(tmp_path: Path) -> None:
    """A 60 MB COCO file (annotations first) read in a child process: peak RSS grows by far less
    than the file (the records are streamed, only the keys' dedupe table stays)."""
    text, names = coco(40_000, annotations_first=True)
    text = text.replace('"segmentation": [[', '"segmentation": [[' + "1.5," * 300)  # fatter annotations
    p = _write(tmp_path / "big.json", text)
    size_mib = p.stat().st_size / 2**20
    assert size_mib > 50
    code = (
        "import resource, sys; from cache_client.filelist import read_file_list\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "n = sum(1 for _ in read_file_list(sys.argv[1], root='drive/coco'))\n"
        "print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    n, grew = out.stdout.split()
    assert int(n) == len(set(names))
    assert float(grew) < 40, f"peak RSS grew {grew} MiB reading a {size_mib:.0f} MiB file"


def test_root_arguments_of_the_cli() -> None:
    from cache_client.selectors import roots_from_args

    assert roots_from_args(None) is None
    assert roots_from_args(["s3://drive/nuscenes"]) == "s3://drive/nuscenes"
    assert roots_from_args(["s3://drive/a=b", "pts=samples/LIDAR_TOP", "img:CAM_FRONT=x"]) == {
        "": "s3://drive/a=b", "pts": "samples/LIDAR_TOP", "img:CAM_FRONT": "x"}
    with pytest.raises(FileListError, match="twice"):
        roots_from_args(["a/b", "c/d"])


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_over_long_lines_are_unreadable_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    monkeypatch.setattr(filelist, "MAX_LINE_BYTES", 50)
    monkeypatch.setattr(filelist, "_READ_CHUNK", 16)  # lines cross reads
    q = (lambda s: json.dumps(s)) if fmt == "jsonl" else (lambda s: s)
    data = "\n".join([q("bkt/a"), "x" * 100, q("bkt/b"), q("bkt/" + "c" * 40), "y" * 70])
    fl = read_file_list(_write(tmp_path / f"l.{fmt}", data))
    assert [(e.key, e.line) for e in fl] == [("bkt/a", 1), ("bkt/b", 3), ("bkt/" + "c" * 40, 4)]
    assert fl.stats.unreadable == [(2, "line longer than 50 bytes"), (5, "line longer than 50 bytes")]


def test_select_on_a_txt_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileListError, match="txt list is one path a line"):
        read_file_list(_write(tmp_path / "l.txt", "bkt/a\n"), select="x")
