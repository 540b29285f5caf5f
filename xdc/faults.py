"""Named crash points, armed only by an environment variable (tests and fault drills).

`XDC_CRASH_AT=mirror.after_state_commit` makes the process kill itself with SIGKILL the first
time it reaches that point; `NAME:N` on the N-th time. Unarmed, a crash point costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "XDC_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    armed = os.environ.get(ENV)
    if not armed:
        return
    want, _, nth = armed.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
