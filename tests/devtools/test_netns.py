"""The WAN mode's namespaces on their own (no servers): addresses, the one link, cut and restore,
nothing left behind. Needs root, as the stack's WAN mode does."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from devtools.netns import Wan


def _netns() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()


@pytest.fixture
def wan() -> Iterator[Wan]:
    w = Wan.create(("A", "B"), rate="50mbit")
    try:
        yield w
    finally:
        w.destroy()


def _listen(w: Wan, dc: str, port: int) -> subprocess.Popen[bytes]:
    """A TCP listener on all of `dc`'s addresses, inside its namespace (stopped by the caller)."""
    code = ("import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('0.0.0.0',{port}))\ns.listen(8)\nprint('up',flush=True)\n"
            "while True:\n c,_=s.accept()\n c.close()")
    p = subprocess.Popen([*w.exec_prefix(dc), sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"up"
    return p


def test_link_addresses_cut_restore_and_cleanup(wan: Wan) -> None:
    assert wan.name.startswith("x") and all(wan.ns(dc) in _netns() for dc in wan.dcs)
    # the root namespace: never onto the link (no packet for it leaves by the default route)
    for dc in wan.dcs:
        assert not wan.root_routes(wan.external(dc))
    for dc in wan.dcs:
        assert "tbf" in wan.shaping()[dc] and "50Mbit" in wan.shaping()[dc]
    listener = _listen(wan, "A", 7000)
    try:
        assert wan.can_connect("B", wan.external("A"), 7000)  # across the link
        assert not wan.can_connect("B", wan.internal("A"), 7000)  # A's inside is not B's to reach
        assert wan.can_connect("A", wan.internal("A"), 7000)
        t0 = time.monotonic()
        wan.cut()
        try:
            assert not wan.can_connect("B", wan.external("A"), 7000, timeout_s=1.0)
        finally:
            wan.restore()
        assert wan.can_connect("B", wan.external("A"), 7000, timeout_s=5.0), "the link did not come back"
        assert time.monotonic() - t0 < 30
    finally:
        listener.kill()
        listener.wait(timeout=10)


def test_destroy_leaves_nothing() -> None:
    w = Wan.create(("A", "B"))
    w.destroy()
    assert not any(n.startswith(w.name) for n in _netns())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert w.name not in links
    assert w.root_routes(w.external("A"))  # the claim is given back (the default route again; nothing sent)
    w.destroy()  # twice is harmless (a stack's `down` after a failed `up`)


def test_two_at_once_get_different_blocks() -> None:
    a, b = Wan.create(("A", "B")), None
    try:
        b = Wan.create(("A", "B"))
        assert a.block != b.block and a.name != b.name
    finally:
        a.destroy()
        if b is not None:
            b.destroy()
