"""Release and readiness messages: what they carry, what is refused (pure)."""
from __future__ import annotations

import json

import pytest

from xdc.errors import EventError
from xdc.events import ReadyEvent, ReleaseEvent, parse_message

T = 1_780_000_000.0


def test_a_release_carries_its_selector_root_and_make_room() -> None:
    ev = ReleaseEvent("nusc", "v2", "s3://idca-drive/idx/infos_train.pkl", T, ("B",), select="data_list[].lidar_points.lidar_path",
                      root={"": "s3://idca-drive/nuscenes", "pts": "samples/LIDAR_TOP"}, make_room=True)
    (back,) = parse_message(ev.to_json())
    assert back == ev
    plain = ReleaseEvent("ds", "v1", "/l.txt", T)
    assert parse_message(plain.to_json()) == [plain]
    assert set(json.loads(plain.to_json())) == {"type", "dataset", "version", "manifest", "time", "datacenters"}
    (one,) = parse_message(ReleaseEvent("ds", "v1", "/l.pkl", T, root="s3://b/p").to_json())
    assert isinstance(one, ReleaseEvent) and one.root == "s3://b/p"


@pytest.mark.parametrize("field, value", [
    ("select", 3), ("select", " "), ("root", ""), ("root", ["s3://b"]), ("root", {"pts": 1}),
    ("root", {f"t{i}": "p" for i in range(300)}), ("make_room", "yes"), ("prefix", ""),
])
def test_a_malformed_release_is_refused_with_a_reason(field: str, value: object) -> None:
    doc = json.loads(ReleaseEvent("ds", "v1", "/l.txt", T).to_json()) | {field: value}
    with pytest.raises(EventError) as exc:
        parse_message(json.dumps(doc).encode())
    assert exc.value.reason == "bad_release" and field in str(exc.value)


def test_a_ready_event_round_trips_and_is_not_a_release() -> None:
    ev = ReadyEvent("ds", "v1", "B", files=4, bytes=400, cached_ratio=1.0, time=T, manifest="s3://b/l.txt")
    (back,) = parse_message(ev.to_json())
    assert back == ev and not isinstance(back, ReleaseEvent)
    with pytest.raises(EventError):
        parse_message(json.dumps({"type": "dataset.ready", "dataset": "ds"}).encode())
