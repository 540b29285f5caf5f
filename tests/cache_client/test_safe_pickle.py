"""Restricted unpickling: inert numpy arrays, placeholders for unknown classes, no code run."""
from __future__ import annotations

import collections
import datetime
import os
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_client import safe_pickle
from cache_client.filelist import read_file_list
from cache_client.safe_pickle import InertArray, Placeholder
from xdc.errors import FileListError

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


class _System:
    """Pickles as os.system("touch MARKER"): what a hostile index file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


class Info:  # an object of a class the reader has never heard of
    def __init__(self) -> None:
        self.lidar_path = "drive/lidar/000001.bin"
        self.calib = np.eye(4)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("payload", [_System, _Eval])
def test_a_pickle_that_calls_something_is_refused_and_nothing_runs(tmp_path: Path, protocol: int, payload: type) -> None:
    marker = tmp_path / "pwned"
    doc = {"infos": [{"lidar_path": "drive/a/b.bin"}, payload(marker)]}
    p = tmp_path / "infos_train.pkl"
    p.write_bytes(pickle.dumps(doc, protocol=protocol))
    with pytest.raises(FileListError, match=r"infos_train\.pkl: refused: the pickle calls (posix\.system|builtins\.eval)"
                                            r"\(\.\.\.\).*nothing was run"):
        read_file_list(p)
    assert not marker.exists()
    # the stock unpickler would have run it: the test's payload is real
    pickle.loads(p.read_bytes())
    assert marker.exists()


def test_named_module_is_never_imported(tmp_path: Path) -> None:
    """A class from a module that does something on import loads as a placeholder, the module
    is not imported; and loading never imports numpy either."""
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n")
    # protocol 2 by hand: GLOBAL evilmod Thing, EMPTY_TUPLE, NEWOBJ, a state dict, BUILD
    data = (b"\x80\x02cevilmod\nThing\n)\x81}X\n\x00\x00\x00lidar_pathX\x05\x00\x00\x00a/b/cs"
            b"b" + pickle.dumps(np.array(["x"]), protocol=2)[2:-1] + b"\x86.")
    p = tmp_path / "thing.pkl"
    p.write_bytes(data)
    code = ("import sys, pickle; from cache_client import safe_pickle\n"
            f"obj = safe_pickle.load(open({str(p)!r}, 'rb'))\n"
            "print(type(obj[0]).__mro__[1].__name__, obj[0].xdc_class, dict(obj[0]), list(obj[1]), 'numpy' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False,
                         env={**os.environ, "PYTHONPATH": f"{root}:{tmp_path}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 3)[:3] == ["Placeholder", "evilmod.Thing", "{'lidar_path':"]
    assert out.stdout.rstrip().endswith("['x'] False")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_arrays_and_scalars_load_as_inert_data(protocol: int) -> None:
    doc = {
        "gt_names": np.array(["car", "pedestrian", "traffic_cone"]),
        "grid": np.array([["a", "bb"], ["ccc", "d"]], order="F"),
        "bytes": np.array([b"s3://x/y", b"z"]),
        "paths": np.array(["drive/a", None, 3], dtype=object),
        "big_endian": np.array(["ab"], dtype=">U2"),
        "boxes": np.arange(70, dtype=np.float32).reshape(10, 7),
        "empty": np.zeros((0, 7)),
        "ts": np.int64(1532402927647951), "x": np.float32(0.5), "ok": np.bool_(True), "name": np.str_("CAM_FRONT"),
    }
    out = safe_pickle.loads(pickle.dumps(doc, protocol=protocol))
    assert out["gt_names"] == ["car", "pedestrian", "traffic_cone"] and isinstance(out["gt_names"], InertArray)
    assert out["grid"] == [["a", "bb"], ["ccc", "d"]]
    assert out["bytes"] == ["s3://x/y", "z"]
    assert out["paths"] == ["drive/a", None, 3]
    assert out["big_endian"] == ["ab"]
    boxes = out["boxes"]
    assert boxes == [] and boxes.values_dropped and boxes.shape == (10, 7) and boxes.dtype.spec == "f4"
    assert out["empty"].shape == (0, 7)
    assert (out["ts"], out["x"], out["ok"], out["name"]) == (1532402927647951, 0.5, True, "CAM_FRONT")
    assert type(out["ts"]) is int and type(out["ok"]) is bool


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_classes_become_placeholders_with_their_state(protocol: int) -> None:
    out = safe_pickle.loads(pickle.dumps([Info(), collections.OrderedDict(a=1), collections.defaultdict(list, k=[1]),
                                          pathlib.PurePosixPath("/data/nuscenes/x.jpg"), pathlib.Path("rel/y.bin"),
                                          {1, 2}, frozenset({3}), b"\x00\xff", bytearray(b"ab"),
                                          datetime.datetime(2026, 1, 2, 3, 4, 5)], protocol=protocol))
    info = out[0]
    assert isinstance(info, Placeholder) and info.xdc_class.endswith(".Info")
    assert info["lidar_path"] == "drive/lidar/000001.bin" and info["calib"].shape == (4, 4)
    assert out[1] == {"a": 1} and out[2] == {"k": [1]} and type(out[2]) is dict
    assert out[3:5] == ["/data/nuscenes/x.jpg", "rel/y.bin"]
    assert out[5:] == [{1, 2}, frozenset({3}), b"\x00\xff", bytearray(b"ab"), datetime.datetime(2026, 1, 2, 3, 4, 5)]


@pytest.mark.parametrize("data", [
    b"\x80\x02cbuiltins\nbytes\nJ\x00\x00\x00\x7f\x85R.",  # bytes(2**31): a memory bomb
    b"\x80\x02cbuiltins\ngetattr\nq\x00.",  # fine alone (never called) ...
])
def test_allocation_bombs_and_lone_globals(data: bytes) -> None:
    if data.endswith(b"R."):
        with pytest.raises(FileListError, match=r"refused: the pickle asks for bytes\(<size>\)"):
            safe_pickle.loads(data)
    else:
        obj = safe_pickle.loads(data)  # ... a placeholder class object, inert
        with pytest.raises(FileListError, match="refused"):
            obj(1)


def test_persistent_ids_and_garbage() -> None:
    with pytest.raises(FileListError, match="persistent"):
        safe_pickle.loads(b"\x80\x02X\x01\x00\x00\x00aQ.")
    with pytest.raises(FileListError, match="cannot be read"):
        safe_pickle.loads(b"\x80\x02\xff\xff")
    with pytest.raises(FileListError, match="truncated"):
        safe_pickle.loads(pickle.dumps(list(range(100)))[:-3])
    with pytest.raises(FileListError, match="refused"):  # INST, protocol 0: a call too
        safe_pickle.loads(b"(S'true'\nios\nsystem\n.")
