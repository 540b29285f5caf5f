"""One exception tree for the whole project.

    XdcError
     +-- ConfigError            bad or inconsistent configuration (never retried)
     +-- StoreError             object store I/O
     |    +-- ObjectNotFound
     |    +-- TransientStoreError   (retriable: 5xx, SlowDown, resets, timeouts)
     |    +-- IntegrityError        size / checksum mismatch after a copy
     +-- EventError             a message that fails validation (goes to the dead-letter topic)
     +-- KafkaError             broker I/O (retriable)
     +-- CacheError             cache cluster operations
     |    +-- NotReadyError         files not mirrored into a datacenter before the timeout
     |    +-- CapacityError         plan larger than the cluster's free cache
     +-- ResizeError            an image that cannot be resized (goes to quarantine)
     +-- FileListError          a file list that cannot be read at all

Third-party exceptions are translated at one boundary per client and raised ``from exc``.
"""
from __future__ import annotations


class XdcError(Exception):
    """Base of every error xdc-mirror raises on purpose."""

    retriable: bool = False


class ConfigError(XdcError):
    pass


class StoreError(XdcError):
    pass


class ObjectNotFound(StoreError):
    pass


class TransientStoreError(StoreError):
    retriable = True


class IntegrityError(StoreError):
    retriable = True  # a torn copy is worth one more try before the dead-letter topic


class EventError(XdcError):
    """A message that cannot be applied as it is. ``reason`` is short and machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class KafkaError(XdcError):
    retriable = True


class CacheError(XdcError):
    pass


class NotReadyError(CacheError):
    pass


class CapacityError(CacheError):
    pass


class ResizeError(XdcError):
    """An input image that cannot be resized; ``reason`` is short and machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FileListError(XdcError):
    pass


class BadKey(XdcError):
    """An object key that cannot be used as given (file lists, key mapping).

    ``reason`` is short and machine-readable: not_str, control_char, backslash, not_utf8, too_long,
    absolute, missing_bucket, bad_bucket, missing_key, dot_segment, empty_segment, no_route,
    outside_prefix, outside_mount.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class AirflowError(XdcError):
    """A local Airflow (tests, demo) that did not start, or a DAG run that did not finish in time."""


class LagObjectiveError(XdcError):
    """A route's p99 replication lag is over ``lag.objective_p99_seconds`` (the lag monitor DAG fails)."""
