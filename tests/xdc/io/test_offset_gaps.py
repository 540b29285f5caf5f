"""The offset-gap rule (pure): committed offset vs log start and end, per partition."""
from __future__ import annotations

from xdc.io.offset_gaps import OffsetGap, find_gaps

T = "events"


def test_committed_behind_the_log_start_is_a_gap_of_the_difference() -> None:
    gaps = find_gaps({(T, 0): 10}, {(T, 0): 40}, {(T, 0): 55})
    assert gaps == [OffsetGap(T, 0, 10, 40, 55, 30)]
    assert gaps[0].resume_at == 40


def test_committed_at_or_after_the_log_start_is_no_gap() -> None:
    assert find_gaps({(T, 0): 40, (T, 1): 50, (T, 2): 7}, {(T, 0): 40, (T, 1): 40, (T, 2): 7},
                     {(T, 0): 55, (T, 1): 55, (T, 2): 7}) == []


def test_no_committed_offset_and_a_log_from_zero_is_no_gap_even_with_data() -> None:
    # a new group reads the whole log from its first record (earliest): it misses nothing
    assert find_gaps({}, {(T, 0): 0}, {(T, 0): 1000}) == []
    assert find_gaps({(T, 1): None}, {(T, 1): 0}, {(T, 1): 0}) == []


def test_no_committed_offset_on_a_log_that_no_longer_starts_at_zero_is_a_gap() -> None:
    assert find_gaps({(T, 0): None}, {(T, 0): 12}, {(T, 0): 20}) == [OffsetGap(T, 0, None, 12, 20, 12)]
    # everything expired: the log is empty, but 12 events went unseen
    assert find_gaps({}, {(T, 0): 12}, {(T, 0): 12}) == [OffsetGap(T, 0, None, 12, 12, 12)]


def test_committed_beyond_the_log_end_means_the_log_was_made_again_and_the_loss_is_unknown() -> None:
    assert find_gaps({(T, 0): 900}, {(T, 0): 0}, {(T, 0): 30}) == [OffsetGap(T, 0, 900, 0, 30, None)]


def test_gaps_come_in_partition_order_and_only_for_the_partitions_asked() -> None:
    got = find_gaps({(T, 2): 1, (T, 0): 1, ("other", 0): 0}, {(T, 2): 5, (T, 0): 3, (T, 1): 0},
                    {(T, 2): 5, (T, 0): 3, (T, 1): 0})
    assert [(g.topic, g.partition, g.lost) for g in got] == [(T, 0, 2), (T, 2, 4)]
