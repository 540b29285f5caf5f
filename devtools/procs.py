"""Processes the dev tools start: spawn, wait until ready, stop exactly what was started.

A `Proc` records the pid and the process's start time (from /proc), so a recycled pid is never
mistaken for ours; `stop_proc` stops only a process that is still the one recorded.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdc.errors import XdcError


class StackError(XdcError):
    pass


@dataclass
class Proc:
    name: str
    pid: int
    start_ticks: int  # /proc/PID/stat starttime: guards against pid reuse
    cmd: list[str]
    log: str
    port: int | None = None
    ready_s: float | None = None  # start to ready, for the start-up report
    stop_cmd: list[str] | None = None  # how to stop it cleanly (else SIGTERM to its process group)
    owned_dir: str | None = None  # a directory outside the run dir that it owns: removed once stopped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def alive(p: Proc) -> bool:
    if p.start_ticks == -1 or start_ticks(p.pid) != p.start_ticks:
        return False
    try:  # a zombie child of ours still has a /proc entry: reap it and call it dead
        state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def spawn(name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
           port: int | None = None) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    return Proc(name, proc.pid, start_ticks(proc.pid), cmd, str(log_path), port)


def wait_ready(check: Any, what: str, proc: Proc | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not alive(proc):
            tail = Path(proc.log).read_text(errors="replace")[-2000:] if Path(proc.log).exists() else ""
            raise StackError(f"{what} exited during start-up; log {proc.log}:\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise StackError(f"{what} not ready after {timeout:.0f}s")


def tcp_ready(port: int, host: str = "127.0.0.1") -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback only
        return r.status == 200


def stop_proc(p: Proc, timeout: float = 10.0) -> None:
    try:
        _stop(p, timeout)
    finally:
        if p.owned_dir and not alive(p):
            shutil.rmtree(p.owned_dir, ignore_errors=True)


def _stop(p: Proc, timeout: float) -> None:
    if not alive(p):
        return
    if p.stop_cmd:
        subprocess.run(p.stop_cmd, capture_output=True, timeout=timeout + 5, stdin=subprocess.DEVNULL)
        if not alive(p):
            return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(p):
        time.sleep(0.05)
    if alive(p):
        os.killpg(p.pid, signal.SIGKILL)
    try:  # reap it if it is our child
        os.waitpid(p.pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_groups(procs: list[subprocess.Popen[bytes]], sig: int = signal.SIGINT, grace_s: float = 30.0) -> None:
    """Stop child processes started with start_new_session (each its own group): `sig` to every
    group still running, then SIGKILL a group that outlives `grace_s`."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, sig)
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (its /proc status), for the start-up report."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def kill_proc(p: Proc) -> None:
    """SIGKILL a process this stack started (its whole group) and wait until it is gone."""
    if not alive(p):
        return
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(p):
        time.sleep(0.02)
    try:
        os.waitpid(p.pid, os.WNOHANG)
    except ChildProcessError:
        pass
