"""Offset gaps: events a consumer group will never read because the log lost them first.

The rule, per assigned partition, from the group's committed offset C (None: the group has none),
the log start offset S (the oldest record still held) and the log end offset E:

- C < S: retention (or DeleteRecords) removed records [C, S) before the group read them: a gap
  of S - C records.
- C > E: the log is shorter than where the group stopped (the topic was deleted and made again,
  or truncated): what the group had not read of the old log is unknown: a gap, lost unknown.
- C is None and S > 0: the group never committed here (a new group, or one whose offsets
  expired: `offsets.retention.minutes`) and the log no longer starts at 0: the S records before
  the start are gone for it: a gap of S records.
- C is None and S == 0: the group reads the whole log from its first record (consumers start at
  `earliest`), so nothing is lost, even if the log already holds data: no gap.
- otherwise (S <= C <= E): no gap.

Offsets of compacted or transactional topics are not one per event, so `lost` counts offsets;
it is an upper bound of the events lost. Where a gap is found the group resumes at S.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

Partition = tuple[str, int]  # topic, partition


@dataclass(frozen=True)
class OffsetGap:
    topic: str
    partition: int
    committed: int | None  # None: the group had no committed offset
    log_start: int
    log_end: int
    lost: int | None  # offsets removed unread (None: unknown)

    @property
    def resume_at(self) -> int:
        """Where the group reads on: the oldest record still held."""
        return self.log_start


def find_gaps(committed: Mapping[Partition, int | None], starts: Mapping[Partition, int],
              ends: Mapping[Partition, int]) -> list[OffsetGap]:
    """The gaps of the partitions in `starts` (see the module's rule), in partition order."""
    gaps = []
    for (topic, part), start in sorted(starts.items()):
        c = committed.get((topic, part))
        end = ends.get((topic, part), start)
        if c is None:
            lost: int | None = start  # 0 when the log still starts at its first record
        elif c < start:
            lost = start - c
        elif c > end:
            lost = None
        else:
            lost = 0
        if lost != 0:
            gaps.append(OffsetGap(topic, part, c, start, end, lost))
    return gaps
