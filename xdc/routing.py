"""Routing: which route covers an object event, and where the object lands in the target.

Keys are refused, never cleaned: the target key is always target.prefix + (source key minus
source.prefix), re-validated, and must start with the target prefix, so no event can write outside
the configured target buckets and prefixes.
"""
from __future__ import annotations

from collections.abc import Sequence

import msgspec

from xdc.config import Route
from xdc.errors import EventError
from xdc.events import ObjectEvent, validate_key
from xdc.io.kafka import Record


class Routed(msgspec.Struct, frozen=True):
    event: ObjectEvent
    route: Route
    target_bucket: str
    target_key: str
    record: Record  # where it came from, for the dead-letter topic and offsets


def route_event(event: ObjectEvent, routes: Sequence[Route], record: Record,
                max_key_bytes: int = 1024) -> Routed | None:
    """The route that covers the event, or None. The target key is re-checked so that a crafted
    key can never land outside the route's target bucket and prefix."""
    for r in routes:
        if r.source.covers(event.bucket, event.key):
            tkey = validate_key(r.target_key(event.key), max_key_bytes)
            if not tkey.startswith(r.target.prefix):
                raise EventError("escapes_target", f"{event.key!r} maps outside {r.target.prefix!r}")
            return Routed(event, r, r.target.bucket, tkey, record)
    return None
