"""What a datacenter's state holds, by role. Backends implement each role once (`sql.py`).

    State (one per datacenter)
     +-- catalog    ObjectCatalog   objects, consumed offsets, the outbox of applied events
     +-- incidents  Incidents       dead letters, quarantined objects, offset gaps, two-way conflicts
     +-- lag        LagHistory      lag snapshots per route
     +-- verify     VerifyHistory   verify runs per route (source vs target listings)
     +-- prewarm    PrewarmRecords  warm bandwidth, dataset registrations, staged lists, progress
     +-- releases   ReleaseLedger   every dataset release seen here and what became of it
     +-- traces     Traces          recent spans of sampled traces (the built-in sink of xdc.trace)
     +-- configs    ConfigHistory   config versions and the processes that ran them
     +-- problems   ProblemLog      log signatures: first/last seen, count, one example

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
    # "s3": applied from an S3 event (sequencer is the store's); "reconcile": from a repair, which
    # read the source and kept the newest S3 sequencer seen; "echo": the source datacenter's copy
    # of this datacenter's own version was announced back (two-way routes, sequencer is the source's)
    origin: str = "s3"
    tags: str | None = None  # JSON object of the object's tags as last mirrored (None: none / unknown)
    acl: str | None = None  # canned ACL as last mirrored ("custom:<json>" when it is not a canned one)


@dataclass(frozen=True)
class MetaChange:
    """A tag or ACL change of an object the catalog holds (the content is unchanged)."""

    bucket: str
    key: str
    kind: Literal["tags", "acl"]
    value: str | None  # tags as a JSON object, the canned ACL; None: removed


@dataclass(frozen=True)
class Outgoing:
    """A Kafka message owed downstream, kept in the outbox until it is published."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()  # e.g. traceparent


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
    retired_at: float | None = None  # epoch seconds, for retired registrations


@dataclass(frozen=True)
class NodeUsage:
    """A cache node's fill as last seen (for the dashboard): bytes and watermarks (shares)."""

    node: str
    used: int
    capacity: int
    high_watermark: float
    low_watermark: float
    updated: float = 0.0


class ObjectCatalog(ABC):
    """What a datacenter holds, with the offsets it has consumed and the events it owes."""

    @abstractmethod
    def get_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], CatalogEntry]: ...

    def get(self, bucket: str, key: str) -> CatalogEntry | None:
        return self.get_many([(bucket, key)]).get((bucket, key))

    @abstractmethod
    def commit_batch(self, entries: Sequence[CatalogEntry],
                     outbox: Callable[[list[CatalogEntry]], Sequence[Outgoing]],
                     offsets: Offsets, meta: Sequence[MetaChange] = ()) -> list[CatalogEntry]:
        """Atomically: upsert the entries whose sequencer is newer than the stored one (entries of
        origin "reconcile" always, keeping the greater sequencer), apply the tag / ACL changes to
        the live rows they name, queue the outbox rows of the entries that were applied, record
        the offsets (never moving back). Returns the entries applied (another writer may have
        stored a newer one meanwhile)."""

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


IncidentKind = Literal["dead_letters", "quarantine", "gaps", "conflicts", "etag_changes"]


@dataclass(frozen=True)
class Gap:
    """Events that expired from a partition before the group read them (or could have: no offset)."""

    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group has no committed offset on a partition that holds data
    log_start: int
    lost: int | None  # messages between the committed offset and the log start (None: unknown)
    routes: tuple[str, ...]  # the routes the partition feeds
    repair: str  # what was done about it ("verify --repair started", ...)


@dataclass(frozen=True)
class Conflict:
    """Concurrent writes of one key in both datacenters (two-way routes), and how they were settled."""

    route: str
    bucket: str
    key: str
    winner_dc: str
    winner_etag: str
    loser_dc: str
    loser_etag: str
    kept_key: str | None  # where the losing version is kept (None: it stays where it is)
    resolution: str  # "last_writer_wins", "write_beats_delete"
    detail: str = ""


class Incidents(ABC):
    """Summaries of what could not be applied as it came, for the dashboard (the letters are in Kafka)."""

    @abstractmethod
    def record_dead_letter(self, topic: str, partition: int | None, offset: int | None, reason: str,
                           detail: str, size: int) -> None: ...

    @abstractmethod
    def record_quarantine(self, bucket: str, key: str, reason: str, detail: str) -> None: ...

    @abstractmethod
    def record_gap(self, gap: Gap) -> bool:
        """Record a gap with repair status "pending"; False (nothing recorded) when the same gap
        (group, topic, partition, committed offset) is already recorded and not yet repaired (a
        process that died before acknowledging it finds it again)."""

    @abstractmethod
    def open_gaps(self, group: str) -> list[dict[str, Any]]:
        """The group's gaps whose repair has not finished (status "pending"), oldest first."""

    @abstractmethod
    def finish_gap(self, gap_id: int, status: str, repair: str) -> None:
        """Set a gap's repair status ("repaired", "failed") and what was done."""

    @abstractmethod
    def record_conflict(self, conflict: Conflict) -> None: ...

    @abstractmethod
    def record_etag_change(self, bucket: str, key: str, source_etag: str, etag: str, layout: str,
                           reason: str) -> None:
        """An object copied with another ETag than its source's (its part layout could not be
        reproduced), and why; the catalog holds both ETags."""

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


class VerifyHistory(ABC):
    """Each verify run of a route: counts of source vs target and the first differences."""

    @abstractmethod
    def record(self, run: Mapping[str, Any]) -> None:
        """route, started, finished, trigger, source_listed, target_listed, missing, extra, differ,
        matched, errors, repaired, sample (a list of the first differences, JSON-able)."""

    @abstractmethod
    def latest(self) -> dict[str, dict[str, Any]]:
        """route -> its most recent run."""

    @abstractmethod
    def history(self, route: str, limit: int = 20) -> list[dict[str, Any]]: ...


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
    def users(self, keys: Sequence[str], exclude: tuple[str, str] | None = None, *,
              staged: bool = False) -> dict[str, list[str]]:
        """bucket_key -> ["dataset@version", ...] of ACTIVE registrations using it (minus exclude);
        staged=True counts staged ones (a prewarm in flight) as users too."""

    @abstractmethod
    def retired(self) -> list[Registration]:
        """Retired registrations, oldest retirement first."""

    @abstractmethod
    def keys_of(self, dataset: str, version: str) -> list[str]:
        """The keys a registration (any state) holds."""

    @abstractmethod
    def record_ready(self, dataset: str, version: str, *, ready: bool, files: int, nbytes: int,
                     cached_ratio: float, manifest_uri: str | None, now: float,
                     announce: Outgoing | None = None) -> bool:
        """Record a version's check result. Returns True when it BECAME ready (was not, or was never
        checked); only then is `announce` queued in the outbox, in the same transaction."""

    @abstractmethod
    def readiness(self) -> list[dict[str, Any]]:
        """Every checked version: dataset, version, ready, files, bytes, cached_ratio, manifest_uri,
        ready_at (when it last became ready), checked_at."""

    @abstractmethod
    def record_nodes(self, nodes: Sequence[NodeUsage]) -> None:
        """Upsert cache nodes' fill (one row per node)."""

    @abstractmethod
    def nodes(self) -> list[NodeUsage]: ...

    @abstractmethod
    def record_eviction(self, dataset: str, version: str, node: str, files: int, nbytes: int, reason: str) -> None:
        """What was evicted from a node to make room (or by a free), for the record."""

    @abstractmethod
    def evictions(self, limit: int = 50) -> list[dict[str, Any]]: ...

    @abstractmethod
    def record_progress(self, dataset: str, *, files_done: int, files_total: int, bytes_done: int,
                        bytes_total: int, eta_s: float | None, cached_ratio: float | None = None,
                        ready: bool | None = None, now: float | None = None) -> None:
        """Upsert a dataset's progress; None for cached_ratio/ready keeps the stored value."""

    @abstractmethod
    def progress(self) -> list[dict[str, Any]]: ...


LedgerState = Literal["pending", "warm", "incomplete", "dead_lettered", "failed", "not_here"]
#: a release in one of these states has a result here; "pending" ones are owed a prewarm
LEDGER_RESULTS: frozenset[str] = frozenset({"warm", "incomplete", "dead_lettered", "failed", "not_here"})


@dataclass(frozen=True)
class LedgerEntry:
    """One dataset release as this datacenter saw it, and its outcome here."""

    dataset: str
    version: str
    payload: dict[str, Any]  # the release document as delivered (JSON)
    origin: str  # where the delivery came from: "<dc>:<topic>[<partition>]@<offset>", "dag", "reconcile"
    state: LedgerState
    attempts: int  # prewarm tries since this delivery
    detail: str  # the last error, or the outcome's summary
    first_seen: float
    updated: float

    @property
    def has_result(self) -> bool:
        return self.state in LEDGER_RESULTS


class ReleaseLedger(ABC):
    """Every dataset release seen in a datacenter, keyed by (dataset, version), with its outcome.

    The release follower and the prewarm DAG write it; the reconciler re-drives what has no
    result. A delivery is identified by its origin: the same delivery seen again (a batch redone
    after a crash) keeps a result it already has; a new delivery (published again, replayed from
    the dead-letter topic) makes the release pending again.
    """

    @abstractmethod
    def seen(self, dataset: str, version: str, payload: Mapping[str, Any], origin: str, *,
             state: LedgerState = "pending", now: float | None = None) -> LedgerEntry:
        """Record a delivery; returns the entry as it now stands."""

    @abstractmethod
    def attempt(self, dataset: str, version: str) -> None:
        """Count a prewarm try."""

    @abstractmethod
    def note(self, dataset: str, version: str, detail: str) -> None:
        """Why the last try failed (the state stays as it is)."""

    @abstractmethod
    def finish(self, dataset: str, version: str, state: LedgerState, detail: str = "") -> None:
        """Record the release's outcome here."""

    @abstractmethod
    def get(self, dataset: str, version: str) -> LedgerEntry | None: ...

    @abstractmethod
    def entries(self, states: Sequence[str] | None = None) -> list[LedgerEntry]:
        """Entries (only those in `states`), oldest first."""


class Traces(ABC):
    """Recent spans of sampled traces, as `xdc.trace.span_row` dicts (the built-in sink)."""

    @abstractmethod
    def record(self, spans: Sequence[Mapping[str, Any]], *, retention_s: float, max_spans: int,
               now: float | None = None) -> None:
        """Keep these spans (a span seen twice is kept once); drop spans older than retention_s
        and, beyond max_spans, the oldest."""

    @abstractmethod
    def trace_ids(self, keys: Iterable[str], limit: int = 20) -> list[str]:
        """Traces with a span naming one of these "bucket/key"s, the most recent first."""

    @abstractmethod
    def spans(self, trace_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Every kept span of these traces, by start time."""

    @abstractmethod
    def anchors(self, keys: Sequence[str], names: Sequence[str]) -> dict[str, tuple[str, str]]:
        """bucket_key -> (trace_id, span_id) of the most recent span named one of `names` for it."""

    @abstractmethod
    def recent_keys(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recently traced keys: key, trace_id, last (end time)."""

    @abstractmethod
    def count(self) -> int: ...


class ConfigHistory(ABC):
    """Which config each long-running process ran with (the config centre's history)."""

    @abstractmethod
    def record_start(self, *, config_hash: str, body: Mapping[str, Any], component: str, host: str, pid: int,
                     dc: str, now: float | None = None) -> int:
        """Keep the config version (once per hash) and a row for the process; returns its id."""

    @abstractmethod
    def heartbeat(self, process_id: int, now: float | None = None) -> None: ...

    @abstractmethod
    def record_stop(self, process_id: int, now: float | None = None) -> None: ...

    @abstractmethod
    def versions(self, limit: int = 50) -> list[dict[str, Any]]:
        """Config versions, newest first: hash, first_seen, last_seen (by its processes), processes."""

    @abstractmethod
    def body(self, hash_prefix: str) -> tuple[str, dict[str, Any]] | None:
        """(full hash, masked body) of the version whose hash starts with hash_prefix; None if none.
        ValueError when the prefix names several."""

    @abstractmethod
    def processes(self, since: float | None = None) -> list[dict[str, Any]]:
        """Process rows (component, host, pid, dc, config_hash, started_at, last_seen, stopped_at),
        newest first; `since`: only those seen since then."""


class ProblemLog(ABC):
    """Log signatures (xdc.problems) of one datacenter's processes."""

    @abstractmethod
    def record(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Add counts: {component, signature, level, logger, template, first_seen, last_seen, hits,
        example}; the first example is kept. Returns signature -> first_seen as kept."""

    @abstractmethod
    def recent(self, limit: int = 100, since: float | None = None) -> list[dict[str, Any]]:
        """Signatures, the most recently first seen first (`since`: first seen since then)."""


class State(ABC):
    """One datacenter's state: its roles over one database."""

    catalog: ObjectCatalog
    incidents: Incidents
    lag: LagHistory
    verify: VerifyHistory
    prewarm: PrewarmRecords
    releases: ReleaseLedger
    traces: Traces
    configs: ConfigHistory
    problems: ProblemLog
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
