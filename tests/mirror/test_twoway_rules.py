"""The two-way rules (mirror/twoway.py), pure: echoes, last writer wins, write beats delete; and the
config check that refuses two-way routes without a policy."""
from __future__ import annotations

import pytest

from mirror.twoway import (
    Version,
    conflict_key,
    is_echo,
    mark_key,
    newer,
    settle_delete,
    settle_put,
)
from xdc.config import parse_config
from xdc.errors import ConfigError

K = "camera/x y.jpg"


def test_an_echo_is_the_mirrors_copy_of_the_targets_own_key() -> None:
    copy_in_b = Version("B", "e1", 100, mark_dc="A", mark_key=mark_key(K), mark_etag="e1")
    assert is_echo(copy_in_b, "A", K)
    assert settle_put(copy_in_b, None, target_dc="A", target_key=K, acked_etag=None) == "echo"
    assert not is_echo(copy_in_b, "A", "camera/other.jpg")  # a user's copy of it to another key
    assert not is_echo(Version("B", "e1", 100), "A", K)  # a write made in B


def test_last_writer_wins_by_last_modified_then_datacenter_name() -> None:
    a, b = Version("A", "ea", 100), Version("B", "eb", 101)
    assert newer(b, a) and not newer(a, b)
    assert settle_put(b, a, target_dc="A", target_key=K, acked_etag=None) == "overwrite_local"
    assert settle_put(a, b, target_dc="B", target_key=K, acked_etag=None) == "keep_local"
    tie_a, tie_b = Version("A", "ea", 100), Version("B", "eb", 100)  # same second: B sorts last
    assert settle_put(tie_b, tie_a, target_dc="A", target_key=K, acked_etag=None) == "overwrite_local"
    assert settle_put(tie_a, tie_b, target_dc="B", target_key=K, acked_etag=None) == "keep_local"


def test_sequential_writes_and_own_copies_are_no_conflict() -> None:
    local = Version("A", "ea", 200)  # newer than the incoming version, but the source had seen it
    incoming = Version("B", "eb", 100)
    assert settle_put(incoming, local, target_dc="A", target_key=K, acked_etag="ea") == "copy"
    own_copy = Version("A", "eb0", 200, mark_dc="B", mark_key=mark_key(K), mark_etag="eb0")
    assert settle_put(incoming, own_copy, target_dc="A", target_key=K, acked_etag=None) == "copy"
    assert settle_put(Version("B", "ea", 1), local, target_dc="A", target_key=K, acked_etag=None) == "same"


def test_write_beats_delete_unless_the_source_had_seen_it() -> None:
    local = Version("A", "ea", 100)
    assert settle_delete(local, source_dc="B", acked_etag=None) == "write_beats_delete"
    assert settle_delete(local, source_dc="B", acked_etag="ea") == "delete"
    assert settle_delete(None, source_dc="B", acked_etag=None) == "delete"
    assert settle_delete(Version("A", "x", 1, mark_dc="B"), source_dc="B", acked_etag=None) == "delete"


def test_conflict_key_names_the_loser() -> None:
    assert conflict_key(K, Version("A", "0123456789abcdef", 1)) == K + ".xdc-conflict-A-0123456789ab"


def _cfg(two_way: dict | None) -> dict:
    loc = lambda dc, b: {"dc": dc, "bucket": b, "prefix": "camera/"}
    routes = [{"name": "ab", "source": loc("A", "idca-drive"), "target": loc("B", "idcb-drive"), "mode": "data"},
              {"name": "ba", "source": loc("B", "idcb-drive"), "target": loc("A", "idca-drive"), "mode": "data"}]
    if two_way is not None:
        for r in routes:
            r["two_way"] = two_way
    dc = lambda n: {"s3": {"internal_url": "http://127.0.0.1:1", "external_url": "http://127.0.0.1:1", "credentials": {
        "access_key_env": "K", "secret_key_env": "S"}}, "kafka": {"bootstrap_servers": ["127.0.0.1:9"]},
        "state_url": f"sqlite:///{n}.db"}
    return {"datacenters": {"A": dc("A"), "B": dc("B")}, "routes": routes}


def test_config_refuses_two_way_routes_without_a_policy() -> None:
    with pytest.raises(ConfigError, match=r"mirror the same data both ways.*two_way: \{conflict: last_writer_wins\}"):
        parse_config(_cfg(None))
    cfg = parse_config(_cfg({"conflict": "last_writer_wins"}))
    assert cfg.routes[0].mirrors(cfg.routes[1]) and cfg.routes[0].two_way is not None
