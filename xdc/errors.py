"""One exception tree for the whole project.

    XdcError
     +-- ConfigError            bad or inconsistent configuration (never retried)
     |    +-- ReplicaRefused        a second mirror / resize process on a state that takes one
     +-- StoreError             object store I/O
     |    +-- ObjectNotFound
     |    +-- TransientStoreError   (retriable: 5xx, SlowDown, resets, timeouts)
     |    |    +-- UnavailableError      the endpoint cannot be reached at all
     |    +-- IntegrityError        size / checksum mismatch after a copy (retriable)
     |    +-- SupersededError       the source changed after the event
     |    +-- StoreTrustError       endpoint not trusted (TLS) or credentials refused (fatal)
     +-- KafkaError             broker I/O (retriable as the client says)
     |    +-- RebalancedError       a commit refused after the group moved the partitions
     |    +-- KafkaAuthError        credentials refused or broker not trusted (never retriable)
     +-- StateError             state database I/O
     |    +-- TransientStateError   (retriable: lost connection, lock timeout, serialization)
     +-- CacheError             cache cluster operations
     |    +-- NotReadyError         files not mirrored into a datacenter before the timeout
     |    +-- CapacityError         plan larger than the cluster's free cache (under the high watermark)
     |         +-- RoomError            ... and retired datasets could make room: `.room` names them
     +-- FileListError          a file list that cannot be read at all
     +-- ReasonedError          one bad input, with a machine-readable reason and a detail
     |    +-- EventError            a message that fails validation (-> dead-letter topic)
     |    +-- ResizeError           an image that cannot be resized (-> quarantine)
     |    +-- BadKey                a key in a file list that cannot be used or mapped
     +-- AirflowError           a local Airflow that did not start / a run that did not finish
     +-- LagObjectiveError      p99 lag over the objective (the lag monitor DAG fails)

Third-party exceptions are translated at one boundary per client and raised ``from exc``.
"""
from __future__ import annotations


class XdcError(Exception):
    """Base of every error xdc-mirror raises on purpose.

    `retriable`: trying again later may succeed. `fatal`: no input is at fault and no retry helps
    (a misconfiguration): a consume loop stops at once instead of dead-lettering its records.
    """

    retriable: bool = False
    fatal: bool = False


class ConfigError(XdcError):
    pass


class ReplicaRefused(ConfigError):
    """A second mirror or resize process on a state that takes one writer (SQLite)."""


class StoreError(XdcError):
    pass


class ObjectNotFound(StoreError):
    pass


class TransientStoreError(StoreError):
    retriable = True


class UnavailableError(TransientStoreError):
    """The endpoint cannot be reached at all (refused, connect timeout): wait for it, do not give up."""


class IntegrityError(StoreError):
    retriable = True  # a torn copy is worth one more try before the dead-letter topic


class SupersededError(StoreError):
    """The source object changed or vanished after the event: a newer event carries the truth."""


class StoreTrustError(StoreError):
    """An endpoint whose TLS certificate is not trusted, or that refuses the credentials: the
    message names the endpoint, the CA bundle in use and what to fix."""

    fatal = True


class ReasonedError(XdcError):
    """An error about one input, with a short machine-readable ``reason`` and a human ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class EventError(ReasonedError):
    """A message that cannot be applied as it is."""


class KafkaError(XdcError):
    retriable = True  # the boundary sets it per error from the client's own flag


class RebalancedError(KafkaError):
    """A commit refused because the consumer group moved the partitions to another member."""

    retriable = False


class StateError(XdcError):
    pass


class TransientStateError(StateError):
    retriable = True


class KafkaAuthError(KafkaError):
    """SASL credentials refused, or a TLS handshake failed (untrusted or wrong certificate).

    Retrying does not help: the message names the broker and what to fix.
    """

    retriable = False


class CacheError(XdcError):
    pass


class NotReadyError(CacheError):
    retriable = True  # files (or the list) not mirrored here yet: later they will be


class CapacityError(CacheError):
    pass


class RoomError(CapacityError):
    """A plan that would pass a node's high watermark, refused without make-room; `.room` holds
    which retired datasets would go (cache_client.watermarks.RoomPlan.to_dict())."""

    def __init__(self, message: str, room: dict | None = None) -> None:
        super().__init__(message)
        self.room = room or {}


class ResizeError(ReasonedError):
    """An input image that cannot be resized."""


class FileListError(XdcError):
    pass


class BadKey(ReasonedError):
    """An object key that cannot be used as given (file lists, key mapping).

    ``reason`` is short and machine-readable: not_str, control_char, backslash, not_utf8, too_long,
    absolute, missing_bucket, bad_bucket, missing_key, dot_segment, empty_segment, no_route,
    outside_prefix, outside_mount.
    """


class AirflowError(XdcError):
    """A local Airflow (tests, demo) that did not start, or a DAG run that did not finish in time."""


class LagObjectiveError(XdcError):
    """A route's p99 replication lag is over ``lag.objective_p99_seconds`` (the lag monitor DAG fails)."""
