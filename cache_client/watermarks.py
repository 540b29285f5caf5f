"""Making room under cache watermarks: which retired datasets go when a warm would overfill a node.

Pure: the caller (cache_client.prewarm.pipeline) gathers each node's usage, what the plan needs
there, and for every retired dataset version the cached bytes of its files that may go (no active
or staged dataset uses them, the list being warmed does not hold them); this module only chooses.

A node whose fill after the warm (used + need) would pass its high watermark gets room: retired
datasets are taken oldest retirement first, whole, until the fill after the warm is under the
node's low watermark (or none is left). Room is enough when the fill ends under the high one.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cache_client.base import CacheFile
from cache_client.plan import MIB, NodeCapacity


@dataclass(frozen=True)
class Retired:
    """A retired dataset version, and what of it may leave each node."""

    dataset: str
    version: str
    retired_at: float | None
    files: Mapping[str, Sequence[CacheFile]]  # node -> its files cached there that may go
    bytes: Mapping[str, int]  # node -> cached bytes of those files

    @property
    def label(self) -> str:
        return f"{self.dataset}@{self.version}"


@dataclass
class NodeRoom:
    """One node over its high watermark: the datasets chosen to leave it."""

    node: str
    capacity: NodeCapacity
    need: int  # cache space the warm takes there
    frees: list[tuple[Retired, int]] = field(default_factory=list)  # (dataset, its bytes on this node)

    @property
    def projected(self) -> int:
        return self.capacity.used + self.need

    @property
    def freed(self) -> int:
        return sum(b for _, b in self.frees)

    @property
    def after(self) -> int:
        """Fill after the frees and the warm."""
        return self.projected - self.freed

    @property
    def enough(self) -> bool:
        return self.after <= self.capacity.limit

    @property
    def under_low(self) -> bool:
        return self.after <= int(self.capacity.capacity * self.capacity.low)

    def share(self, nbytes: int) -> float:
        return nbytes / self.capacity.capacity if self.capacity.capacity else 1.0

    def to_dict(self) -> dict[str, Any]:
        c = self.capacity
        return {"node": self.node, "used": c.used, "capacity": c.capacity, "need": self.need,
                "high_watermark": c.high, "low_watermark": c.low, "fill_without_room": self.share(self.projected),
                "fill_after": self.share(self.after), "enough": self.enough, "under_low": self.under_low,
                "free": [{"dataset": r.dataset, "version": r.version, "bytes": b, "files": len(r.files.get(self.node, ()))}
                         for r, b in self.frees]}

    def line(self) -> str:
        c = self.capacity
        head = (f"{self.node} would be {self.share(self.projected):.0%} full (high watermark {c.high:.0%}, "
                f"low {c.low:.0%})")
        if not self.frees:
            return head + ", and no retired dataset holds anything there"
        frees = ", ".join(f"{r.label} {b / MIB:.1f} MiB" for r, b in self.frees)
        return f"{head}; freeing {frees} leaves it {self.share(self.after):.0%} full"


@dataclass
class RoomPlan:
    nodes: dict[str, NodeRoom]  # the nodes over their high watermark
    made: bool = False  # the frees were done

    @property
    def needed(self) -> bool:
        return bool(self.nodes)

    @property
    def enough(self) -> bool:
        return all(n.enough for n in self.nodes.values())

    def datasets(self) -> list[tuple[Retired, dict[str, int]]]:
        """The datasets chosen on any node, oldest retirement first, with their bytes per node."""
        out: dict[str, tuple[Retired, dict[str, int]]] = {}
        for n in self.nodes.values():
            for r, b in n.frees:
                out.setdefault(r.label, (r, {}))[1][n.node] = b
        return sorted(out.values(), key=lambda x: (x[0].retired_at or 0.0, x[0].label))

    def to_dict(self) -> dict[str, Any]:
        return {"made": self.made, "enough": self.enough,
                "datasets": [{"dataset": r.dataset, "version": r.version, "retired_at": r.retired_at,
                              "bytes": by_node} for r, by_node in self.datasets()],
                "nodes": {n: x.to_dict() for n, x in self.nodes.items()}}

    def summary(self) -> str:
        verb = "freed" if self.made else "to free"
        ds = "; ".join(f"{r.label} ({', '.join(f'{n} {b / MIB:.1f} MiB' for n, b in by.items())})"
                       for r, by in self.datasets())
        return f"room {verb} on {', '.join(self.nodes)}: {ds or 'no retired dataset holds anything there'}"

    def refusal(self) -> str:
        """Why a plan is refused without making room, naming what would go."""
        lines = "; ".join(n.line() for n in self.nodes.values())
        if not self.enough:
            return (f"plan passes the high watermark: {lines}; even freeing every retired dataset is not enough "
                    "(use trim to warm what fits)")
        return f"plan passes the high watermark: {lines}; make room (--make-room, DAG param make_room) to free them"


def plan_room(capacity: Mapping[str, NodeCapacity], need: Mapping[str, int], retired: Sequence[Retired]) -> RoomPlan:
    """For each node the warm would push past its high watermark, the retired datasets (in the
    given order: oldest retirement first) that bring it under its low watermark."""
    nodes: dict[str, NodeRoom] = {}
    for node, cap in capacity.items():
        room = NodeRoom(node, cap, need.get(node, 0))
        if room.projected <= cap.limit:
            continue
        target = room.projected - int(cap.capacity * cap.low)  # bytes to free
        for r in retired:
            b = r.bytes.get(node, 0)
            if b <= 0:
                continue
            room.frees.append((r, b))
            if room.freed >= target:
                break
        nodes[node] = room
    return RoomPlan(nodes)
