"""Multipart ETags and part layouts (pure): expected ETags from hashlib directly, layouts checked
against the definition (every part but the last the same size, N parts in all)."""
from __future__ import annotations

import asyncio
import hashlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from xdc.io.parts import (
    MB,
    MIB,
    LayoutHasher,
    candidate_part_sizes,
    multipart_etag,
    part_size_range,
    parts_in_etag,
    plain_md5_etag,
    uniform_layout,
)
from xdc.io.s3copy import _ByteBudget


def s3_etag(parts: list[bytes]) -> str:
    return hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f"-{len(parts)}"


def test_etag_forms() -> None:
    assert parts_in_etag("0" * 32 + "-3") == 3 and parts_in_etag('"' + "a" * 32 + '-12"') == 12
    assert parts_in_etag("0" * 32) is None and parts_in_etag("e") is None and parts_in_etag("x" * 32 + "-2") is None
    assert plain_md5_etag("0" * 32) and not plain_md5_etag("0" * 32 + "-2") and not plain_md5_etag("A" * 31)
    parts = [os.urandom(100), os.urandom(50)]
    assert multipart_etag(hashlib.md5(p).digest() for p in parts) == s3_etag(parts)


@given(size=st.integers(1, 10**12), parts=st.integers(1, 10_000))
@settings(max_examples=500)
def test_part_size_range_gives_exactly_n_parts(size: int, parts: int) -> None:
    rng = part_size_range(size, parts)
    if rng is None:  # no uniform layout: check that none exists around the bound
        p = -(-size // parts)
        assert len(uniform_layout(size, p)) != parts
        return
    lo, hi = rng
    for p in {lo, hi, (lo + hi) // 2}:
        assert len(uniform_layout(size, p)) == parts, (size, parts, p)
    assert len(uniform_layout(size, hi + 1)) != parts or parts == 1
    if lo > 1:
        assert len(uniform_layout(size, lo - 1)) != parts


def test_candidates_prefer_what_writers_use() -> None:
    # 13 MiB in 3 parts: boto3's 8 MiB does not fit, rclone's 5 MiB does and comes first
    assert candidate_part_sizes(13 * MIB, 3)[0] == 5 * MIB
    # 1 GiB in 128 parts: only 8 MiB fits among round sizes
    assert candidate_part_sizes(2**30, 128) == [8 * MIB]
    # what worked before for this bucket comes first, if it fits
    assert candidate_part_sizes(15 * MIB, 3, preferred=[6 * MIB])[0] == 6 * MIB
    assert candidate_part_sizes(15 * MIB, 3, preferred=[9 * MIB])[0] == 5 * MIB
    # decimal MB sizes too (some tools use 5 MB, 10 MB)
    assert 10 * MB in candidate_part_sizes(10 * MB * 4 + 123, 5, limit=8)
    assert candidate_part_sizes(100, 200) == [] and candidate_part_sizes(5 * MIB, 1) == [5 * MIB]
    for size, n in ((13 * MIB, 3), (2**30 + 5, 129), (50 * MB * 7 - 1, 7)):
        for p in candidate_part_sizes(size, n, limit=10):
            assert len(uniform_layout(size, p)) == n


@given(data=st.binary(min_size=0, max_size=5000), part=st.integers(1, 700), cut=st.integers(1, 900))
@settings(max_examples=200)
def test_layout_hasher_matches_s3s_etag_whatever_the_feeding(data: bytes, part: int, cut: int) -> None:
    if not data:
        return
    layout = uniform_layout(len(data), part)
    h = LayoutHasher(layout)
    for i in range(0, len(data), cut):  # fed in pieces that do not follow the part boundaries
        h.feed(data[i:i + cut])
    expected = s3_etag([data[i:i + part] for i in range(0, len(data), part)])
    assert h.etag() == expected
    short = LayoutHasher(layout)
    short.feed(data[:-1])
    assert short.etag() is None


def test_byte_budget_is_fifo_and_bounded() -> None:
    async def run() -> list[str]:
        b = _ByteBudget(10)
        order: list[str] = []
        held = await b.acquire(6)

        async def want(name: str, n: int) -> None:
            got = await b.acquire(n)
            order.append(name)
            await asyncio.sleep(0.01)
            b.release(got)
        tasks = [asyncio.create_task(want("big", 8)), asyncio.create_task(want("small", 2))]
        await asyncio.sleep(0.01)
        assert order == []  # small would fit (4 free) but waits behind big: no starvation
        b.release(held)
        await asyncio.gather(*tasks)
        assert await b.acquire(50) == 10  # larger than the budget: waits for all of it, then runs alone
        assert b.free == 0
        return order
    assert asyncio.run(run()) == ["big", "small"]
