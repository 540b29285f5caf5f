"""xdc.problems: log records reduced to signatures, counted and handed to a sink (no servers)."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from xdc.errors import StoreError
from xdc.metrics import Metrics, new_registry
from xdc.problems import ProblemHandler, install, signature, template_of, uninstall


def rec(msg: str, *args: Any, level: int = logging.WARNING, name: str = "mirror.runner",
        exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc else None
    return logging.LogRecord(name, level, __file__, 1, msg, args, info)


DEAD = "message %s[%d]@%d dead-lettered to %s (%s): %s"


def test_variable_parts_do_not_change_the_signature() -> None:
    a = rec(DEAD, "t1a2b3c4.events", 2, 17, "t1a2b3c4.dlq", "copy_failed",
            "idca-drive/camera/x1.jpg: put idcb-drive/camera/x1.jpg: AccessDenied Access Denied")
    b = rec(DEAD, "t9z8y7x6.events", 0, 12345, "t9z8y7x6.dlq", "copy_failed",
            "idca-drive/lidar/2026/y.bin: put idcb-drive/lidar/2026/y.bin: AccessDenied Access Denied")
    assert signature(a) == signature(b)
    assert signature(a).template == ("message <id>.events[<n>]@<n> dead-lettered to <id>.dlq (copy_failed): "
                                     "<path> put <path> AccessDenied Access Denied")


def test_a_different_kind_of_failure_is_another_signature() -> None:
    denied = rec(DEAD, "t.events", 1, 1, "t.dlq", "copy_failed", "b/k: put b2/k: AccessDenied Access Denied")
    slow = rec(DEAD, "t.events", 1, 1, "t.dlq", "copy_failed_after_retries", "b/k: put b2/k: SlowDown Reduce")
    other_level = rec(DEAD, "t.events", 1, 1, "t.dlq", "copy_failed", "b/k: put b2/k: AccessDenied Access Denied",
                      level=logging.ERROR)
    other_logger = rec(DEAD, "t.events", 1, 1, "t.dlq", "copy_failed", "b/k: put b2/k: AccessDenied Access Denied",
                       name="resize.worker")
    ids = {signature(r).id for r in (denied, slow, other_level, other_logger)}
    assert len(ids) == 4


@pytest.mark.parametrize("message, args, leaked", [
    ("login as %s with password=%s failed", ("xdcab12cd34", "hunter2-very-secret"), ["hunter2", "xdcab12cd34"]),
    ("token: %s rejected", ("eyJhbGciOiJIUzI1NiJ9.abc",), ["eyJhbGci"]),
    ("%s", ("copy idca-drive/camera/raw/secret-project/0001.jpg failed",), ["secret-project", "0001.jpg"]),
    ("cannot reach %s", ("http://user:pw@10.1.2.3:9000/bucket/key",), ["10.1.2.3", "pw@", "bucket/key"]),
    ("broker %s down", ("kafka-b.internal:9093",), ["kafka-b.internal"]),
    ("frame %s: %s", ("cam0_000123.jpg", "decode failed"), ["cam0_000123"]),
    ("etag %s != %s", ("5d41402abc4b2a76b9719d911017c592", "'x'"), ["5d41402a"]),
])
def test_no_secrets_keys_or_paths_in_a_signature(message: str, args: tuple[Any, ...], leaked: list[str]) -> None:
    template = signature(rec(message, *args)).template
    for s in leaked:
        assert s not in template, template


def test_an_f_string_message_and_an_exception_argument() -> None:
    exc = StoreError("connect http://127.0.0.1:39931/idcb-drive: refused")
    a = template_of(rec("%s: batch of %d from %s failed (%s); retry in %.1fs", "mirror", 12, "A", exc))
    assert a == "mirror: batch of <n> from A failed (StoreError(connect <url> refused)); retry in <n>s"
    b = template_of(rec(f"queue {17} of {'idca-drive/x/y.jpg'} took {0.25}s"))
    assert b == "queue <n> of <path> took <n>"  # a number's unit goes with it
    c = template_of(rec("unexpected", exc=ValueError("x")))
    assert c == "unexpected [ValueError]"


class Sink:
    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []
        self.fail = False

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Mapping[str, float]:
        if self.fail:
            raise OSError("database away")
        self.calls.append([dict(r) for r in rows])
        return {r["signature"]: 1000.0 for r in rows}  # as if seen long ago by another process


def test_handler_counts_by_component_and_signature_and_flushes_to_the_sink() -> None:
    m = Metrics(new_registry())
    sink = Sink()
    h = ProblemHandler("mirror", sink=sink, metrics=m, flush_seconds=3600)
    log = logging.getLogger("test.problems")
    install(h)
    try:
        for i in range(3):
            log.warning("copy %s failed: %s", f"b/k{i}", "AccessDenied")
        log.info("not a problem %s", 1)
        log.error("other %d", 5)
        sig = signature(rec("copy %s failed: %s", "b/k", "AccessDenied", name="test.problems")).id
        assert m.registry.get_sample_value("xdc_log_problems_total", {"component": "mirror", "signature": sig}) == 3
        deadline = time.monotonic() + 10  # a new signature wakes the flusher at once
        while not sink.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        h.flush()
    finally:
        uninstall(h)
    first = next(r for call in sink.calls for r in call if r["signature"] == sig)  # the state keeps the first example
    assert sum(r["hits"] for call in sink.calls for r in call if r["signature"] == sig) == 3
    assert first["template"] == "copy <path> failed: AccessDenied" and first["example"] == "copy b/k0 failed: AccessDenied"
    assert len({r["signature"] for call in sink.calls for r in call}) == 2  # the INFO record is not a problem
    # the gauge says when the state first saw it (another process, long ago), not this process
    assert m.registry.get_sample_value("xdc_problem_first_seen_timestamp_seconds",
                                       {"component": "mirror", "signature": sig}) == 1000.0


def test_counts_survive_a_sink_failure_and_arrive_later() -> None:
    m = Metrics(new_registry())
    sink = Sink()
    sink.fail = True
    h = ProblemHandler("resize", sink=sink, metrics=m, flush_seconds=3600)
    try:
        h.handle(rec("x %d", 1))
        h.flush()
        h.handle(rec("x %d", 2))
        sink.fail = False
        h.flush()
    finally:
        h.close()
    assert [r["hits"] for call in sink.calls for r in call] == [2]


def test_records_logged_while_the_sink_writes_are_not_fed_back() -> None:
    m = Metrics(new_registry())
    h: ProblemHandler

    def noisy(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, float]:
        logging.getLogger("xdc.io.state").warning("slow write %d", 1)  # e.g. the state complaining
        return {}
    h = ProblemHandler("mirror", sink=noisy, metrics=m, flush_seconds=3600)
    install(h)
    try:
        logging.getLogger("t").warning("first")
        h.flush()
        h.flush()
    finally:
        uninstall(h)
    sig = signature(rec("slow write %d", 1, name="xdc.io.state")).id
    assert m.registry.get_sample_value("xdc_log_problems_total", {"component": "mirror", "signature": sig}) is None
