"""The one retry policy: capped exponential backoff with full jitter, driven by `retriable`.

Each operation retries at exactly one level: a single S3 call in the store, a whole object copy in
the copy engine (its calls are not retried again inside it), a batch in the consume loop only while
a dependency is unavailable. An error whose `retriable` is False is never retried.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from xdc.errors import XdcError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # calls in all, the first included
    base_s: float = 0.1
    cap_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based): capped exponential,
        jittered over its upper half so that waits still grow."""
        top = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        return random.uniform(top / 2, top)

    def call(self, fn: Callable[[], T], *, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
        """fn(), retrying XdcErrors whose `retriable` is set; the last error is raised as it is."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except XdcError as exc:
                if not exc.retriable or attempt == self.max_attempts:
                    raise
                delay = self.delay(attempt)
                log.warning("%s: %s; retry %d/%d in %.2fs", what, exc, attempt, self.max_attempts - 1, delay)
                sleep(delay)
        raise AssertionError("unreachable")

    async def acall(self, fn: Callable[[], Awaitable[T]], *, what: str) -> T:
        """The same policy for a coroutine (the async copy engine): `await fn()`, retried alike."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await fn()
            except XdcError as exc:
                if not exc.retriable or attempt == self.max_attempts:
                    raise
                delay = self.delay(attempt)
                log.warning("%s: %s; retry %d/%d in %.2fs", what, exc, attempt, self.max_attempts - 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


NO_RETRY = RetryPolicy(max_attempts=1)
