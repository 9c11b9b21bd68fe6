"""The consumer-state journals on a real full filesystem (a small tmpfs, a
loop-mounted ext4): a write that finds no room is DiskFull and changes nothing; the
journal is rewritten from memory by the next write once there is room, and what is on
disk is then exactly what was acknowledged."""

from __future__ import annotations

import asyncio

import pytest

from consumer_groups.offsets import OffsetStore
from segments import DiskFull
from streamd.testing import FakeClock
from tests.full_disk import ballast_dirs, fill_into

KINDS = ["tmpfs", "ext4"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_offset_store_on_a_full_disk_refuses_commits_then_recovers_by_itself(kind, small_fs):
    root = small_fs(16 << 20, kind=kind)
    (ballast_dir,) = ballast_dirs(root, 1)

    async def scenario() -> dict:
        store = OffsetStore(root / "groups", clock=FakeClock())
        ballast = fill_into(ballast_dir)
        acknowledged, refused = {}, 0
        for n in range(300):  # each commit crosses a page or two: the disk is full within a few
            try:
                await store.commit("g", {("t", n % 3): (n, "m" * 3000)})
            except DiskFull:
                refused += 1
                break
            acknowledged[n % 3] = n
        assert refused
        assert {p: c.offset for (_, p), c in store.offsets("g").items()} == acknowledged
        ballast.release()
        await store.commit("g", {("t", 9): (9, "")})  # the journal is rewritten, then goes on
        acknowledged[9] = 9
        await store.close()
        return acknowledged

    acknowledged = asyncio.run(scenario())
    again = OffsetStore(root / "groups", clock=FakeClock())
    assert {p: c.offset for (_, p), c in again.offsets("g").items()} == acknowledged
