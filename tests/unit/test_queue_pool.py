"""How much the one worker pool of both queue receivers (``_pools.Pool``) asks a
receive for: a batch per idle thread (so a stuck handler leases no more than its own
batch), one receive's worth ahead of the tasks, never more than ``max_messages`` still
needs, what at-most-once handlers run in ``hold_s``; nothing once stopping."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from streamd.client._message import Message
from streamd.client._pools import Pool
from streamd.client._runners import TaskRunner, ThreadRunner
from streamd.v1 import streamd_pb2 as pb


class Receiver:
    group, topic = "g", "t"

    def __init__(self, max_records: int) -> None:
        self.max_records = max_records


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make(loop, runner, max_records: int, max_messages: int | None = None) -> Pool:
    return Pool(Receiver(max_records), runner, loop=loop, owner=None, stop=None, auto_extend=False,  # type: ignore[arg-type]
                max_messages=max_messages)


def hold(pool: Pool, n: int, lease_id: int = 7) -> None:
    pool.waiting.extend(Message("t", 0, i, pb.Record(), 0, 1, lease_id, 0, None, 1e18, 30.0) for i in range(n))


def run(pool: Pool, slots: int) -> None:
    for slot in range(slots):
        assert pool.take(slot) is not None


def test_threads_get_a_batch_each_and_a_stuck_one_leases_no_more(loop):
    one = make(loop, ThreadRunner(print, 1), max_records=5)
    assert one._room() == 5
    hold(one, 3)
    run(one, 1)  # its handler runs (and may never return) with 2 behind it
    assert one._room() == 0
    four = make(loop, ThreadRunner(print, 4), max_records=100)
    assert four._room() == 100  # per receive; four receives may be in flight
    hold(four, 150)  # two batches' worth of work
    run(four, 1)
    assert four._room() == 100  # one more thread has nothing to do
    run(four, 3)
    assert four._room() == 0  # every thread busy, a batch held


def test_tasks_hold_one_receive_ahead_of_their_handlers(loop):
    pool = make(loop, TaskRunner(None, 2), max_records=4)  # type: ignore[arg-type]
    assert pool._room() == 2
    hold(pool, 2)
    run(pool, 2)
    assert pool._room() == 2  # both running: the next two wait for a slot
    hold(pool, 2)
    assert pool._room() == 0


def test_a_short_run_asks_for_no_more_than_it_still_needs(loop):
    pool = make(loop, ThreadRunner(print, 4), max_records=100, max_messages=3)
    assert pool._room() == 3
    hold(pool, 2)
    assert pool._room() == 1
    pool.done = 1
    assert pool._room() == 0


def test_at_most_once_handlers_get_what_they_run_in_the_hold_time(loop):
    pool = make(loop, ThreadRunner(print, 2), max_records=100)
    pool.at_most_once, pool.hold_s = True, 1.0
    assert pool._room() == 2  # one each until timed
    pool.per_record_s = 0.1
    assert pool._room() == 20
    hold(pool, 10, lease_id=0)
    run(pool, 1)
    assert pool._room() == 0  # one handler busy, the other's ten held


def test_a_stopping_pool_asks_for_nothing_and_takes_only_at_most_once_records(loop):
    pool = make(loop, ThreadRunner(print, 2), max_records=10)
    hold(pool, 2)
    pool.stopping = True
    assert pool._room() is None
    assert pool.take(0) is None  # left for the hand-back
    pool.at_most_once = True
    assert pool.take(0) is not None  # acked already: run, not handed back
    pool.gave_up = True
    assert pool.take(1) is None
