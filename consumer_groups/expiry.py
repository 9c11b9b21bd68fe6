"""Group expiry: the offsets of stream groups that have had no members for the
retention time are forgotten (as Kafka's offsets.retention.minutes). The server
runs ``expire_groups`` on a timer."""

from __future__ import annotations

import logging

from .coordinator import Coordinator
from .offsets import OffsetStore

log = logging.getLogger("streamd.groups")


async def expire_groups(coordinator: Coordinator, store: OffsetStore, *, retention_ms: int, started_ms: int) -> None:
    """Forget the offsets (and undo record) of groups that have had no members for
    ``retention_ms`` since their last commit (or since they emptied, or since start-up)."""
    now = coordinator.clock.now_ms()
    for group in sorted(set(store.groups()) | set(store.undo_groups())):
        if coordinator.live_members(group):
            continue
        last = max(store.last_commit_ms(group), coordinator.empty_since_ms.get(group, started_ms))
        if now - last > retention_ms:
            log.info("group %s: no members for %d ms; deleting its offsets", group, now - last)
            await store.delete_group(group)
            coordinator.forget(group)
    for group in list(coordinator.empty_since_ms):  # emptied without ever committing
        if not coordinator.live_members(group) and not store.offsets(group) and store.undo_offsets(group) is None:
            coordinator.forget(group)
