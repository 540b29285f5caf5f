"""What a datacenter's state holds, by role. Backends implement each role once (`sql.py`).

    State (one per datacenter)
     +-- catalog    ObjectCatalog   objects, consumed offsets, the outbox of applied events
     +-- incidents  Incidents       dead letters and quarantined objects, for the dashboard
     +-- lag        LagHistory      lag snapshots per route
     +-- prewarm    PrewarmRecords  warm bandwidth, dataset registrations, staged lists, progress

Every write that must be durable before a Kafka commit goes through one transaction
(`ObjectCatalog.commit_batch`). No module outside `xdc.io.state` writes SQL.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Offsets = Mapping[tuple[str, str, int], int]  # (group, topic, partition) -> next offset


class CatalogEntry(msgspec.Struct, frozen=True):
    """One object as the target datacenter holds it (a tombstone when `deleted`). A Struct: the
    mirror builds one per applied event."""

    bucket: str
    key: str
    size: int
    etag: str
    sequencer: str
    deleted: bool
    event_time: float
    applied_time: float
    route: str
    mode: str
    source_dc: str
    source_bucket: str
    source_key: str
    source_etag: str


@dataclass(frozen=True)
class Outgoing:
    """A Kafka message owed downstream, kept in the outbox until it is published."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class OutboxRow:
    """An outbox row as a publisher claims it."""

    id: int
    message: Outgoing
    # (partition, offset): a publisher marked it and may have sent it to that partition at or
    # after that offset before it died; look there before sending it again
    tried: tuple[int, int] | None = None


class OutboxClaim(ABC):
    """The rows one publisher holds (`ObjectCatalog.claim_outbox`)."""

    rows: list[OutboxRow]

    @abstractmethod
    def mark_tried(self, where: Mapping[int, tuple[int, int]]) -> None:
        """Record durably, before sending, where each row goes: row id -> (partition, the
        partition's log end offset now). An earlier mark of a row is kept (the earlier offset)."""


@dataclass(frozen=True)
class Registration:
    dataset: str
    version: str
    state: str  # staged | active | retired
    manifest_uri: str | None
    keys: int


class ObjectCatalog(ABC):
    """What a datacenter holds, with the offsets it has consumed and the events it owes."""

    @abstractmethod
    def get_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], CatalogEntry]: ...

    def get(self, bucket: str, key: str) -> CatalogEntry | None:
        return self.get_many([(bucket, key)]).get((bucket, key))

    @abstractmethod
    def commit_batch(self, entries: Sequence[CatalogEntry],
                     outbox: Callable[[list[CatalogEntry]], Sequence[Outgoing]],
                     offsets: Offsets) -> list[CatalogEntry]:
        """Atomically: upsert the entries whose sequencer is newer than the stored one, queue the
        outbox rows of the entries that were applied, record the offsets (never moving back).
        Returns the entries applied (another writer may have stored a newer one meanwhile)."""

    @abstractmethod
    def claim_outbox(self, limit: int = 10_000) -> AbstractContextManager[OutboxClaim]:
        """Rows for this publisher only, in the order they were queued. Per message key the claim
        holds the oldest rows of that key, and no other publisher gets any row of that key until
        the block exits: one key's messages are published in order, even by several replicas.
        The rows are deleted when the block exits normally, and kept (with their marks) for
        another try when it raises."""

    @abstractmethod
    def outbox_size(self) -> int: ...

    @abstractmethod
    def iter_route(self, route: str, prefix: str = "") -> Iterator[CatalogEntry]:
        """Live (not deleted) entries of a route under a source-key prefix, in source-key order
        (UTF-8 byte order, as S3 lists), streamed in pages."""

    @abstractmethod
    def live_objects(self, bucket: str | None = None) -> list[CatalogEntry]: ...

    @abstractmethod
    def offsets(self, group: str) -> dict[tuple[str, int], int]: ...

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """objects (live), bytes, tombstones."""

    @abstractmethod
    def route_totals(self) -> dict[str, dict[str, int]]:
        """route -> live objects, their bytes, tombstones."""

    @abstractmethod
    def lags(self, since: float, route: str | None = None) -> list[float]:
        """applied_time - event_time of the entries applied since `since`."""


IncidentKind = Literal["dead_letters", "quarantine"]


class Incidents(ABC):
    """Summaries of what could not be applied, for the dashboard (the letters are in Kafka)."""

    @abstractmethod
    def record_dead_letter(self, topic: str, partition: int | None, offset: int | None, reason: str,
                           detail: str, size: int) -> None: ...

    @abstractmethod
    def record_quarantine(self, bucket: str, key: str, reason: str, detail: str) -> None: ...

    @abstractmethod
    def recent(self, kind: IncidentKind, limit: int = 50) -> list[dict[str, Any]]: ...


class LagHistory(ABC):
    @abstractmethod
    def record(self, rows: Sequence[Mapping[str, Any]], retention_s: float, now: float | None = None) -> None:
        """One snapshot: a row per route (route, events, p50, p99, max, consumer_lag,
        pending_objects, pending_bytes); rows older than retention_s are dropped."""

    @abstractmethod
    def history(self, since: float) -> list[dict[str, Any]]: ...

    @abstractmethod
    def latest(self) -> list[dict[str, Any]]:
        """The rows of the most recent snapshot, one per route."""


class PrewarmRecords(ABC):
    """Prewarm bookkeeping of one datacenter."""

    @abstractmethod
    def record_run(self, nbytes: int, files: int, seconds: float, nodes: int = 1) -> None: ...

    @abstractmethod
    def runs(self, limit: int = 5, min_seconds: float = 0.2) -> list[tuple[int, int, float]]:
        """The most recent warm runs (bytes, files, seconds), newest first."""

    @abstractmethod
    def stage(self, dataset: str, version: str, keys: Iterable[str], manifest_uri: str | None,
              info: Mapping[str, Any]) -> int:
        """Keep a resolved file list for the later phases of a prewarm (another process may run
        them): the keys, and `info` (JSON-able: list stats, rejected entries). Returns the count."""

    @abstractmethod
    def staged(self, dataset: str, version: str) -> tuple[list[str], dict[str, Any]] | None:
        """The keys and info of a staged (or registered) list, None if unknown."""

    @abstractmethod
    def register(self, dataset: str, version: str, keys: Iterable[str] | None = None,
                 manifest_uri: str | None = None) -> int:
        """Make dataset@version active with these keys (None: the staged ones). Returns the count."""

    @abstractmethod
    def retire(self, dataset: str, version: str) -> bool: ...

    @abstractmethod
    def registrations(self) -> list[Registration]: ...

    @abstractmethod
    def users(self, keys: Sequence[str], exclude: tuple[str, str] | None = None) -> dict[str, list[str]]:
        """bucket_key -> ["dataset@version", ...] of ACTIVE registrations using it (minus exclude)."""

    @abstractmethod
    def record_progress(self, dataset: str, *, files_done: int, files_total: int, bytes_done: int,
                        bytes_total: int, eta_s: float | None, cached_ratio: float | None = None,
                        ready: bool | None = None, now: float | None = None) -> None:
        """Upsert a dataset's progress; None for cached_ratio/ready keeps the stored value."""

    @abstractmethod
    def progress(self) -> list[dict[str, Any]]: ...


class State(ABC):
    """One datacenter's state: its roles over one database."""

    catalog: ObjectCatalog
    incidents: Incidents
    lag: LagHistory
    prewarm: PrewarmRecords
    backend: str = ""
    #: several processes may write (mirror replicas): only on a server database
    supports_replicas: bool = False

    def lease(self, role: str) -> AbstractContextManager[None]:
        """Held while a `role` process (mirror, resize) works on this state. A state that takes
        several writers lets every replica hold it; one that takes one (SQLite) refuses a second
        holder with ReplicaRefused, naming the one that holds it."""
        return nullcontext()

    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def describe(self) -> str:
        """Where the state lives, without secrets."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
