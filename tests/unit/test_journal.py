"""Journal: non-durable writes ride along without an fsync of their own; a callback
runs before compaction; replay on reopen."""

from __future__ import annotations

import asyncio
import os

from consumer_groups.journal import Journal


def test_lazy_writes_are_written_without_fsync_and_replayed(tmp_path, monkeypatch):
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))

    async def scenario() -> None:
        state: list[dict] = []
        journal = Journal(tmp_path / "j", apply=state.append, snapshot=lambda: [])
        fsyncs.clear()
        journal.write({"n": 1}, durable=False)
        journal.write({"n": 2}, durable=False)
        await asyncio.sleep(0.05)
        assert fsyncs == []  # written, not fsynced
        await journal.write({"n": 3}, then=lambda op: state.append(op) or "done")
        assert len(fsyncs) == 1 and state == [{"n": 3}]
        await journal.close()

    asyncio.run(scenario())
    replayed: list[dict] = []
    Journal(tmp_path / "j", apply=replayed.append, snapshot=lambda: [])
    assert replayed == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_compaction_snapshots_state_that_includes_the_flushed_writes(tmp_path):
    async def scenario() -> None:
        state: dict[str, int] = {}
        journal = Journal(
            tmp_path / "j", apply=lambda op: state.update(op), snapshot=lambda: [dict(state)], compact_bytes=256
        )
        for i in range(200):
            await journal.write({"k": i}, then=lambda op: state.update(op))
        assert journal.size < 1024
        await journal.close()

    asyncio.run(scenario())
    replayed: dict[str, int] = {}
    Journal(tmp_path / "j", apply=lambda op: replayed.update(op), snapshot=lambda: [])
    assert replayed == {"k": 199}


def test_queue_journal_ignores_operations_of_a_group_deleted_before_them(tmp_path):
    from consumer_groups.queue.store import QueueGroup, QueueStore
    from consumer_groups.queue.window import PartitionQueue, QueueConfig

    async def scenario() -> None:
        store = QueueStore(tmp_path)
        g = QueueGroup("g", "t", QueueConfig(), 0)
        g.partitions[0] = PartitionQueue(0, 0, g.config)
        await store.create(g)
        await store.delete(g)
        await store.settled(g, 0, [0], kind="d")  # a dead letter that finished after the delete
        other = QueueGroup("h", "t", QueueConfig(), 0)
        other.partitions[0] = PartitionQueue(0, 5, other.config)
        await store.create(other)
        await store.close()

    asyncio.run(scenario())
    reopened = QueueStore(tmp_path)
    assert list(reopened.groups) == [("h", "t")]  # recovery went past the orphan operation


def test_a_queue_group_saved_with_more_in_flight_than_the_limit_loads_at_the_limit():
    from consumer_groups.queue.store import config_from_dict, config_to_dict
    from consumer_groups.queue.window import MAX_IN_FLIGHT, QueueConfig

    saved = config_to_dict(QueueConfig())
    saved["max_in_flight"] = 1_000_000  # allowed before the limit came down
    assert config_from_dict(saved).max_in_flight == MAX_IN_FLIGHT
