"""xdc.io.kafka on the session stack's real broker: errors no retry can fix are not retried."""
from __future__ import annotations

import time

import pytest

from tests.support import brokers, produce
from xdc.config import XdcConfig
from xdc.errors import KafkaError
from xdc.io.kafka import kafka_errors, make_consumer


def test_refused_group_join_is_a_fatal_error_at_once(xcfg: XdcConfig, tag: str) -> None:
    topic = xcfg.dc("A").kafka.topics.events
    produce(xcfg, "A", topic, [(b"k", b"v")])
    # below the broker's group.min.session.timeout.ms (1000 in the local stack): the join is refused
    c = make_consumer(brokers(xcfg, "A"), f"{tag}-g", [topic], session_timeout_ms=500, heartbeat_interval_ms=100)
    t0 = time.monotonic()
    try:
        with pytest.raises(KafkaError, match="InvalidSessionTimeout") as err:
            for _ in range(20):
                with kafka_errors("poll"):
                    c.poll(timeout_ms=500)
    finally:
        c.close()
    assert not err.value.retriable and time.monotonic() - t0 < 10
