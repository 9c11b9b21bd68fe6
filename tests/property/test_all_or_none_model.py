"""``PartitionLog.append_batches`` and ``undo_appends`` against the list model of
``test_log_model``: a request's batches are stored all together, and taken back all
together (also across a roll, after a flush, before a crash), leaving the log as if
they had never been appended."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test

from segments.batch import HEADER_SIZE

from .test_log_model import LogModel

BATCHES = st.lists(st.tuples(st.integers(0, 150), st.integers(1, 4)), min_size=1, max_size=4)


class AllOrNoneModel(LogModel):
    def _bodies(self, batches: list[tuple[int, int]]) -> list[tuple[bytes, int]]:
        return [(bytes([97 + (len(self.batches) + i) % 26]) * size, count) for i, (size, count) in enumerate(batches)]

    @rule(batches=BATCHES, dt=st.one_of(st.just(0), st.integers(-20, 400)))
    def append_batches(self, batches, dt):
        bodies = self._bodies(batches)
        infos = self.log.append_batches(bodies, append_time_ms=self.last_time + dt)
        expected_time = max(self.last_time, self.last_time + dt)
        for info, (body, count) in zip(infos, bodies, strict=True):
            assert info == (self.log_end, expected_time, HEADER_SIZE + len(body))
            self.batches.append((info.base_offset, count, expected_time, body))
        self.last_time = expected_time

    @rule(batches=BATCHES, dt=st.integers(0, 400), flush=st.booleans())
    def append_then_undo(self, batches, dt, flush):
        start = self.log_end
        self.log.append_batches(self._bodies(batches), append_time_ms=self.last_time + dt)
        if flush:  # what a concurrent flush may have synced is taken back too
            self.log.flush()
        self.log.undo_appends(start)  # the model is left as it was, its last time included
        assert self.log.log_end_offset == start and self.log.flushed_offset <= start


    # An undo can leave an empty segment after a roll (as a roll with nothing appended
    # yet), so retention can take every batch; a reopened log then knows no last
    # append time (nothing left is older than what comes next).
    @rule()
    def reopen(self):
        super().reopen()
        if not self.batches:
            self.last_time = 0

    @rule(checkpoint=st.booleans())
    def crash_and_reopen(self, checkpoint):
        super().crash_and_reopen(checkpoint)
        if not self.batches:
            self.last_time = 0


def test_append_batches_and_undo_match_the_list_model(tmp_path):
    AllOrNoneModel.directory = tmp_path
    AllOrNoneModel.counter = itertools.count()
    run_state_machine_as_test(
        AllOrNoneModel,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None, database=None),
    )
