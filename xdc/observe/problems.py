"""New kinds of problems: the log signatures (xdc.problems) kept in every datacenter's state.

`xdc problems` and the dashboard list them newest first (by first seen): a signature that
appeared for the first time is a kind of failure nobody wrote a rule for yet.
"""
from __future__ import annotations

import time
from typing import Any

from xdc.topology import Topology

NEW_S = 15 * 60  # first seen this recently: "new" (the XdcNewProblem alert uses the same window)


def list_problems(topology: Topology, *, since_s: float | None = None, limit: int = 50,
                  now: float | None = None) -> list[dict[str, Any]]:
    """Signatures of every datacenter, the most recently first seen first."""
    now = time.time() if now is None else now
    rows: list[dict[str, Any]] = []
    for site in topology.sites:
        for r in site.state.problems.recent(limit, since=None if since_s is None else now - since_s):
            rows.append({**r, "dc": site.name, "new": now - r["first_seen"] <= NEW_S})
    rows.sort(key=lambda r: (-r["first_seen"], r["dc"], r["signature"]))
    return rows[:limit]


def render_problems(rows: list[dict[str, Any]], now: float | None = None) -> str:
    if not rows:
        return "no problems recorded"
    now = time.time() if now is None else now
    lines = []
    for r in rows:
        age = now - r["first_seen"]
        first = f"{age:.0f} s ago" if age < 120 else f"{age / 60:.0f} min ago" if age < 7200 else f"{age / 3600:.1f} h ago"
        lines.append(f"{'NEW ' if r['new'] else '    '}{r['signature']}  {r['dc']} {r['component']:<10} {r['level']:<8} "
                     f"x{r['hits']:<6} first {first}, last {now - r['last_seen']:.0f} s ago")
        lines.append(f"      {r['template']}")
        lines.append(f"      e.g. {r['example'][:300]}")
    return "\n".join(lines)
