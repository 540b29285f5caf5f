"""One walker over two key-sorted listings (rclone's march): scan and verify both use it."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")


def march(left: Iterable[A], right: Iterable[B], left_key: Callable[[A], str],
          right_key: Callable[[B], str]) -> Iterator[tuple[A | None, B | None]]:
    """Yield (a, b) pairs in key order: (a, None) left only, (None, b) right only, (a, b) both.

    Both inputs must be sorted by the same byte order (S3 lists in UTF-8 binary order; SQLite's
    default BINARY collation on UTF-8 text is the same).
    """
    li, ri = iter(left), iter(right)
    a = next(li, None)
    b = next(ri, None)
    while a is not None or b is not None:
        if b is None:
            yield a, None
            a = next(li, None)
        elif a is None:
            yield None, b
            b = next(ri, None)
        else:
            ka, kb = left_key(a).encode(), right_key(b).encode()
            if ka == kb:
                yield a, b
                a, b = next(li, None), next(ri, None)
            elif ka < kb:
                yield a, None
                a = next(li, None)
            else:
                yield None, b
                b = next(ri, None)
