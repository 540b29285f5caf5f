"""resize.sandbox: a child that dies costs one call, named by its signal; the caller lives on.

The crashes are real: the child kills itself with SIGSEGV (XDC_TEST_RESIZE_SEGV) or os._exit.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from resize.sandbox import CRASH_ENV, Sandbox, SandboxPool
from xdc.errors import ConfigError, ResizeError, TransientStoreError

HERE = "tests.resize.test_sandbox"


# -- targets, run in the child ------------------------------------------------------------------
def work(arg: Any) -> Any:
    kind, value = arg
    if kind == "echo":
        return (os.getpid(), value)
    if kind == "raise_resize":
        raise ResizeError("corrupt", value)
    if kind == "raise_store":
        raise TransientStoreError(value)
    if kind == "raise_value":
        raise ValueError(value)
    if kind == "exit":
        os._exit(value)
    if kind == "signal":
        os.kill(os.getpid(), value)
    if kind == "sleep":
        time.sleep(value)
        return "woke"
    raise AssertionError(kind)


def init_config_error() -> None:
    raise ConfigError("no such bucket")


def init_bug() -> None:
    raise ImportError("module gone")


# -- tests --------------------------------------------------------------------------------------
@pytest.fixture
def box() -> Any:
    with Sandbox(f"{HERE}:work") as b:
        yield b


def test_results_and_errors_come_back_as_raised(box: Sandbox) -> None:
    pid, value = box.call(("echo", b"x" * 5_000_000), label="big")  # 5 MB each way
    assert pid != os.getpid() and value == b"x" * 5_000_000
    with pytest.raises(ResizeError) as info:
        box.call(("raise_resize", "bad huffman table"), label="f")
    assert (info.value.reason, info.value.detail) == ("corrupt", "bad huffman table")
    with pytest.raises(TransientStoreError, match="slow down"):
        box.call(("raise_store", "slow down"), label="f")
    with pytest.raises(ValueError, match="nope"):
        box.call(("raise_value", "nope"), label="f")
    assert box.call(("echo", 1), label="f")[0] == pid  # errors do not cost the child
    assert box.starts == 1


def test_a_real_sigsegv_is_named_and_the_next_call_gets_a_new_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CRASH_ENV, "boom-marker")
    with Sandbox(f"{HERE}:work") as box:
        first, _ = box.call(("echo", 0), label="frames/ok.jpg")
        with pytest.raises(ResizeError) as info:
            box.call(("echo", 0), label="frames/boom-marker.jpg")
        assert info.value.reason == "worker_crashed"
        assert info.value.detail == "SIGSEGV while resizing frames/boom-marker.jpg"
        second, _ = box.call(("echo", 0), label="frames/ok2.jpg")
        assert second != first and box.starts == 2
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # the crashed child is gone, not left behind


@pytest.mark.parametrize(("arg", "detail"), [(("signal", signal.SIGABRT), "SIGABRT while resizing f"),
                                             (("signal", signal.SIGKILL), "SIGKILL while resizing f"),
                                             (("exit", 3), "exit code 3 while resizing f")])
def test_other_deaths(box: Sandbox, arg: tuple[str, int], detail: str) -> None:
    with pytest.raises(ResizeError) as info:
        box.call(arg, label="f")
    assert (info.value.reason, info.value.detail) == ("worker_crashed", detail)
    assert box.call(("echo", 1), label="g")[1] == 1


def test_a_silent_child_is_killed_after_the_timeout(box: Sandbox) -> None:
    pid = box.call(("echo", 0), label="f")[0]
    t = time.monotonic()
    with pytest.raises(ResizeError) as info:
        box.call(("sleep", 60), label="slow.jpg", timeout=1.0)
    assert time.monotonic() - t < 10
    assert (info.value.reason, info.value.detail) == ("worker_timeout", "no answer after 1 s while resizing slow.jpg")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert box.call(("sleep", 0), label="f") == "woke"


def test_initializer_errors() -> None:
    with Sandbox(f"{HERE}:work", initializer=f"{HERE}:init_config_error") as box:
        with pytest.raises(ConfigError, match="no such bucket"):
            box.call(("echo", 0), label="f")
    with Sandbox(f"{HERE}:work", initializer=f"{HERE}:init_bug") as box:
        with pytest.raises(ResizeError) as info:
            box.call(("echo", 0), label="f")
        assert info.value.reason == "worker_start_failed" and "module gone" in info.value.detail


def test_pool_charges_a_crash_to_its_call_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CRASH_ENV, "crash-me")
    labels = [f"b/frame{i}.jpg" for i in range(8)]
    labels[3] = "b/crash-me.jpg"
    with SandboxPool(2, f"{HERE}:work") as pool:
        futures = {label: pool.submit(("echo", label), label=label) for label in labels}
        done: dict[str, Any] = {}
        for label, f in futures.items():
            try:
                done[label] = f.result(timeout=120)[1]
            except ResizeError as exc:
                done[label] = (exc.reason, exc.detail)
        assert done.pop("b/crash-me.jpg") == ("worker_crashed", "SIGSEGV while resizing b/crash-me.jpg")
        assert done == {label: label for label in labels if label != "b/crash-me.jpg"}
        assert pool.submit(("echo", 9), label="after").result(timeout=120)[1] == 9
        pids = {b.call(("echo", 0), label="each")[0] for b in pool.boxes}
        assert len(pids) == 2 and pool.starts == 3  # two children, the crashed one replaced
