"""Two-way routes (A->B and B->A over the same data): echoes and concurrent writes. Pure rules;
the runner reads the versions (the copy's own GET of the source, a HEAD of the target) and acts.

Echo. The mirror marks every copy it writes (`xdc-source-dc`, `-key`, `-etag`, `-mtime`,
xdc/io/store.py). When the target's store announces that copy, the other direction's mirror sees
an event whose source object is marked as a copy *of the datacenter it would copy to*, of the same
key: an echo. It is not sent back; the state records it as an acknowledgment ("the other side
holds this datacenter's version `etag`"), so later writes there are known to be sequential.

Conflict. A remote version meets a local write of the target key that the source never
acknowledged (no echo of it came back, and the target does not hold the mirror's own copy):
both datacenters wrote the key concurrently. Policy `last_writer_wins`: the version with the
newer Last-Modified (whole seconds, as S3 reports it on HEAD/GET) wins, a tie goes to the
datacenter whose name sorts last. Both directions' mirrors compare the same two numbers, so both
datacenters converge to the same winner. The mirror that overwrites its local loser keeps it
beside the key (`conflict_key`) and reports the conflict; the mirror whose incoming version loses
leaves its target alone (the other side reports). A delete never removes an unacknowledged local
write (write beats delete: the write reaches the other side and recreates the key there).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

from xdc.errors import XdcError
from xdc.io.store import META_SOURCE_DC, META_SOURCE_ETAG, META_SOURCE_KEY, ObjectInfo

PutVerdict = Literal["copy", "echo", "same", "overwrite_local", "keep_local"]
DeleteVerdict = Literal["delete", "write_beats_delete"]


@dataclass(frozen=True)
class Version:
    """One version of a key as a datacenter holds it."""

    dc: str  # where it is held
    etag: str
    mtime: int  # Last-Modified, whole seconds
    mark_dc: str = ""  # the datacenter this is the mirror's copy of ("" for a write made here)
    mark_key: str = ""  # the key it was copied from (URL-quoted)
    mark_etag: str = ""  # the ETag of the version it was copied from

    @classmethod
    def of(cls, dc: str, info: ObjectInfo) -> Version:
        m: Mapping[str, str] = info.metadata
        return cls(dc, info.etag, int(info.last_modified), m.get(META_SOURCE_DC, ""), m.get(META_SOURCE_KEY, ""),
                   m.get(META_SOURCE_ETAG, ""))


def mark_key(key: str) -> str:
    """A key as the copy's metadata holds it (user metadata is ASCII)."""
    return quote(key, safe="/")


def is_echo(src: Version, target_dc: str, target_key: str) -> bool:
    """The source object is the mirror's copy of the target's own version of this key."""
    return src.mark_dc == target_dc and src.mark_key == mark_key(target_key)


def newer(a: Version, b: Version) -> bool:
    """Last writer wins: Last-Modified, then the datacenter name (the one that sorts last)."""
    return (a.mtime, a.dc) > (b.mtime, b.dc)


def settle_put(src: Version, local: Version | None, *, target_dc: str, target_key: str,
               acked_etag: str | None) -> PutVerdict:
    """What a put from `src.dc` does to the target key, which holds `local` (None: nothing).
    `acked_etag`: the local version the source datacenter is known to hold (an echo came back)."""
    if is_echo(src, target_dc, target_key):
        return "echo"
    if local is None or local.mark_dc == src.dc:
        return "copy"  # nothing here, or the mirror's own earlier copy from the source
    if src.etag in (local.etag, local.mark_etag):
        return "same"  # the content is already here
    if acked_etag is not None and acked_etag == local.etag:
        return "copy"  # the source saw the local version before it wrote this one: sequential
    return "overwrite_local" if newer(src, local) else "keep_local"


def settle_delete(local: Version | None, *, source_dc: str, acked_etag: str | None) -> DeleteVerdict:
    """A delete from `source_dc` removes the mirror's copies and acknowledged versions, never a
    local write the source has not seen."""
    if local is None or local.mark_dc == source_dc or (acked_etag is not None and acked_etag == local.etag):
        return "delete"
    return "write_beats_delete"


def conflict_key(key: str, loser: Version) -> str:
    """Where a losing local version is kept: beside the key, so it is mirrored like any write."""
    return f"{key}.xdc-conflict-{loser.dc}-{loser.etag[:12]}"


class CalledOff(XdcError):
    """A copy the two-way rule calls off before a byte is written (echo, same, keep_local)."""

    retriable = False

    def __init__(self, verdict: PutVerdict, src: Version, local: Version | None) -> None:
        super().__init__(f"{verdict}: source {src.dc} {src.etag}, local {local.etag if local else None}")
        self.verdict, self.src, self.local = verdict, src, local
