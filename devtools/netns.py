"""Two datacenters on two "hosts" joined by one WAN link: network namespaces for the local stack.

The stack's WAN mode (`devtools.stack.up(wan=Wan.create(...))`) puts each datacenter's servers (S3
gateway, Kafka broker) and the processes that run there in a network namespace of its own:

    root namespace: the tests, Prometheus, the operator's tools
      |  veth "LAN" link per datacenter: root end 10.213.<n>.254, datacenter end 10.213.<n>.1
      v
    netns <name>-a  (internal address 10.213.<n>.1)        netns <name>-b  (internal 10.213.<n+1>.1)
      external 10.213.<n+2>.1  <====== veth WAN pair, tc tbf both ways ======>  external 10.213.<n+2>.2

A datacenter reaches its own servers by their internal address and the other datacenter's by its
external one, exactly as the config says. The namespaces have no default route, and the root
namespace gets an `unreachable` route for the WAN subnet (without it, its default route would send
packets for the external addresses off the machine); it does not forward between the LAN links
(the test checks net.ipv4.ip_forward=0), so the WAN pair is the only way between the two.
`cut()` takes the WAN link down at one end (the other end keeps its address and route, so packets
to the far side vanish, as on a real cut line: connections time out rather than being refused);
`restore()` brings it back. The link is rate-limited with `tc ... tbf` (this kernel has no netem).

All addresses are inside namespaces made here; `destroy()` removes them (and with them the veths).
Needs root (ip netns).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIX = "10.213"


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _tc(*args: str) -> None:
    r = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NetnsError(f"tc {' '.join(args)}: {r.stderr.strip()}")


def _free_block() -> int:
    """A third octet n such that 10.213.n..n+2 appear in no address or route of the root namespace,
    claimed by routing its WAN subnet (n+2) to `unreachable` here: from then on no packet of the
    root namespace for the link can leave the machine by the default route."""
    used = set()
    text = _ip("-4", "-o", "addr").stdout + _ip("-4", "route", "show", "table", "all").stdout
    for m in re.finditer(rf"{re.escape(PREFIX)}\.(\d+)\.", text):
        used.add(int(m.group(1)))
    for ns in _ip("netns", "list").stdout.split():  # other stacks' namespaces
        r = _ip("-n", ns, "-4", "-o", "addr", check=False)
        for m in re.finditer(rf"{re.escape(PREFIX)}\.(\d+)\.", r.stdout):
            used.add(int(m.group(1)))
    for n in range(16, 250, 4):
        if {n, n + 1, n + 2} & used:
            continue
        # the claim: the root namespace's unreachable route for the WAN subnet; a stack starting at
        # the same moment that took this block first makes it fail, and the next block is tried
        if _ip("route", "add", "unreachable", f"{PREFIX}.{n + 2}.0/24", check=False).returncode == 0:
            return n
    raise NetnsError(f"no free block of {PREFIX}.x.0/24 subnets")


@dataclass
class Wan:
    """Two datacenters in namespaces of their own and the WAN link between them."""

    name: str  # namespace and interface prefix, short (interface names are at most 15 chars)
    dcs: tuple[str, str]
    block: int  # third octet of the first subnet
    rate: str = "200mbit"  # tbf rate of the WAN link, each way
    burst: str = "256kb"
    latency: str = "50ms"  # tbf queue bound, not added delay (no netem here)

    # -- names and addresses -------------------------------------------------------------------
    def ns(self, dc: str) -> str:
        return f"{self.name}-{dc.lower()}"

    def _i(self, dc: str) -> int:
        return self.dcs.index(dc)

    def internal(self, dc: str) -> str:
        """Where the datacenter's own processes (and the root namespace) reach its servers."""
        return f"{PREFIX}.{self.block + self._i(dc)}.1"

    def external(self, dc: str) -> str:
        """Where the other datacenter reaches its servers (across the WAN link)."""
        return f"{PREFIX}.{self.block + 2}.{1 + self._i(dc)}"

    def _lan_root(self, dc: str) -> str:
        return f"{self.name}l{dc.lower()}"[:15]

    def _lan_dc(self, dc: str) -> str:
        return f"{self.name}L{dc.lower()}"[:15]

    @property
    def wan_subnet(self) -> str:
        return f"{PREFIX}.{self.block + 2}.0/24"

    def _wan_if(self, dc: str) -> str:
        return f"{self.name}w{dc.lower()}"[:15]

    def exec_prefix(self, dc: str) -> list[str]:
        """Prefix a command with this to run it inside the datacenter's namespace."""
        return ["ip", "netns", "exec", self.ns(dc)]

    # -- life cycle ----------------------------------------------------------------------------
    @classmethod
    def create(cls, dcs: tuple[str, ...] = ("A", "B"), *, rate: str = "200mbit", name: str | None = None) -> Wan:
        if len(dcs) != 2:
            raise NetnsError("the WAN mode joins exactly two datacenters")
        if os.geteuid() != 0:
            raise NetnsError("the WAN mode needs root (ip netns)")
        wan = cls(name or f"x{os.getpid()}{uuid.uuid4().hex[:2]}", (dcs[0], dcs[1]), _free_block(), rate)
        try:
            wan._build()
        except BaseException:
            wan.destroy()
            raise
        return wan

    def _build(self) -> None:
        for dc in self.dcs:
            ns = self.ns(dc)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # the LAN link: the root namespace (tests, tools) to the datacenter's internal address
            root_if, dc_if = self._lan_root(dc), self._lan_dc(dc)
            _ip("link", "add", root_if, "type", "veth", "peer", "name", dc_if)
            _ip("link", "set", dc_if, "netns", ns)
            subnet = self.block + self._i(dc)
            _ip("addr", "add", f"{PREFIX}.{subnet}.254/24", "dev", root_if)
            _ip("link", "set", root_if, "up")
            _ip("-n", ns, "addr", "add", f"{self.internal(dc)}/24", "dev", dc_if)
            _ip("-n", ns, "link", "set", dc_if, "up")
        a, b = self.dcs
        _ip("link", "add", self._wan_if(a), "type", "veth", "peer", "name", self._wan_if(b))
        for dc in self.dcs:
            ns, dev = self.ns(dc), self._wan_if(dc)
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.external(dc)}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _tc("-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate, "burst", self.burst,
                "latency", self.latency)

    def destroy(self) -> None:
        """Remove the namespaces (their veths go with them) and the root ends of the LAN links."""
        for dc in self.dcs:
            _ip("link", "del", self._lan_root(dc), check=False)
            _ip("netns", "del", self.ns(dc), check=False)
        _ip("route", "del", "unreachable", self.wan_subnet, check=False)

    def root_routes(self, address: str) -> bool:
        """Whether the root namespace has a route to `address` (`ip route get`; sends nothing)."""
        return _ip("route", "get", address, check=False).returncode == 0

    def exists(self) -> bool:
        return all(self.ns(dc) in _ip("netns", "list").stdout.split() for dc in self.dcs)

    # -- the link ------------------------------------------------------------------------------
    def cut(self) -> None:
        """Take the WAN link down at the first datacenter's end: packets between the two vanish."""
        _ip("-n", self.ns(self.dcs[0]), "link", "set", self._wan_if(self.dcs[0]), "down")

    def restore(self) -> None:
        _ip("-n", self.ns(self.dcs[0]), "link", "set", self._wan_if(self.dcs[0]), "up")

    def shaping(self) -> dict[str, str]:
        """The qdisc on each end of the WAN link, as tc shows it (the test checks the tbf is there)."""
        return {dc: subprocess.run(["tc", "-n", self.ns(dc), "qdisc", "show", "dev", self._wan_if(dc)],
                                   capture_output=True, text=True, timeout=30).stdout.strip() for dc in self.dcs}

    def can_connect(self, from_dc: str, host: str, port: int, timeout_s: float = 2.0) -> bool:
        """A TCP connect from inside `from_dc`'s namespace."""
        code = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), "
                f"timeout={timeout_s}).close()\nexcept OSError:\n sys.exit(1)")
        r = subprocess.run([*self.exec_prefix(from_dc), "python3", "-c", code, host, str(port)],
                           capture_output=True, timeout=timeout_s + 30)
        return r.returncode == 0

    # -- persistence (the stack's state file) --------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Wan:
        d = json.loads(text)
        d["dcs"] = tuple(d["dcs"])
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())
