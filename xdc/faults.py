"""Named crash points, armed only by an environment variable (tests and fault drills).

`XDC_CRASH_AT=mirror.after_state_commit` makes the process kill itself with SIGKILL the first
time it reaches that point; `NAME:N` on the N-th time. Before the kill one line goes to stderr
(`xdc: crash point NAME reached (hit N): SIGKILL`), written unbuffered, so a test can tell that the
process died there and not elsewhere. Unarmed, a crash point costs one dict lookup.

The points (grep `crash_point(` for the code around each):

    mirror.after_copy              object data copied, nothing in the state yet
    mirror.after_state_commit      state transaction durable (entries, outbox, offsets); nothing published
    mirror.in_outbox_flush         applied events published, their outbox rows not yet deleted
    mirror.after_applied_publish   outbox flushed; Kafka offsets not committed
    <loop>.before_commit           the consume loop, for every loop: handler done, letters flushed,
                                   offsets not committed (mirror, resize, releases)
    resize.after_upload            a derivative uploaded, its event not yet published
    resize.after_publish           the batch's derivative events flushed to Kafka; offsets not committed
    releases.after_warm            a released dataset warm, its outcome not yet in the ledger
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
        os.write(2, f"xdc: crash point {name} reached (hit {_hits[name]}): SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
