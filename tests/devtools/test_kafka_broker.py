"""The local stack's Apache Kafka broker: durable across kill -9, and a clear error without jars."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from devtools import kafka_broker, stack
from xdc.io.kafka import (
    TopicPartition,
    commit,
    ensure_topics,
    group_offsets,
    make_consumer,
    make_producer,
    next_offsets,
    to_records,
)


def _read_all(bootstrap: list[str], topic: str, parts: int) -> list[tuple[int, int, bytes, bytes]]:
    c = make_consumer(bootstrap, None)
    try:
        tps = [TopicPartition(topic, p) for p in range(parts)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        out = []
        for _ in range(100):
            if all(c.position(tp) >= ends[tp] for tp in tps):
                break
            out += [(r.partition, r.offset, r.key, r.value) for r in to_records(c.poll(timeout_ms=300))]
        return sorted(out)
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.servers  # starts its own
def test_committed_offsets_and_messages_survive_kill9_restart(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = stack.start_broker(run, "T")
    stack.StackState(str(run), [proc]).save()  # so restart_broker and down know it
    try:
        boot = [f"127.0.0.1:{proc.port}"]
        topic, group, parts = "durable", "durable-group", 3
        ensure_topics(boot, [topic], parts)
        sent = [(f"k{i}".encode(), f"v{i}-".encode() * 20) for i in range(300)]
        p = make_producer(boot)
        for k, v in sent:
            p.send(topic, key=k, value=v)
        p.flush(timeout=30)
        p.close(timeout=5)
        c = make_consumer(boot, group, [topic])
        got = []
        for _ in range(100):  # consume about half of it, commit exactly that
            got += to_records(c.poll(timeout_ms=500, max_records=50))
            if len(got) >= 150:
                break
        commit(c, next_offsets(got))
        c.close(autocommit=False)
        before_msgs = _read_all(boot, topic, parts)
        before_committed = group_offsets(boot, group)
        assert sorted((k, v) for _, _, k, v in before_msgs) == sorted(sent)
        assert sum(before_committed.values()) == len(got) >= 150

        new = stack.restart_broker(run, "T", hard=True)
        assert new.pid != proc.pid and new.port == proc.port
        log_text = Path(proc.log).read_text(errors="replace")
        assert "Terminating process due to signal" not in log_text  # SIGKILL: no clean shutdown ran
        assert log_text.count(kafka_broker.STARTED_LINE) == 2

        assert group_offsets(boot, group) == before_committed
        assert _read_all(boot, topic, parts) == before_msgs  # same offsets, keys and bytes
        # the group resumes exactly after what it committed: the other messages, once each
        c = make_consumer(boot, group, [topic])
        rest = []
        for _ in range(100):
            rest += to_records(c.poll(timeout_ms=500))
            if len(got) + len(rest) >= len(sent):
                break
        c.close(autocommit=False)
        assert sorted((r.key, r.value) for r in got + rest) == sorted(sent)
        print(f"\nbroker ready in {proc.ready_s:.1f}s (incl. format), after kill -9 in {new.ready_s:.1f}s; "
              f"RSS {stack.rss_mib(new.pid):.0f} MiB")
    finally:
        stack.down(run)


def test_missing_jars_and_no_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDC_KAFKA_JARS", str(tmp_path / "jars"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = shutil.which("java")
    assert java, "set-up installs a JDK"
    (bin_dir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bin_dir))  # java, but no mvn
    with pytest.raises(kafka_broker.KafkaBrokerError, match=r"no `mvn`.*scripts/setup.sh"):
        kafka_broker.ensure_jars()
