"""The same group scenarios against both flavours of the one engine: the blocking
``GroupConsumer`` and the asyncio ``AsyncGroupConsumer`` (driven from this thread
through a loop thread of the test's own). What must hold for both: across a
rebalance no commit skips a record and none moves back (only the record in hand is
read again), and ``close(leave=...)`` decides whether the partitions move at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from streamd.client import Admin, AsyncGroupConsumer, ConsumerRecord, GroupConsumer, Producer
from tests.conftest import wait_until

READ_TIMEOUT_S = 10.0
RECORDS, PER_BATCH = 15, 5  # per partition


class Blocking:
    """A GroupConsumer behind the driver's face."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.c = GroupConsumer(*args, **kwargs)

    def read(self, n: int) -> list[ConsumerRecord]:
        out: list[ConsumerRecord] = []
        for record in self.c.records(idle_timeout_s=READ_TIMEOUT_S):
            out.append(record)
            if len(out) >= n:
                break
        return out

    def poll(self) -> set[tuple[str, int]]:
        return self.c.poll_assignment()

    def wait(self) -> set[tuple[str, int]]:
        return self.c.wait_for_assignment()

    def commit(self) -> None:
        self.c.commit()

    def close(self, **kwargs: Any) -> None:
        self.c.close(**kwargs)

    @property
    def assigned(self) -> set[tuple[str, int]]:
        return set(self.c.assigned)


class Async:
    """An AsyncGroupConsumer on a loop thread of the test's own; every call waits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> AsyncGroupConsumer:
            return AsyncGroupConsumer(*args, **kwargs)

        self.c = self._run(make)

    def _run(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(60)

    def read(self, n: int) -> list[ConsumerRecord]:
        async def go() -> list[ConsumerRecord]:
            out: list[ConsumerRecord] = []
            async with contextlib.aclosing(self.c.records(idle_timeout_s=READ_TIMEOUT_S)) as records:
                async for record in records:
                    out.append(record)
                    if len(out) >= n:
                        break
            return out

        return self._run(go)

    def poll(self) -> set[tuple[str, int]]:
        return self._run(self.c.poll_assignment)

    def wait(self) -> set[tuple[str, int]]:
        return self._run(self.c.wait_for_assignment)

    def commit(self) -> None:
        self._run(self.c.commit)

    def close(self, **kwargs: Any) -> None:
        if self.loop.is_closed():
            return
        try:
            self._run(lambda: self.c.close(**kwargs))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    @property
    def assigned(self) -> set[tuple[str, int]]:
        return set(self.c.assigned)


FLAVOURS = [pytest.param(Blocking, id="GroupConsumer"), pytest.param(Async, id="AsyncGroupConsumer")]


def _produce(address: str, partitions: int, batches: int, per_batch: int) -> None:
    with Producer(address) as p:
        for b in range(batches):
            for part in range(partitions):
                p.send_batch("t", part, [f"{part}-{b}-{i}".encode() for i in range(per_batch)])


def _committed(admin: Admin) -> dict[tuple[str, int], int]:
    return {(o.topic, o.partition): o.offset for o in admin.fetch_offsets("g")}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_rebalance_neither_skips_nor_moves_back_a_commit(server, flavour):
    with Admin(server.address) as admin:
        admin.create_topic("t", 2)
        _produce(server.address, 2, batches=RECORDS // PER_BATCH, per_batch=PER_BATCH)
        revoked: list[set[tuple[str, int]]] = []
        first = flavour("g", "t", server.address, auto_commit_interval_ms=60_000, on_revoke=revoked.append)
        second = None
        try:
            assert first.wait() == {("t", 0), ("t", 1)}
            got = first.read(RECORDS + 2)  # leaves the loop holding a record of the second partition
            in_hand = got[-1]
            second = flavour("g", "t", server.address, auto_commit_interval_ms=60_000)
            assert wait_until(lambda: len(first.poll()) == 1 and len(second.poll()) == 1, timeout=20)
            (moved,) = revoked[0]
            committed = _committed(admin)
            # The revocation committed what the first member was done with on the moved
            # partition: its whole batches before the first record it did not finish
            # (the one in hand, or the next), never past it.
            finished = sum(1 for r in got[:-1] if (r.topic, r.partition) == moved)
            expected = finished // PER_BATCH * PER_BATCH
            assert committed[moved] == expected
            taken = second.read(RECORDS - expected)
            assert [(r.partition, r.offset) for r in taken] == [(moved[1], o) for o in range(expected, RECORDS)]
            second.commit()
            assert _committed(admin)[moved] == RECORDS
            assert all(o <= RECORDS for o in _committed(admin).values())
        finally:
            first.close()
            if second is not None:
                second.close()
        (kept,) = {("t", 0), ("t", 1)} - {moved}
        read_of_kept = [r.offset for r in got if (r.topic, r.partition) == kept]
        # Closing committed the kept partition up to the record in hand (or past all it read).
        assert _committed(admin)[kept] == (in_hand.offset if (in_hand.topic, in_hand.partition) == kept
                                           else max(read_of_kept) + 1)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("leave", [True, False])
def test_close_leaves_only_when_asked_and_commits_what_was_processed(server, flavour, leave):
    with Admin(server.address) as admin:
        admin.create_topic("t", 2)
        _produce(server.address, 2, batches=2, per_batch=5)
        a = flavour("g", "t", server.address, instance_id="a", session_timeout_ms=30_000)
        b = flavour("g", "t", server.address, instance_id="b", session_timeout_ms=30_000)
        try:
            assert wait_until(lambda: [len(a.poll()), len(b.poll())] == [1, 1], timeout=20)
            mine = a.assigned
            assert len(a.read(10)) == 10  # its whole partition, the last record in hand
            a.close(leave=leave)
            (tp,) = mine
            assert _committed(admin)[tp] == 9  # the record in hand is read again by the next owner
            members = {m.instance_id: m.connected for m in admin.describe_group("g").members}
            if leave:
                assert "a" not in members
                assert wait_until(lambda: len(b.poll()) == 2, timeout=20)
                assert [r.offset for r in b.read(11) if (r.topic, r.partition) == tp] == [9]
            else:
                assert members["a"] is False  # kept for its session timeout: no rebalance yet
                assert b.poll() == b.assigned and len(b.assigned) == 1
        finally:
            a.close()
            b.close(leave=True)
