"""Offset resets of stream groups: the plan (which partitions, where each offset
goes, clamped to the log) and its execution (fenced, with an undo record).

A reset names a ``ResetTarget``: a ``position`` ("earliest" or "latest"), an
``offset``, a ``shift_by`` from the committed offset (or the log start), a
``timestamp_ms``, a ``duration_ms`` back from now, or ``undo`` (the offsets before
the group's last reset, "nothing committed" included). Every target but undo is
clamped to ``[log_start_offset, high watermark]``; the plan says so per partition.

Execution fences the group first (``Coordinator.fence``: every member commit is
refused until ``notify_reset``), so nothing in flight can overwrite the new offsets;
saves the old offsets as the undo record (not for an undo); commits the new ones;
then tells the members (a new generation, ``offsets_reset`` in their assignment).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import GroupNotFound, InvalidGroupRequest, NothingToUndo
from .lag import GroupView

log = logging.getLogger("streamd.groups")

TopicPartition = tuple[str, int]
KINDS = ("position", "offset", "shift_by", "timestamp_ms", "duration_ms", "undo")


@dataclass(frozen=True, slots=True)
class ResetTarget:
    """``kind`` is one of ``KINDS``; ``value`` the offset, shift, timestamp or
    duration; ``position`` "earliest" or "latest" ("" is refused when planned)."""

    kind: str
    value: int = 0
    position: str = ""


@dataclass(frozen=True, slots=True)
class PlannedReset:
    topic: str
    partition: int
    old_offset: int  # -1: nothing committed
    new_offset: int  # -1: nothing committed (only through undo)
    requested_offset: int
    clamped: bool
    log_start_offset: int
    log_end_offset: int


def reset_partitions(view: GroupView, group: str, *, all_topics: bool,
                     requested: Sequence[tuple[str, Sequence[int]]]) -> list[TopicPartition]:
    """The partitions a reset names: every partition of the group's topics
    (``all_topics``), or those ``requested`` as (topic, partitions; none: all)."""
    broker = view.broker
    if all_topics:
        topics = view.topics(group)
        if not topics:
            raise GroupNotFound(group)
        return [(t, p) for t in sorted(topics) for p in range(len(broker.topics[t].partitions))]
    if not requested:
        raise InvalidGroupRequest("partitions", "name the partitions to reset, or set all_topics")
    out = []
    for name, partitions in requested:
        topic = broker.topic(name)
        for p in partitions or range(len(topic.partitions)):
            broker.partition(name, p)
            out.append((name, p))
    return sorted(set(out))


def plan_reset(view: GroupView, group: str, target: ResetTarget, *, all_topics: bool,
               requested: Sequence[tuple[str, Sequence[int]]]) -> list[PlannedReset]:
    """Where the reset moves each partition's offset, changing nothing."""
    broker, store = view.broker, view.store
    committed = store.offsets(group)
    undo = store.undo_offsets(group) if target.kind == "undo" else None
    if target.kind == "undo" and undo is None:
        raise NothingToUndo(group)
    if undo is not None and (all_topics or not requested):
        tps = sorted(tp for tp in undo if tp[0] in broker.topics)
    else:
        tps = reset_partitions(view, group, all_topics=all_topics, requested=requested)
    now = broker.clock.now_ms()
    plan = []
    for topic, p in tps:
        part = broker.partition(topic, p)
        start, end = part.log_start_offset, part.high_watermark
        c = committed.get((topic, p))
        old = c.offset if c is not None else -1
        if undo is not None:
            if (topic, p) not in undo:
                continue
            wanted = undo[(topic, p)]
        else:
            wanted = _target(view, target, topic, p, old, start, end, now)
        # -1 ("nothing committed") only comes back through undo; any other target clamps.
        new = wanted if undo is not None and wanted < 0 else min(max(wanted, start), end)
        plan.append(PlannedReset(topic, p, old, new, wanted, new != wanted, start, end))
    return plan


def _target(view: GroupView, target: ResetTarget, topic: str, p: int, old: int, start: int, end: int,
            now: int) -> int:
    kind = target.kind
    if kind == "position":
        if target.position == "latest":
            return end
        if target.position == "earliest":
            return start
        raise InvalidGroupRequest("position", "must be EARLIEST or LATEST")
    if kind == "offset":
        if target.value < 0:
            raise InvalidGroupRequest("offset", f"must not be negative, not {target.value}", reason="NEGATIVE_OFFSET")
        return target.value
    if kind == "shift_by":
        return (old if old >= 0 else start) + target.value
    if kind == "timestamp_ms":
        return view.broker.offset_for(topic, p, timestamp_ms=target.value)
    if target.value < 0:
        raise InvalidGroupRequest("duration_ms", "must not be negative")
    return view.broker.offset_for(topic, p, timestamp_ms=now - target.value)


async def apply_reset(view: GroupView, group: str, plan: Sequence[PlannedReset], *, undo: bool) -> int:
    """Execute ``plan`` (see the module docstring); returns the group's new generation."""
    coordinator, store = view.coordinator, view.store
    # Fence first: from here until notify_reset every member commit is refused, so
    # nothing in flight can overwrite the new offsets.
    generation = coordinator.fence(group)
    try:
        if not undo:
            await store.save_undo(group, {(e.topic, e.partition): e.old_offset for e in plan})
        forget = {(e.topic, e.partition) for e in plan if e.new_offset < 0}  # undo to "nothing committed"
        metadata = store.offsets(group)
        await store.commit(
            group,
            {
                (e.topic, e.partition): (e.new_offset, getattr(metadata.get((e.topic, e.partition)), "metadata", ""))
                for e in plan
                if e.new_offset >= 0
            },
        )
        if forget:
            await store.delete_partitions(group, forget)
        log.info("group %s: reset %d partition offset(s)", group, len(plan))
    finally:
        coordinator.notify_reset(group)
    return generation
