"""Streaming file-list readers: txt, csv, parquet, pkl (fixtures written in tmp_path)."""
from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_client import filelist
from cache_client.filelist import MAX_REASONS, ListEntry, read_file_list
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


@pytest.mark.parametrize("obj", [{"bkt/a": 1}, ("bkt/a",), "bkt/a", {"bkt/a"}])
def test_pkl_not_a_list_is_refused(tmp_path: Path, obj: object) -> None:
    with pytest.raises(FileListError, match="expected a list"):
        list(read_file_list(_write(tmp_path / "l.pkl", pickle.dumps(obj))))


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
