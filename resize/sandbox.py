"""Native image work in a resident child process: a crash kills the child, never the caller.

libvips, libjpeg and libpng are C. A valid but unusual frame has killed them before (a CMYK JPEG
took libvips' jpegsave_buffer down with SIGSEGV, issue 15), and the next one may be hostile. A
Sandbox runs one function in one long-lived spawn child and turns the child's death into a
ResizeError that names the signal and the frame:

    with Sandbox("resize.frame:resize_path") as box:
        out = box.call(job, label="frames/a.jpg")   # ResizeError("worker_crashed", "SIGSEGV while ...")

One call at a time per child, so a crash is charged to exactly the frame being worked on; the next
call starts a fresh child. Reasons raised here: worker_crashed (the child died: signal or exit code
in the detail), worker_timeout (no answer in time: the child is killed), worker_start_failed (a
child that cannot start is not any frame's fault; an initializer's own XdcError is raised as is). The child stays resident because starting one costs an interpreter and
the pyvips import (about 0.3 s), several frames' worth. SandboxPool runs N of them behind
concurrent futures for the resize worker.

The child's logging follows the caller's level for the "pyvips" logger: above WARNING (the CLI
without -v) the child's native stderr goes to a scratch file, so libvips' and GLib's own lines stay
out of the output; the file's tail is logged at DEBUG when the child crashes.

Spawned children re-import the caller's __main__: scripts that use this need the usual
``if __name__ == "__main__":`` guard (the xdc CLI has it).

Tests only: with XDC_TEST_RESIZE_SEGV=MARKER in the environment, the child kills itself with a real
SIGSEGV before working on any call whose label contains MARKER.
"""
from __future__ import annotations

import atexit
import faulthandler
import importlib
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import tempfile
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any

from xdc.errors import ReasonedError, ResizeError, XdcError

log = logging.getLogger(__name__)

CRASH_ENV = "XDC_TEST_RESIZE_SEGV"
START_TIMEOUT_S = 120.0  # interpreter + imports + initializer on a loaded 2-core machine
_TAIL_BYTES = 2000


class Sandbox:
    """One resident child that runs ``target`` ("module:function", called with one argument)."""

    def __init__(self, target: str, *, initializer: str | None = None, initargs: tuple[Any, ...] = (),
                 timeout: float | None = None) -> None:
        self.target = target
        self.initializer = initializer
        self.initargs = initargs
        self.timeout = timeout
        self.starts = 0  # children started so far (1 + crashes, unless closed in between)
        self._proc: Any = None  # multiprocessing.Process of the spawn context
        self._conn: Connection | None = None
        self._stderr_path: str | None = None
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the child now (a call starts it lazily otherwise); raises what the initializer raised."""
        with self._lock:
            self._ensure_started()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._stop()
        level = logging.getLogger("pyvips").getEffectiveLevel()
        if level > logging.WARNING:
            fd, self._stderr_path = tempfile.mkstemp(prefix="xdc-resize-child-", suffix=".log")
            os.close(fd)
        ctx = multiprocessing.get_context("spawn")  # fork would copy libvips' threads half-initialised
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_main, name="xdc-resize-sandbox", daemon=True,
                           args=(child, self.target, self.initializer, self.initargs, level, self._stderr_path))
        try:
            proc.start()
        finally:
            child.close()
        self._proc, self._conn = proc, parent
        self.starts += 1
        try:
            if not wait([parent, proc.sentinel], START_TIMEOUT_S):
                raise EOFError
            kind, payload = parent.recv()
        except (EOFError, OSError):
            died = self._death()
            self._stop()
            raise ResizeError("worker_start_failed", f"resize child did not start ({died})") from None
        if kind != "ready":
            self._stop()
            exc = _unpack(payload)
            if isinstance(exc, XdcError):
                raise exc
            raise ResizeError("worker_start_failed", f"resize child did not start: {exc!r}") from exc

    def _stop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)  # ask politely: the child leaves its loop
            except (OSError, ValueError):
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()  # our own child, by its pid
                self._proc.join(5)
            self._proc = None
        if self._stderr_path is not None:
            try:
                os.unlink(self._stderr_path)
            except OSError:
                pass
            self._stderr_path = None

    # -- calls ------------------------------------------------------------------------------------
    def call(self, arg: Any, *, label: str, timeout: float | None = None) -> Any:
        """``target(arg)`` in the child; its exception is raised here as it was raised there.

        The child dying (a signal, an exit) raises ResizeError("worker_crashed", "<SIGNAL> while
        resizing <label>"); no answer within ``timeout`` seconds kills the child and raises
        ResizeError("worker_timeout", ...). Either way the next call gets a fresh child.
        """
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            self._ensure_started()
            conn, proc = self._conn, self._proc
            assert conn is not None and proc is not None
            timed_out = False
            try:
                conn.send((arg, label))
                ready = wait([conn, proc.sentinel], timeout)
                timed_out = not ready
                if conn in ready or conn.poll():
                    kind, payload = conn.recv()
                    if kind == "ok":
                        return payload
                    raise _unpack(payload)
            except (EOFError, BrokenPipeError, ConnectionResetError):
                pass  # the child is gone: reported below
            if timed_out:
                proc.kill()
                proc.join(5)
                self._stop()
                raise ResizeError("worker_timeout", f"no answer after {timeout:g} s while resizing {label}")
            died = self._death()
            tail = self._stderr_tail()
            self._stop()
            log.debug("resize child %s died (%s) on %s; its stderr ends with:\n%s", proc.pid, died, label, tail)
            raise ResizeError("worker_crashed", f"{died} while resizing {label}")

    def _death(self) -> str:
        """SIGSEGV, SIGKILL... or 'exit code N' for the child that just ended."""
        proc = self._proc
        if proc is None:
            return "no child"
        proc.join(5)
        code = proc.exitcode
        if code is None:
            return "child alive but not answering"
        if code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    def _stderr_tail(self) -> str:
        if self._stderr_path is None:
            return "(inherited; see above)"
        try:
            with open(self._stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(unreadable: {exc})"


class SandboxPool:
    """``size`` sandboxes behind futures: each call runs in whichever child is free.

    A crash costs one child (restarted on its next call); the other children and their frames go on.
    """

    def __init__(self, size: int, target: str, *, initializer: str | None = None,
                 initargs: tuple[Any, ...] = (), timeout: float | None = None) -> None:
        self.boxes = [Sandbox(target, initializer=initializer, initargs=initargs, timeout=timeout)
                      for _ in range(size)]
        self._free: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        for box in self.boxes:
            self._free.put(box)
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="resize-sandbox")

    def start(self) -> None:
        """Start every child now, in parallel."""
        for f in [self._threads.submit(box.start) for box in self.boxes]:
            f.result()

    def submit(self, arg: Any, *, label: str) -> Future[Any]:
        return self._threads.submit(self._run, arg, label)

    def _run(self, arg: Any, label: str) -> Any:
        box = self._free.get()  # never waits: one thread per box
        try:
            return box.call(arg, label=label)
        finally:
            self._free.put(box)

    @property
    def starts(self) -> int:
        return sum(b.starts for b in self.boxes)

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for box in self.boxes:
            box.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared: Sandbox | None = None
_shared_lock = threading.Lock()


def shared_sandbox() -> Sandbox:
    """The process's resident sandbox for resize.frame.resize_file (started on first use, stopped
    at exit), so a loop of resize_file calls pays for one child, not one per file."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Sandbox("resize.frame:resize_path")
            atexit.register(_shared.close)
        return _shared


# -- the child ---------------------------------------------------------------------------------
def _child_main(conn: Connection, target: str, initializer: str | None, initargs: tuple[Any, ...],
                log_level: int, stderr_path: str | None) -> None:
    if stderr_path is not None:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 2)  # native writes (GLib, libjpeg) go there too, not only Python's
        os.close(fd)
    faulthandler.enable()  # a native crash leaves the child's Python stack on its stderr
    vips_log = logging.getLogger("pyvips")
    vips_log.setLevel(log_level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s (resize child): %(message)s"))
    vips_log.addHandler(handler)
    vips_log.propagate = False
    try:
        fn = _resolve(target)
        if initializer:
            _resolve(initializer)(*initargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("init_failed", _pack(exc)))
        return
    conn.send(("ready", os.getpid()))
    marker = os.environ.get(CRASH_ENV)
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            return
        if msg is None:
            return
        arg, label = msg
        if marker and marker in label:
            os.kill(os.getpid(), signal.SIGSEGV)  # tests only: a real native-style death
        try:
            reply: tuple[str, Any] = ("ok", fn(arg))
        except BaseException as exc:  # noqa: BLE001 - every error belongs to the caller
            reply = ("err", _pack(exc))
        conn.send(reply)


def _resolve(name: str) -> Any:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def _pack(exc: BaseException) -> tuple[Any, ...]:
    """An exception as something that survives pickling (ReasonedError's args do not rebuild it)."""
    if isinstance(exc, ReasonedError):
        return ("reasoned", type(exc), exc.reason, exc.detail)
    try:
        pickle.loads(pickle.dumps(exc))
        return ("pickled", exc, "".join(traceback.format_exception(exc)))
    except Exception:  # noqa: BLE001 - unpicklable: keep its text
        return ("text", f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc)))


def _unpack(packed: tuple[Any, ...]) -> BaseException:
    kind = packed[0]
    if kind == "reasoned":
        _, cls, reason, detail = packed
        return cls(reason, detail)  # type: ignore[no-any-return]
    if kind == "pickled":
        log.debug("resize child raised:\n%s", packed[2])
        return packed[1]  # type: ignore[no-any-return]
    log.debug("resize child raised:\n%s", packed[2])
    return RuntimeError(packed[1])
