"""New problems, found without a rule: log records at WARNING and above reduced to signatures.

A signature is the record's message template with its variable parts removed: the arguments of a
%-style message and anything in the text that varies from one occurrence to the next (numbers,
ids, object keys and paths, URLs and addresses, quoted values, secrets) become placeholders, so
"copy idca-drive/cam/1.jpg failed: AccessDenied" and "copy idca-drive/cam/2.jpg failed:
AccessDenied" are one signature, "... failed: SlowDown" another. Its id is a hash of the level,
the logger and the template.

`ProblemHandler` is a logging handler: it counts every record in Prometheus by component and
signature id (`xdc_log_problems_total`) and hands the counts, with first/last seen and one example,
to a sink (the state, `xdc.observe.telemetry`) from a background thread, so logging never waits
for a database. The sink answers with each signature's first-seen time across every process, which
`xdc_problem_first_seen_timestamp_seconds` exports for the new-signature alert.
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xdc.metrics import METRICS, Metrics

TEMPLATE_MAX = 240
EXAMPLE_MAX = 500

_SPEC = re.compile(r"%(\([^)]*\))?[#0\- +]*(\*|\d+)?(\.(\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
_NUMERIC = set("diouxXeEfFgGc")

# Order matters: secrets first (their values may look like anything), then the shapes that
# contain the others (URLs contain paths and addresses, quoted strings contain anything).
_SECRET = re.compile(r"(?i)\b(password|passwd|pwd|secret|token|access[_-]?key|secret[_-]?key|api[_-]?key|"
                     r"authorization|credential|sasl[_.]password)(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)")
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+"), "<url>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?"), "<addr>"),
    (re.compile(r"\b[A-Za-z][\w.-]*:\d{2,5}\b"), "<addr>"),
    (re.compile(r"[^\s'\"()\[\]{},;=<>]*/[^\s'\"()\[\]{},;=<>]*"), "<path>"),
    (re.compile(r"\b[\w.-]+\.(?:jpe?g|png|bin|txt|csv|tsv|parquet|pkl|json|ya?ml|db|log|tiff?|mp4|pcd|npz?)\b",
                re.IGNORECASE), "<file>"),
    # ids: a word of 8+ characters with both letters and digits (hashes, uuids, access keys, tags)
    (re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{8,}\b"), "<id>"),
    (re.compile(r"(?<![\w<])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?:[a-zA-Z%]{1,3})?\b"), "<n>"),
)
_RUNS = re.compile(r"(<(\w+)>)(?:[\s,;:|/-]*<\2>)+")


def mask_secrets(text: str) -> str:
    """Secret-looking assignments (password=..., token: ...) with their value replaced."""
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}<secret>", text)


def reduce(text: str) -> str:
    """The variable parts of a text replaced by placeholders (see the module's doc)."""
    out = mask_secrets(text)
    for pat, token in _RULES:
        out = pat.sub(token, out)
    out = _RUNS.sub(r"\1…", out)
    return re.sub(r"\s+", " ", out)[:TEMPLATE_MAX]


def _arg_token(arg: Any, conv: str) -> str:
    if conv in _NUMERIC:
        return "<n>"
    if isinstance(arg, BaseException):
        return f"{type(arg).__name__}({reduce(str(arg))})"
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return "<n>"
    text = repr(arg) if conv == "r" else str(arg)
    return reduce(text)


def template_of(record: logging.LogRecord) -> str:
    """The record's message with its variable parts removed (never its arguments' values)."""
    msg = record.msg if isinstance(record.msg, str) else str(record.msg)
    args = record.args
    if args and not isinstance(args, Mapping):
        values = iter(args if isinstance(args, tuple) else (args,))
        # the literal parts are reduced too (an f-string message is all "literal")
        specs = list(_SPEC.finditer(msg))
        text, at = "", 0
        for m in specs:
            text += reduce(msg[at:m.start()])
            conv = m.group(5)
            text += "%" if conv == "%" else _arg_token(next(values, None), conv)
            at = m.end()
        text += reduce(msg[at:])
    else:
        text = reduce(msg)
    if record.exc_info and record.exc_info[0] is not None:
        text += f" [{record.exc_info[0].__name__}]"
    return " ".join(text.split())[:TEMPLATE_MAX]


@dataclass(frozen=True)
class Signature:
    id: str
    level: str
    logger: str
    template: str


def signature(record: logging.LogRecord) -> Signature:
    template = template_of(record)
    level = record.levelname
    digest = hashlib.sha1(f"{level}|{record.name}|{template}".encode(), usedforsecurity=False).hexdigest()[:12]
    return Signature(digest, level, record.name, template)


def example_of(record: logging.LogRecord) -> str:
    """One occurrence as people read it, secrets masked (keys and paths kept: they help)."""
    try:
        text = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must not break logging
        text = str(record.msg)
    if record.exc_info and record.exc_info[1] is not None:
        text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
    return mask_secrets(text)[:EXAMPLE_MAX]


# A sink takes rows {component, signature, level, logger, template, first_seen, last_seen, hits,
# example} and returns each signature's first-seen time as kept (signature -> epoch seconds).
ProblemSink = Callable[[Sequence[Mapping[str, Any]]], Mapping[str, float]]

_writing = threading.local()  # set while the sink runs: what it logs is not fed back into it


class ProblemHandler(logging.Handler):
    """Counts WARNING+ records by signature; the flusher thread hands them to `sink`."""

    def __init__(self, component: str, *, sink: ProblemSink | None = None, metrics: Metrics | None = None,
                 flush_seconds: float = 5.0, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.component = component
        self.sink = sink
        self.metrics = metrics or METRICS
        self.flush_seconds = flush_seconds
        self._pending: dict[str, dict[str, Any]] = {}
        self._known: set[str] = set()  # signatures this process has seen
        self._plock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if sink is not None:
            self._thread = threading.Thread(target=self._run, name="xdc-problems", daemon=True)
            self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(_writing, "active", False):
            return
        try:
            sig = signature(record)
            now = record.created
            self.metrics.log_problems_total.labels(self.component, sig.id).inc()
            with self._plock:
                row = self._pending.get(sig.id)
                if row is None:
                    self._pending[sig.id] = {
                        "component": self.component, "signature": sig.id, "level": sig.level, "logger": sig.logger,
                        "template": sig.template, "first_seen": now, "last_seen": now, "hits": 1,
                        "example": example_of(record)}
                else:
                    row["hits"] += 1
                    row["last_seen"] = max(row["last_seen"], now)
                new = sig.id not in self._known
                self._known.add(sig.id)
            if new:
                if self.sink is None:  # nowhere to learn an older first sighting from
                    self.metrics.problem_first_seen.labels(self.component, sig.id).set(now)
                self._wake.set()  # a new kind of problem reaches the state (and the gauge) promptly
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Hand what was counted since the last flush to the sink (kept for the next try if it fails)."""
        if self.sink is None:
            return
        with self._plock:
            rows, self._pending = list(self._pending.values()), {}
        if not rows:
            return
        _writing.active = True
        try:
            first = self.sink(rows)
        except Exception as exc:  # noqa: BLE001 - retried at the next flush
            with self._plock:
                for r in rows:
                    cur = self._pending.get(r["signature"])
                    if cur is None:
                        self._pending[r["signature"]] = r
                    else:
                        cur["hits"] += r["hits"]
                        cur["first_seen"] = min(cur["first_seen"], r["first_seen"])
            self._last_error = f"{type(exc).__name__}: {exc}"
            return
        finally:
            _writing.active = False
        for r in rows:
            t = first.get(r["signature"], r["first_seen"])
            self.metrics.problem_first_seen.labels(self.component, r["signature"]).set(t)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        super().close()


def install(handler: ProblemHandler) -> ProblemHandler:
    """Attach to the root logger (records of every library pass through it)."""
    logging.getLogger().addHandler(handler)
    return handler


def uninstall(handler: ProblemHandler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()

