"""QueueStore: every queue group's state, crash-safe, in ``DIR/queues.journal``.

The live state is the ``PartitionQueue`` objects in memory; the journal (a
``consumer_groups.journal.Journal``) records their changes as operations that set
absolute values, so replaying one twice (a snapshot plus operations written while it
was taken) gives the same state::

    {"op":"create","g":G,"t":T,"cfg":{...},"start":[[p,offset],..],"ms":created_ms}
    {"op":"delete","g":G,"t":T}
    {"op":"dlv","g":G,"t":T,"p":P,"r":[[first_offset,last_offset,deliveries,first_ms,last_ms],..]}  lazy
    {"op":"rty","g":G,"t":T,"p":P,"o":[[offset,deliveries,visible_at,reason],..]}  nack: durable, expiry: lazy
    {"op":"dlq","g":G,"t":T,"p":P,"o":[[offset,deliveries,reason,first_ms,last_ms],..]}  durable
    {"op":"set","g":G,"t":T,"p":P,"k":"a"|"d","o":[offset,..],"r":[[first,last],..]}  settled
                                            (acked / dead-lettered; offsets and/or ranges): durable
    {"op":"seek","g":G,"t":T,"p":P,"start":offset}                                  durable
    {"op":"skip","g":G,"t":T,"p":P,"start":offset,"lost":n}                        lazy
    {"op":"bad","g":G,"t":T,"p":P,"r":[[first,last],..],"lost":n}                   lazy
                                            (offsets a damaged log made unreadable: settled)
    {"op":"part","g":G,"t":T,"p":P,"start":S,"settled":[[a,b],..],"known":[[o,d,vis,reason,first,last,dead],..],
     "stats":[acked,redelivered,dead_lettered,lost,lost_to_corruption]}              snapshot

Durability: settling (acks, dead-letter decisions, nacks, seeks) is fsynced before it
is acknowledged; deliveries and lease expiries are written at once but fsynced with
the next durable operation, so they survive a process crash, not always a power
loss (a delivery count may then be one lower). Leases themselves are not stored: a
lease in flight at a crash is void after it, and its record is delivered again.

After a restart each partition starts with its window empty at ``start_offset``;
records are admitted from the log again and pick up what ``remembered`` holds for
them (delivery counts, retry times, reasons, pending dead letters).

A failed write (a full disk) fails the calls waiting for it; the journal is then
rewritten from this state (the snapshot) before it takes more (``journal``), so disk
and memory agree again once there is room. Callers change memory before they write,
so they ``await ready()`` first: while the journal cannot be rewritten, nothing
changes and the call fails (DISK_FULL). Only the changes of the call whose write
failed are in memory and not on disk; the rewrite stores them (``create`` and
``delete`` put memory back instead, so a failed one can be retried as it was).
"""

from __future__ import annotations

import concurrent.futures
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..journal import DEFAULT_COMPACT_BYTES, Journal
from .retry import RetryPolicy
from .window import (
    DEAD_LETTERING,
    MAX_IN_FLIGHT,
    WAITING,
    Entry,
    Lease,
    PartitionQueue,
    QueueConfig,
    expand_ranges,
    offset_runs,
)

JOURNAL_NAME = "queues.journal"

GroupKey = tuple[str, str]  # (group, topic)


class QueueGroup:
    def __init__(self, name: str, topic: str, config: QueueConfig, created_ms: int) -> None:
        self.name, self.topic, self.config, self.created_ms = name, topic, config, created_ms
        self.partitions: dict[int, PartitionQueue] = {}

    @property
    def dead_letter_topic(self) -> str:
        return self.config.dead_letter_topic or f"{self.topic}.dlq"


def config_to_dict(config: QueueConfig) -> dict:
    return asdict(config)


def config_from_dict(raw: dict) -> QueueConfig:
    raw = dict(raw)
    raw["retry"] = RetryPolicy(**raw.get("retry", {}))
    if "max_in_flight" in raw:  # groups created before the limit came down load with it
        raw["max_in_flight"] = min(int(raw["max_in_flight"]), MAX_IN_FLIGHT)
    return QueueConfig(**raw)


class QueueStore:
    def __init__(
        self,
        directory: Path,
        *,
        executor: concurrent.futures.Executor | None = None,
        rng: random.Random | None = None,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
    ) -> None:
        self.rng = rng or random.Random()
        self.groups: dict[GroupKey, QueueGroup] = {}
        self._journal = Journal(
            Path(directory) / JOURNAL_NAME,
            apply=self._replay,
            snapshot=self._snapshot,
            executor=executor,
            compact_bytes=compact_bytes,
        )

    # -- writes (the callers changed memory already) -----------------------------------
    async def create(self, group: QueueGroup) -> None:
        key = (group.name, group.topic)
        self.groups[key] = group
        try:
            await self._journal.write(self._create_op(group))
        except BaseException:
            if self.groups.get(key) is group:  # not created: the name stays free
                del self.groups[key]
            raise

    async def delete(self, group: QueueGroup) -> None:
        key = (group.name, group.topic)
        self.groups.pop(key, None)
        try:
            await self._journal.write({"op": "delete", "g": group.name, "t": group.topic})
        except BaseException:
            self.groups.setdefault(key, group)  # not deleted: still there
            raise

    def delivered(self, group: QueueGroup, partition: int, lease: Lease, now: int) -> None:
        """Deliveries, as runs of consecutive offsets with the same count and times
        (a receive of new records is one run: one small entry, not one per record)."""
        q = group.partitions[partition]
        runs: list[list[int]] = []
        for first, last, d in lease.runs():
            if d == 1:
                runs.append([first, last, 1, now, now])
                continue
            for offset in range(first, last + 1):  # redeliveries: first times differ
                e = q.entry(offset)
                runs.append([offset, offset, d, e.first_delivery_ms if e is not None else now, now])
        self._journal.write(self._op("dlv", group, partition, r=runs), durable=False)

    def retried(self, group: QueueGroup, partition: int, entries: list[Entry], *, durable: bool):
        """Entries now WAITING for a redelivery (or dead-lettering: use ``dead``)."""
        o = [[e.offset, e.deliveries, e.visible_at, e.reason] for e in entries]
        return self._journal.write(self._op("rty", group, partition, o=o), durable=durable)

    def dead(self, group: QueueGroup, partition: int, entries: list[Entry]):
        o = [[e.offset, e.deliveries, e.reason, e.first_delivery_ms, e.last_delivery_ms] for e in entries]
        return self._journal.write(self._op("dlq", group, partition, o=o))

    def settled(self, group: QueueGroup, partition: int, offsets: list[int] | np.ndarray, *, kind: str = "a"):
        """Settled offsets (ascending runs are written as ranges)."""
        return self._journal.write(self._op("set", group, partition, k=kind, r=offset_runs(offsets)))

    def sought(self, group: QueueGroup, partition: int, start: int):
        return self._journal.write(self._op("seek", group, partition, start=start))

    def skipped(self, group: QueueGroup, partition: int, start: int, lost: int) -> None:
        self._journal.write(self._op("skip", group, partition, start=start, lost=lost), durable=False)

    def damaged(self, group: QueueGroup, partition: int, ranges: list[tuple[int, int]], lost: int) -> None:
        self._journal.write(self._op("bad", group, partition, r=[list(r) for r in ranges], lost=lost),
                            durable=False)

    def check(self) -> None:
        """Raise ``JournalFailed`` if the store is closed."""
        self._journal.check()

    async def ready(self) -> None:
        """Before a change to the state: return once the journal takes writes (after a
        failure: once it was rewritten from this state), else raise why not."""
        await self._journal.ready()

    async def close(self) -> None:
        await self._journal.close()

    @staticmethod
    def _op(kind: str, group: QueueGroup, partition: int, **fields) -> dict:
        return {"op": kind, "g": group.name, "t": group.topic, "p": partition, **fields}

    @staticmethod
    def _create_op(group: QueueGroup) -> dict:
        return {
            "op": "create", "g": group.name, "t": group.topic, "cfg": config_to_dict(group.config),
            "start": [[p, q.start_offset] for p, q in group.partitions.items()], "ms": group.created_ms,
        }

    # -- snapshot ------------------------------------------------------------------
    def _snapshot(self) -> list[dict]:
        ops: list[dict] = []
        for group in self.groups.values():
            ops.append(self._create_op(group))
            for p, q in group.partitions.items():
                known = [list(v) + [o] for o, v in q.remembered.items()]
                known = [[o, d, vis, reason, first, last, dead] for d, vis, reason, first, last, dead, o in known]
                for e in q.entries(delivered_only=True):
                    vis = e.visible_at if e.state == WAITING else 0
                    known.append([e.offset, e.deliveries, vis, e.reason, e.first_delivery_ms,
                                  e.last_delivery_ms, e.state == DEAD_LETTERING])
                s = q.stats
                ops.append(self._op(
                    "part", group, p, start=q.start_offset, settled=q.settled_above_start(), known=known,
                    stats=[s.acked, s.redelivered, s.dead_lettered, s.lost_to_retention, s.lost_to_corruption],
                ))
        return ops

    # -- replay (recovery) ------------------------------------------------------------
    def _replay(self, op: dict) -> None:
        kind = op["op"]
        if kind == "create":
            group = QueueGroup(op["g"], op["t"], config_from_dict(op["cfg"]), int(op["ms"]))
            for p, start in op["start"]:
                group.partitions[int(p)] = PartitionQueue(int(p), int(start), group.config, rng=self.rng)
            self.groups[(group.name, group.topic)] = group
            return
        if kind == "delete":
            self.groups.pop((op["g"], op["t"]), None)
            return
        handler = _REPLAY.get(kind)
        if handler is None:
            raise ValueError(f"unknown operation {kind!r}")
        owner = self.groups.get((op["g"], op["t"]))
        q = owner.partitions.get(int(op["p"])) if owner is not None else None
        if q is None:
            return  # written for a group deleted just before (a dead letter finishing late)
        handler(q, op)


def _remember(q: PartitionQueue, offset: int, **changes) -> None:
    if q.is_settled(offset):
        return
    d, vis, reason, first, last, dead = q.remembered.get(offset, (0, 0, "", 0, 0, False))
    values = {"d": d, "vis": vis, "reason": reason, "first": first, "last": last, "dead": dead, **changes}
    q.remembered[offset] = (values["d"], values["vis"], values["reason"], values["first"], values["last"],
                            values["dead"])


def _replay_dlv(q: PartitionQueue, op: dict) -> None:
    for lo, hi, d, first, last in op["r"]:
        if hi < lo or hi - lo > 1_000_000:
            raise ValueError(f"bad delivery run {lo}..{hi}")
        for offset in range(max(int(lo), q.start_offset), int(hi) + 1):
            _remember(q, offset, d=int(d), first=int(first), last=int(last))
        if d > 1:
            q.stats.redelivered += hi - lo + 1


def _replay_rty(q: PartitionQueue, op: dict) -> None:
    for offset, d, vis, reason in op["o"]:
        _remember(q, int(offset), d=int(d), vis=int(vis), reason=str(reason))


def _replay_dlq(q: PartitionQueue, op: dict) -> None:
    for offset, d, reason, first, last in op["o"]:
        _remember(q, int(offset), d=int(d), reason=str(reason), first=int(first), last=int(last), dead=True)


def _replay_set(q: PartitionQueue, op: dict) -> None:
    ranges = [(int(o), int(o)) for o in op.get("o", ())] + [(int(a), int(b)) for a, b in op.get("r", ())]
    count = 0
    for lo, hi in sorted(ranges):
        if hi < lo or hi - lo > 10_000_000:
            raise ValueError(f"bad range {lo}..{hi}")
        count += hi - lo + 1
        q.forget(lo, hi)
        start = q.start_offset
        if lo <= start:
            if hi >= start:
                q.move_to(hi + 1)
        else:
            q.settled_ahead.update(range(lo, hi + 1))
    if op["k"] == "a":
        q.stats.acked += count
    else:
        q.stats.dead_lettered += count
    _advance(q)


def _replay_seek(q: PartitionQueue, op: dict) -> None:
    q.seek(int(op["start"]))


def _replay_skip(q: PartitionQueue, op: dict) -> None:
    q.stats.lost_to_retention += int(op["lost"])
    q.move_to(int(op["start"]))


def _replay_bad(q: PartitionQueue, op: dict) -> None:
    q.stats.lost_to_corruption += int(op["lost"])
    for lo, hi in op["r"]:
        lo, hi = int(lo), int(hi)
        if hi < lo or hi - lo > 10_000_000:
            raise ValueError(f"bad range {lo}..{hi}")
        q.forget(lo, hi)
        if lo <= q.start_offset:
            if hi >= q.start_offset:
                q.move_to(hi + 1)
        else:
            q.settled_ahead.update(range(lo, hi + 1))
    _advance(q)


def _replay_part(q: PartitionQueue, op: dict) -> None:
    q.seek(int(op["start"]))
    q.settled_ahead = {o for o in expand_ranges(op["settled"]) if o >= q.start_offset}
    for o, d, vis, reason, first, last, dead in op["known"]:
        _remember(q, int(o), d=int(d), vis=int(vis), reason=str(reason), first=int(first), last=int(last),
                  dead=bool(dead))
    acked, redelivered, dead_lettered, lost, *newer = op["stats"]  # 4 fields before lost_to_corruption
    q.stats.acked, q.stats.redelivered = int(acked), int(redelivered)
    q.stats.dead_lettered, q.stats.lost_to_retention = int(dead_lettered), int(lost)
    q.stats.lost_to_corruption = int(newer[0]) if newer else 0
    _advance(q)


def _advance(q: PartitionQueue) -> None:
    start = q.start_offset
    while start in q.settled_ahead:
        start += 1
    q.move_to(start)


_REPLAY = {
    "dlv": _replay_dlv, "rty": _replay_rty, "dlq": _replay_dlq, "set": _replay_set,
    "seek": _replay_seek, "skip": _replay_skip, "part": _replay_part, "bad": _replay_bad,
}
