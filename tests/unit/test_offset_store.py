"""OffsetStore: round trips, group commit, failure handling, deletes, undo records,
compaction and recovery from torn or corrupt journals."""

from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest

from consumer_groups.offsets import JOURNAL_NAME, CommittedOffset, OffsetStore, OffsetStoreFailed
from streamd.testing import FakeClock


def run(coro_fn):
    """Run ``coro_fn()`` on a fresh event loop (its default executor does the I/O)."""
    return asyncio.run(coro_fn())


def reopen(directory, **kw) -> OffsetStore:
    return OffsetStore(directory, clock=FakeClock(), **kw)


def close(store: OffsetStore) -> None:
    run(store.close)


def commit_each(directory, commits) -> list[int]:
    """Commit ``commits`` ((group, {key: (offset, metadata)}), ...) one at a time; the
    journal size after each, so tests know where every frame ends."""
    store = reopen(directory)
    ends = []

    async def scenario():
        for group, offsets in commits:
            await store.commit(group, offsets)
            ends.append(store.journal_bytes)
        await store.close()

    run(scenario)
    return ends


THREE_COMMITS = [
    ("g", {("t", 0): (1, "a")}),
    ("g", {("t", 1): (2, "b")}),
    ("g", {("t", 2): (3, "c")}),
]


def test_commit_round_trips_and_survives_reopen(tmp_path):
    clock = FakeClock(start_ms=1000)
    store = OffsetStore(tmp_path / "offsets", clock=clock)
    assert store.get("g1", "t", 0) is None and store.groups() == [] and store.last_commit_ms("g1") == 0

    async def scenario():
        await store.commit("g1", {("t", 0): (5, "meta"), ("t", 1): (7, "")})
        clock.advance(250)
        await store.commit("g1", {("t", 0): (6, "ünïcode")})
        await store.commit("g2", {("u", 3): (0, "x" * 4096)})
        await store.close()

    run(scenario)
    expected_g1 = {("t", 0): CommittedOffset(6, "ünïcode", 1250), ("t", 1): CommittedOffset(7, "", 1000)}

    def check(s: OffsetStore) -> None:
        assert s.offsets("g1") == expected_g1
        assert s.get("g2", "u", 3) == CommittedOffset(0, "x" * 4096, 1250)
        assert s.groups() == ["g1", "g2"]
        assert s.last_commit_ms("g1") == 1250 and s.last_commit_ms("nope") == 0
        assert s.offsets("nope") == {} and s.undo_offsets("g1") is None

    check(store)
    store.offsets("g1").clear()  # a copy: the store is not changed through it
    check(store)
    again = reopen(tmp_path / "offsets")
    check(again)
    assert again.journal_bytes == store.journal_bytes == (tmp_path / "offsets" / JOURNAL_NAME).stat().st_size
    close(again)


def test_concurrent_commits_share_one_write_and_fsync(tmp_path, monkeypatch):
    store = reopen(tmp_path)
    journal_inode = (tmp_path / JOURNAL_NAME).stat().st_ino
    calls = {"write": 0, "fsync": 0}
    real_write, real_fsync = os.write, os.fsync

    def counting(name, real):
        def call(fd, *args):
            calls[name] += os.fstat(fd).st_ino == journal_inode  # the journal's calls only
            return real(fd, *args)
        return call

    monkeypatch.setattr(os, "write", counting("write", real_write))
    monkeypatch.setattr(os, "fsync", counting("fsync", real_fsync))

    async def scenario():
        await asyncio.gather(*(store.commit(f"g{i}", {("t", i): (i, "")}) for i in range(50)))
        await store.close()

    run(scenario)
    monkeypatch.undo()
    assert 1 <= calls["fsync"] <= 3, calls  # not 50
    assert calls["write"] == calls["fsync"]
    again = reopen(tmp_path)
    assert {g: again.get(g, "t", int(g[1:])).offset for g in again.groups()} == {f"g{i}": i for i in range(50)}
    close(again)


def test_failed_fsync_fails_the_batch_then_the_store_rewrites_its_journal_and_goes_on(tmp_path, monkeypatch):
    store = reopen(tmp_path)
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def failing_fsync(fd):
        entered.set()
        assert release.wait(10)
        raise OSError(errno.EIO, "Input/output error")

    async def scenario():
        await store.commit("g", {("t", 0): (1, "ok")})
        monkeypatch.setattr(os, "fsync", failing_fsync)
        first = [asyncio.ensure_future(store.commit("g", {("t", 0): (n, "lost")})) for n in (2, 3)]
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, entered.wait, 10)
        # queued while the failing fsync runs
        behind = asyncio.ensure_future(store.commit("g", {("t", 0): (4, "behind")}))
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*first, behind, return_exceptions=True)
        monkeypatch.setattr(os, "fsync", real_fsync)
        for r in results:  # STORAGE_FAILED, retryable: nothing of them took effect
            assert isinstance(r, OffsetStoreFailed) and r.errno == errno.EIO
        assert store.get("g", "t", 0) == CommittedOffset(1, "ok", store.get("g", "t", 0).commit_time_ms)
        # The next write rewrites the journal from memory first: the failed frames,
        # whatever the disk kept of them, are gone, and the store goes on.
        await store.commit("g", {("t", 0): (5, "")})
        await store.delete_group("other")
        assert store.get("g", "t", 0).offset == 5
        await store.close()

    run(scenario)
    again = reopen(tmp_path)
    assert again.get("g", "t", 0).offset == 5
    close(again)


def test_deletes_survive_reopen(tmp_path):
    store = reopen(tmp_path)

    async def scenario():
        await store.commit("g1", {("a", 0): (1, ""), ("a", 1): (2, ""), ("b", 0): (3, ""), ("b", 1): (4, "")})
        await store.commit("g2", {("a", 0): (5, ""), ("c", 0): (6, "")})
        await store.commit("g3", {("a", 0): (7, "")})
        await store.commit("g4", {("d", 0): (8, "")})
        assert await store.delete_topic("a") == ["g1", "g2", "g3"]
        assert await store.delete_topic("zzz") == []
        await store.delete_partitions("g1", [("b", 0), ("nope", 9)])
        await store.delete_partitions("g4", [("d", 0)])  # its last offset: the group goes
        await store.delete_group("g2")
        await store.delete_group("never-existed")
        await store.close()

    run(scenario)
    for s in (store, reopen(tmp_path)):
        assert s.groups() == ["g1"]
        assert s.offsets("g1") == {("b", 1): s.get("g1", "b", 1)} and s.get("g1", "b", 1).offset == 4
        assert s.offsets("g2") == {} and s.offsets("g3") == {} and s.offsets("g4") == {}
        close(s)


def test_undo_record_survives_reopen_is_replaced_and_removed_with_group(tmp_path):
    store = reopen(tmp_path)

    async def scenario():
        await store.commit("g", {("t", 0): (10, "")})
        await store.save_undo("g", {("t", 0): 10, ("t", 1): 4})
        await store.save_undo("h", {})  # a reset of a group with no offsets: undo deletes them
        await store.close()

    run(scenario)
    store = reopen(tmp_path)
    assert store.undo_offsets("g") == {("t", 0): 10, ("t", 1): 4} and store.undo_offsets("h") == {}
    assert "h" not in store.groups()

    async def replace_and_delete():
        await store.save_undo("g", {("u", 2): 1})
        assert store.undo_offsets("g") == {("u", 2): 1}
        await store.delete_topic("u")  # undo entries of a deleted topic go with it
        assert store.undo_offsets("g") == {}
        await store.save_undo("g", {("t", 0): 3})
        await store.delete_partitions("g", [("t", 0)])  # committed offsets only
        assert store.undo_offsets("g") == {("t", 0): 3}
        await store.delete_group("g")
        await store.close()

    run(replace_and_delete)
    again = reopen(tmp_path)
    assert again.undo_offsets("g") is None and again.offsets("g") == {}
    assert again.undo_offsets("h") == {}
    close(again)


def test_compaction_keeps_journal_bounded(tmp_path, caplog):
    caplog.set_level("INFO", logger="streamd.journal")
    compact_bytes = 64 << 10
    store = reopen(tmp_path, compact_bytes=compact_bytes)
    keys = [(f"topic-{k % 7}", k) for k in range(100)]
    sizes = []

    async def scenario():
        # 5000 commits of the same 100 keys, 10 at a time (so one flush holds ~10)
        for first in range(0, 5000, 10):
            batch = range(first, first + 10)
            await asyncio.gather(*(store.commit("g", {key: (n, f"m{n}") for key in keys}) for n in batch))
            sizes.append(store.journal_bytes)
        await store.close()

    run(scenario)
    # Callers are answered before the compaction that follows their flush, so they may
    # see the journal one flush past the limit (sizes[0] is the first flush's bytes).
    assert max(sizes) <= compact_bytes + 2 * sizes[0], (max(sizes), sizes[0])
    assert caplog.text.count("compacted") >= 50  # ~20 MiB went through a 64 KiB journal
    assert store.journal_bytes == (tmp_path / JOURNAL_NAME).stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == [JOURNAL_NAME]
    again = reopen(tmp_path)
    assert again.groups() == ["g"] and len(again.offsets("g")) == 100
    # the last batch's commits are applied in call order: n = 4999 wins everywhere
    assert {(c.offset, c.metadata) for c in again.offsets("g").values()} == {(4999, "m4999")}
    assert again.offsets("g") == store.offsets("g")
    close(again)


def test_compaction_keeps_undo_records_and_appends_after(tmp_path):
    store = reopen(tmp_path, compact_bytes=1024)

    async def scenario():
        await store.save_undo("g", {("t", 0): 1})
        for n in range(200):
            await store.commit("g", {("t", 0): (n, "")})
        assert store.journal_bytes < 2048  # compacted
        await store.commit("h", {("t", 0): (9, "after")})
        await store.close()

    run(scenario)
    again = reopen(tmp_path)
    assert again.get("g", "t", 0).offset == 199 and again.get("h", "t", 0).metadata == "after"
    assert again.undo_offsets("g") == {("t", 0): 1}
    close(again)


def test_recover_truncates_torn_tail(tmp_path, caplog):
    ends = commit_each(tmp_path, THREE_COMMITS)
    cut = 5
    os.truncate(tmp_path / JOURNAL_NAME, ends[-1] - cut)  # into the last frame's payload
    store = reopen(tmp_path)
    assert store.offsets("g") == {("t", 0): store.get("g", "t", 0), ("t", 1): store.get("g", "t", 1)}
    assert store.journal_bytes == ends[1] == (tmp_path / JOURNAL_NAME).stat().st_size
    torn = ends[2] - ends[1] - cut
    assert f"truncated at position {ends[1]}, cutting {torn} bytes" in caplog.text
    close(store)


@pytest.mark.parametrize("from_end", [1, 12])  # the last payload byte; inside the header
def test_recover_cuts_last_frame_with_flipped_byte(tmp_path, from_end):
    ends = commit_each(tmp_path, THREE_COMMITS)
    position = ends[-1] - from_end if from_end == 1 else ends[1] + 5  # header: the CRC field
    flip(tmp_path / JOURNAL_NAME, position)
    store = reopen(tmp_path)
    assert sorted(store.offsets("g")) == [("t", 0), ("t", 1)]
    assert store.journal_bytes == ends[1]
    close(store)


def test_recover_stops_at_corrupt_frame_in_the_middle(tmp_path):
    ends = commit_each(tmp_path, THREE_COMMITS)
    flip(tmp_path / JOURNAL_NAME, ends[0] + 10)
    store = reopen(tmp_path)
    assert store.offsets("g") == {("t", 0): store.get("g", "t", 0)} and store.get("g", "t", 0).offset == 1
    assert store.journal_bytes == ends[0]

    async def write_after():
        await store.commit("g", {("t", 5): (50, "")})
        await store.close()

    run(write_after)
    again = reopen(tmp_path)
    assert sorted(again.offsets("g")) == [("t", 0), ("t", 5)]
    close(again)


def test_recover_cuts_zero_filled_tail_and_leftover_temp_files(tmp_path):
    ends = commit_each(tmp_path, THREE_COMMITS)
    with open(tmp_path / JOURNAL_NAME, "ab") as f:
        f.write(bytes(64))  # what some file systems leave after a crash
    leftover = tmp_path / f".{JOURNAL_NAME}.abc123.tmp"
    leftover.write_bytes(b"half a snapshot")
    store = reopen(tmp_path)
    assert len(store.offsets("g")) == 3 and store.journal_bytes == ends[-1]
    assert not leftover.exists()
    close(store)


BAD_CALLS = {
    "empty group": lambda s: s.commit("", {("t", 0): (1, "")}),
    "empty topic": lambda s: s.commit("g", {("", 0): (1, "")}),
    "negative partition": lambda s: s.commit("g", {("t", -1): (1, "")}),
    "negative offset": lambda s: s.commit("g", {("t", 0): (-1, "")}),
    "bool offset": lambda s: s.commit("g", {("t", 0): (True, "")}),
    "float offset": lambda s: s.commit("g", {("t", 0): (1.0, "")}),
    "bytes metadata": lambda s: s.commit("g", {("t", 0): (1, b"")}),
    "bare offset": lambda s: s.commit("g", {("t", 0): 1}),
    "key not a pair": lambda s: s.commit("g", {"t": (1, "")}),
    "group not str": lambda s: s.delete_group(7),
    "empty topic to delete": lambda s: s.delete_topic(""),
    "bad partition to delete": lambda s: s.delete_partitions("g", [("t", "0")]),
    "negative undo offset": lambda s: s.save_undo("g", {("t", 0): -5}),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_invalid_input_raises_value_error(tmp_path, call):
    store = reopen(tmp_path)

    async def scenario():
        with pytest.raises(ValueError):
            await call(store)
        await store.close()

    run(scenario)
    assert store.journal_bytes == 0 and store.groups() == []


def test_closed_store_refuses_writes_and_still_reads(tmp_path):
    store = reopen(tmp_path)

    async def scenario():
        await store.commit("g", {("t", 0): (1, "")})
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(OffsetStoreFailed):
            await store.commit("g", {("t", 0): (2, "")})

    run(scenario)
    assert store.get("g", "t", 0).offset == 1


def flip(path, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x5A]))
