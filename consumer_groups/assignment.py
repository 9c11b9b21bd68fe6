"""Partition assignment for a consumer group: balanced and sticky.

``assign(subscriptions, partition_counts, current)`` maps every partition of the
subscribed topics to one member subscribed to its topic, such that

- **balanced**: no member could take a partition from another member holding two or
  more partitions more than it (with equal subscriptions, counts differ by at most 1);
- **sticky**: a partition stays with its current owner unless balance needs it to
  move, and the moves are as few as the greedy rebalance below can make them.

Pure and deterministic (members and partitions are visited in sorted order), so
tests compare it against a model and every broker computes the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping

TopicPartition = tuple[str, int]


def assign(
    subscriptions: Mapping[str, frozenset[str] | set[str]],
    partition_counts: Mapping[str, int],
    current: Mapping[TopicPartition, str],
) -> dict[TopicPartition, str]:
    """The target owner of every assignable partition (unsubscribed topics are left out)."""
    members = sorted(subscriptions)
    load: dict[str, set[TopicPartition]] = {m: set() for m in members}
    unowned: list[TopicPartition] = []
    for topic in sorted({t for topics in subscriptions.values() for t in topics}):
        for p in range(partition_counts.get(topic, 0)):
            tp = (topic, p)
            owner = current.get(tp)
            if owner in load and topic in subscriptions[owner]:
                load[owner].add(tp)
            else:
                unowned.append(tp)
    for tp in unowned:
        candidates = [m for m in members if tp[0] in subscriptions[m]]
        if candidates:
            load[min(candidates, key=lambda m: (len(load[m]), m))].add(tp)
    _balance(load, subscriptions)
    return {tp: m for m, tps in load.items() for tp in tps}


def _balance(load: dict[str, set[TopicPartition]], subscriptions: Mapping[str, frozenset[str] | set[str]]) -> None:
    """Move partitions from heavier to lighter members until no move helps.

    Each move lowers the sum of squared loads, so the loop ends; the bound is a
    safety net, not a tuning knob.
    """
    total = sum(len(tps) for tps in load.values())
    for _ in range(total * max(1, len(load)) + 1):
        if not _move_one(load, subscriptions):
            return


def _move_one(load: dict[str, set[TopicPartition]], subscriptions) -> bool:
    by_load = sorted(load, key=lambda m: (-len(load[m]), m))
    for src in by_load:
        for dst in reversed(by_load):
            if len(load[src]) - len(load[dst]) < 2:
                break
            movable = sorted(tp for tp in load[src] if tp[0] in subscriptions[dst])
            if movable:
                tp = movable[-1]
                load[src].remove(tp)
                load[dst].add(tp)
                return True
    return False
