"""Answering a retry whose original answer is not known (producer state rebuilt from
the log): worked out from the dedup window only where that is exact."""

from __future__ import annotations

from streamd.broker.append_plan import _rebuilt_answer
from streamd.broker.dedup import DedupWindow
from streamd.broker.producer_state import BatchMeta

DAY = 86_400_000


def window(*stored: tuple[str, int]) -> DedupWindow:
    w = DedupWindow(DAY)
    for key, offset in stored:
        w.add([key], offset, append_time_ms=0)
    return w


# "a" stored at 0; then the batch [b, a, c]: b at 1, a dropped (answered 0), c at 2.
REBUILT = BatchMeta(1, 2, 1, 2, 0, None)


def test_the_window_tells_which_records_were_dropped_and_where_they_went():
    assert _rebuilt_answer(window(("a", 0), ("b", 1), ("c", 2)), ["b", "a", "c"], REBUILT) == ((1, 0),)
    # keyless records are always stored; the first of equal keys in a batch wins
    assert _rebuilt_answer(window(("x", 4)), ["", "x", "x"], BatchMeta(1, 2, 3, 2, 0, None)) == ((2, 4),)
    # every record dropped: nothing of the batch is in the log
    assert _rebuilt_answer(window(("a", 0), ("c", 2)), ["c", "a"], BatchMeta(3, 2, 3, 0, 0, None)) == ((0, 2), (1, 0))


def test_without_the_keys_it_needs_the_window_cannot_tell():
    # "a" forgotten: taking it for stored would shift c and call c dropped
    assert _rebuilt_answer(window(("b", 1), ("c", 2)), ["b", "a", "c"], REBUILT) is None
    # "a" stored again since (after the window): 5 is not what the first answer said
    assert _rebuilt_answer(window(("b", 1), ("c", 2), ("a", 5)), ["b", "a", "c"], REBUILT) is None
    # a stored record's key forgotten: cannot confirm it was stored
    assert _rebuilt_answer(window(("a", 0), ("c", 2)), ["b", "a", "c"], REBUILT) is None
    assert _rebuilt_answer(None, ["b", "a", "c"], REBUILT) is None
    assert _rebuilt_answer(window(("a", 0)), None, REBUILT) is None
