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
