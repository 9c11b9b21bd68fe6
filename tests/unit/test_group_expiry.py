"""Offsets of groups without members expire after the group retention."""

from __future__ import annotations

import asyncio

from consumer_groups.coordinator import Coordinator
from consumer_groups.expiry import expire_groups
from consumer_groups.offsets import OffsetStore
from streamd.testing import FakeClock

DAY = 24 * 3600 * 1000


def test_offsets_of_an_empty_group_expire_after_the_retention(tmp_path):
    async def scenario() -> None:
        clock = FakeClock()
        store = OffsetStore(tmp_path, clock=clock)
        coordinator = Coordinator(clock=clock, partition_count=lambda t: 1)
        started = clock.now_ms()
        await store.commit("idle", {("t", 0): (5, "")})
        await store.commit("busy", {("t", 0): (7, "")})
        member = coordinator.join("busy", ["t"])
        clock.advance(DAY)
        await expire_groups(coordinator, store, retention_ms=2 * DAY, started_ms=started)
        assert store.groups() == ["busy", "idle"]
        clock.advance(DAY + 1)
        await expire_groups(coordinator, store, retention_ms=2 * DAY, started_ms=started)
        assert store.groups() == ["busy"]  # a group with members never expires
        coordinator.leave(member)  # empty from now: the retention counts from here
        clock.advance(2 * DAY)
        await expire_groups(coordinator, store, retention_ms=2 * DAY, started_ms=started)
        assert store.groups() == ["busy"]
        clock.advance(1)
        await expire_groups(coordinator, store, retention_ms=2 * DAY, started_ms=started)
        assert store.groups() == []
        await store.close()

    asyncio.run(scenario())


def test_undo_only_groups_expire_and_groups_that_never_committed_are_forgotten(tmp_path):
    async def scenario() -> None:
        clock = FakeClock()
        store = OffsetStore(tmp_path, clock=clock)
        coordinator = Coordinator(clock=clock, partition_count=lambda t: 1)
        await store.save_undo("undone", {("t", 0): -1})
        for i in range(3):
            coordinator.leave(coordinator.join(f"brief-{i}", ["t"]))
        assert len(coordinator.empty_since_ms) == 3
        clock.advance(2 * DAY + 1)
        await expire_groups(coordinator, store, retention_ms=2 * DAY, started_ms=0)
        assert store.undo_groups() == [] and coordinator.empty_since_ms == {}
        await store.close()

    asyncio.run(scenario())
