"""The Broker: topics, their partitions, and the background work that keeps them.

Owns the data directory layout::

    DATA_DIR/@broker.lock        flock()ed while a broker runs: one broker per directory
    DATA_DIR/@tmp/<n>.<uuid>     a topic being created (renamed into place when whole)
    DATA_DIR/@deleted/<n>.<uuid> a topic being deleted (renamed out, then removed)
    DATA_DIR/<topic>/topic.json  see streamd.broker.topic
    DATA_DIR/<topic>/<p>/        one PartitionLog directory per partition

``<n>`` is the topic name cut to its first 64 characters (a whole name of 249 would
not fit a 255-byte file name with the uuid); start-up removes @tmp and @deleted whole.

Runs on one asyncio event loop; blocking storage work (fsync, checkpoints, removing
directories) goes to the executor. Knows nothing of gRPC.

Full disks. A produce request is appended all or none: every check happens before
anything is appended, each partition's batches go into its log in one step (all or
none, ``Partition.store``), and if a later partition of the request has no room the
earlier ones are undone before the error (``segments.DiskFull``) is raised; nothing
is recorded in producer state or dedup windows until every partition took its share.
So DISK_FULL means nothing of the request was appended and no idempotent producer's
sequence moved: the producer may send those sequence numbers again (with the same or
other records). Creating a topic on a full disk leaves nothing behind. A partition
whose fsync failed (``LogFailed``, UNAVAILABLE: its batches may or may not be kept,
so a producer must retry them unchanged) is opened again from disk by the repair
job every ``REPAIR_INTERVAL_MS`` until that works: recovery checks what it holds past
the last good fsync and writes it again, and the producer state is rebuilt from it.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from segments import DiskFull, LogFailed, PartitionLog, ReadLimits, disk_full_as, is_disk_full
from streamd.clock import Clock
from streamd.partitioner import key_partition
from streamd.v1 import streamd_pb2 as pb

from . import producer_state
from .append_plan import PartitionPlan, ProduceResult, RequestState, plan_partition
from .batches import CheckedBatch, batch_from_records, checked_batch
from .dedup import DedupWindow
from .errors import (
    BrokerUnavailable,
    InvalidArgument,
    LimitExceeded,
    PartitionNotFound,
    ProducerStateNotSaved,
    RecordTooLarge,
    TopicAlreadyExists,
    TopicNotFound,
)
from .partition import Partition, ReadOut
from .topic import MAX_TOPIC_NAME_CHARS, TopicMeta, TopicSettings, check_topic_name

log = logging.getLogger("streamd.broker")

LOCK_FILE = "@broker.lock"
TMP_DIR = "@tmp"
DELETED_DIR = "@deleted"
MAX_WAIT_MS = 30_000
#: How much of a topic's name its @tmp/@deleted entry keeps (only to tell whose it is).
SCRATCH_PREFIX_CHARS = 64
#: How often partitions whose log failed (an fsync error) are opened again.
REPAIR_INTERVAL_MS = 1000


class DataDirLocked(Exception):
    """Another broker holds the data directory."""


@dataclass
class Topic:
    meta: TopicMeta
    directory: Path
    partitions: list[Partition]
    next_round_robin: int = 0


__all__ = ["Broker", "DataDirLocked", "ProduceResult", "ReadOut", "Topic"]


class Broker:
    def __init__(
        self,
        data_dir: Path,
        *,
        defaults: TopicSettings,
        clock: Clock,
        executor: Executor,
        index_interval_bytes: int = 4096,
        max_topics: int = 10_000,
        max_partitions_per_topic: int = 1_000,
        on_fsync=None,
    ) -> None:
        """``on_fsync(seconds)``: called on the event loop after each log fsync."""
        self.data_dir = Path(data_dir)
        self.on_fsync = on_fsync
        self.defaults = defaults.validate()
        self.clock = clock
        self.executor = executor
        self.index_interval_bytes = index_interval_bytes
        self.max_topics = max_topics
        self.max_partitions_per_topic = max_partitions_per_topic
        self.topics: dict[str, Topic] = {}
        self.state = "starting"
        self._lock_fd: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Future[None] | None = None

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        """Lock the data directory and load (recovering) every topic. Blocking."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirLocked(f"{self.data_dir} is in use by another streamd broker") from None
        self._lock_fd = fd
        for leftover in (TMP_DIR, DELETED_DIR):
            shutil.rmtree(self.data_dir / leftover, ignore_errors=True)
        for entry in sorted(self.data_dir.iterdir()):
            if entry.name.startswith("@") or not (entry / "topic.json").is_file():
                continue
            meta = TopicMeta.read(entry)
            self.topics[meta.name] = self._open_topic(meta, entry)
        parts = self.all_partitions()
        recovered = sum(1 for p in parts if p.recovery is not None)
        log.info(
            "loaded %d topic(s), %d partition(s) from %s: %s", len(self.topics), len(parts), self.data_dir,
            f"{recovered} recovered (a crash, or damage found after a clean stop)" if recovered else "clean, nothing to recover",
            extra={"event": "loaded", "topics": len(self.topics), "partitions": len(parts), "recovered": recovered},
        )

    def start_background(self, *, checkpoint_interval_ms: int, retention_check_ms: int) -> None:
        """Serve, and start interval fsync, recovery-point checkpoints and retention."""
        self.state = "serving"
        self.run_every("fsync-interval", 50, self._flush_interval_topics)
        self.run_every("repair", REPAIR_INTERVAL_MS, self.repair_failed)
        self.run_every("checkpoint", checkpoint_interval_ms, self.checkpoint_all)
        self.run_every("retention", retention_check_ms, self.apply_retention)

    def run_every(self, name: str, interval_ms: int, job) -> None:
        """Run ``await job()`` every ``interval_ms`` until ``close``; failures are logged."""
        self._tasks.append(asyncio.create_task(self._every(interval_ms, job), name=name))

    def stop_accepting(self) -> None:
        """Refuse new work with UNAVAILABLE and wake parked readers so they end."""
        self.state = "stopping"
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)
        for part in self.all_partitions():
            part.close()

    def stopping(self) -> asyncio.Future[None]:
        """A future resolved when the broker stops accepting work (long-lived streams
        end then, instead of holding a graceful stop up until its deadline)."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
            if self.state == "stopping":
                self._stopping.set_result(None)
        return self._stopping

    async def close(self) -> None:
        """Flush everything, close every log cleanly, release the directory."""
        self.stop_accepting()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for topic in list(self.topics.values()):
            for part in topic.partitions:
                try:
                    await part.write_snapshot(self.clock.now_ms())
                except Exception as exc:  # e.g. a failed log: the next start rebuilds from the log
                    _log_failure(f"producer snapshot of {part.topic}/{part.index}", exc)
                await self._end_repair(part)
                try:
                    await loop.run_in_executor(self.executor, part.close_log)
                except Exception as exc:  # no clean-shutdown mark: the next start recovers it
                    _log_failure(f"closing {part.topic}/{part.index}", exc)
        self.topics.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open_topic(self, meta: TopicMeta, directory: Path) -> Topic:
        parts: list[Partition] = []
        try:
            self._open_partitions(meta, directory, parts)
        except BaseException:
            for part in parts:  # no half-open topic: release what was opened
                part.close_log()
            raise
        return Topic(meta, directory, parts)

    def _open_partitions(self, meta: TopicMeta, directory: Path, parts: list[Partition]) -> None:
        s = meta.settings
        for p in range(meta.partition_count):
            plog, producers, covers, dedup = self._load_partition(meta, directory / str(p), p)
            parts.append(
                Partition(
                    meta.name, p, plog, executor=self.executor, fsync_always=s.fsync_policy == "always",
                    producers=producers, snapshot_covers=covers, dedup=dedup, on_fsync=self.on_fsync,
                )
            )

    def _load_partition(
        self, meta: TopicMeta, directory: Path, p: int
    ) -> tuple[PartitionLog, producer_state.ProducerStateTable, int, DedupWindow | None]:
        """Open one partition's log (recovering it) and rebuild its state. Blocking."""
        s = meta.settings
        now = self.clock.now_ms()
        plog = PartitionLog.open(
            directory,
            segment_bytes=s.segment_bytes,
            segment_ms=s.segment_ms,
            index_interval_bytes=self.index_interval_bytes,
            now_ms=now,
            name=f"{meta.name}/{p}",
            topic=meta.name,
            partition=p,
        )
        try:
            producers, covers = producer_state.load(plog, now_ms=now)
            dedup = None
            if s.dedup_window_ms > 0:
                dedup = DedupWindow(s.dedup_window_ms)
                dedup.rebuild(plog, now)
        except BaseException:
            plog.close()
            raise
        return plog, producers, covers, dedup

    def check_serving(self) -> None:
        if self.state != "serving":
            raise BrokerUnavailable(self.state)

    def _check_open(self, part: Partition) -> None:
        if part.closed:
            if self.state != "serving":
                raise BrokerUnavailable(self.state)
            raise TopicNotFound(part.topic)

    # -- topics --------------------------------------------------------------
    def topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:  # only valid names are ever keys: check the name on a miss
            check_topic_name(name)
            raise TopicNotFound(name)
        return topic

    def partition(self, name: str, partition: int) -> Partition:
        return _partition_in(self.topic(name), partition)

    #: Topic names the broker takes (queue groups check their dead-letter topic's).
    max_topic_name_chars = MAX_TOPIC_NAME_CHARS

    def check_topic_name(self, name: str, *, field: str = "topic") -> str:
        """``name`` if it is a valid topic name, else InvalidTopicName naming ``field``."""
        return check_topic_name(name, field=field)

    def create_topic(self, name: str, partition_count: int, overrides: dict[str, object]) -> Topic:
        self.check_serving()
        check_topic_name(name)
        if partition_count == 0:
            partition_count = 1
        if partition_count < 0:
            raise InvalidArgument("partition_count", f"must be positive, not {partition_count}")
        if partition_count > self.max_partitions_per_topic:
            raise LimitExceeded("partitions per topic", self.max_partitions_per_topic)
        if name in self.topics:
            raise TopicAlreadyExists(name)
        if len(self.topics) >= self.max_topics:
            raise LimitExceeded("topics", self.max_topics)
        settings = replace(self.defaults, **cast("dict[str, Any]", overrides)).validate()
        meta = TopicMeta(name, partition_count, settings, self.clock.now_ms())
        with disk_full_as(f"create topic {name}"):
            topic = self._create_topic_files(meta)
        self.topics[name] = topic
        log.info("created topic %s with %d partitions %s", name, partition_count, settings,
                 extra={"event": "topic_created", "topic": name, "partitions": partition_count})
        return topic

    def _create_topic_files(self, meta: TopicMeta) -> Topic:
        """Stage the topic's directory, rename it into place, open its partitions; on
        any failure (a full disk) nothing is left behind and the name stays free."""
        name = meta.name
        staging = self.data_dir / TMP_DIR / _scratch_name(name)
        final = self.data_dir / name
        try:
            staging.mkdir(parents=True)
            for p in range(meta.partition_count):
                (staging / str(p)).mkdir()
            meta.write(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            _fsync_dir(self.data_dir)
            topic = self._open_topic(meta, final)
            if not all(part.writable for part in topic.partitions):
                for part in topic.partitions:
                    part.close_log()
                raise DiskFull(f"create topic {name}")
        except BaseException:
            # Take the directory out of the way (into @tmp, which exists: no new
            # directory needed on a full disk) so the name can be created again.
            scratch = self.data_dir / TMP_DIR / _scratch_name(name)
            os.rename(final, scratch)
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return topic

    async def delete_topic(self, name: str) -> None:
        self.check_serving()
        topic = self.topic(name)
        del self.topics[name]
        for part in topic.partitions:
            part.close()
        loop = asyncio.get_running_loop()
        for part in topic.partitions:
            await self._end_repair(part)
            await loop.run_in_executor(self.executor, part.close_log)
        graveyard = self.data_dir / DELETED_DIR
        graveyard.mkdir(exist_ok=True)
        target = graveyard / _scratch_name(name)
        os.rename(topic.directory, target)
        _fsync_dir(self.data_dir)
        await loop.run_in_executor(self.executor, shutil.rmtree, target)
        log.info("deleted topic %s", name, extra={"event": "topic_deleted", "topic": name})

    # -- produce -------------------------------------------------------------
    async def produce(
        self,
        name: str,
        partition_batches: list[tuple[int, list[bytes]]],
        records: list[bytes],
    ) -> list[ProduceResult]:
        """Append, then wait for fsync where the topic's policy is ``always``."""
        results, durable = self.append(name, partition_batches, records)
        await durable
        return results

    def append(
        self,
        name: str,
        partition_batches: list[tuple[int, list[bytes]]],
        records: list[bytes],
    ) -> tuple[list[ProduceResult], asyncio.Future[None]]:
        """Check and append batches (and broker-routed records) now; return the
        results and a future that completes when they are as durable as the topic's
        policy promises. Every check happens before anything is appended, so a
        refused request appends nothing. Pipelined producers append in arrival order
        and await durability concurrently, which lets group commit share fsyncs."""
        self.check_serving()
        topic = self.topic(name)
        s = topic.meta.settings
        now = self.clock.now_ms()
        request = RequestState()
        compress = s.compression == "lz4"
        plans: list[PartitionPlan] = []
        for index, raws in partition_batches:
            part = _partition_in(topic, index)
            with_keys = part.dedup is not None
            batches = [
                checked_batch(
                    raw,
                    max_batch_bytes=s.max_batch_bytes,
                    max_record_bytes=s.max_record_bytes,
                    compress=compress,
                    with_keys=with_keys,
                )
                for raw in raws
            ]
            if batches:
                plans.append(plan_partition(part, batches, request, topic=name, now_ms=now))
        if records:
            for part, batches in self._route(topic, records):
                plans.append(plan_partition(part, batches, request, topic=name, now_ms=now))
        infos = self._store(plans, now)
        appended = []
        for plan in plans:
            base, count, append_time = plan.part.remember(
                plan.batches, infos[plan.part.index], base_offset=plan.base_offset, now_ms=now,
                answers=plan.batch_answers())
            appended.append((plan, base, count, append_time))
        durable = s.fsync_policy == "always"
        results = [plan.result(base, count, t, durable) for plan, base, count, t in appended]
        waits = [
            plan.part.sync_to(plan.durable_offset(base, count)) for plan, base, count, _ in appended if durable
        ] + [_save_producer_state(plan.part, now) for plan, *_ in appended if plan.needs_snapshot]
        waiter: asyncio.Future[None]
        if len(waits) == 1:  # the usual fsync=always request: one partition's sync
            waiter = asyncio.ensure_future(waits[0])
        elif waits:
            waiter = asyncio.ensure_future(_gather(*waits))
        else:
            waiter = asyncio.get_running_loop().create_future()
            waiter.set_result(None)
        return results, waiter

    def _store(self, plans: list[PartitionPlan], now: int) -> dict[int, Iterator]:
        """Put every plan's batches in the logs, all or none (module docstring): one
        ``Partition.store`` per partition, its plans' batches in request order. Sets
        each plan's ``base_offset`` (where its first stored record goes: answers count
        from it); returns, per partition, what was stored, to be ``remember``ed."""
        if len(plans) == 1:  # the usual request: one partition, nothing to undo
            plan = plans[0]
            part = plan.part
            plan.base_offset = part.log_end_offset
            try:
                stored = part.store(plan.batches, now_ms=now)
            except BaseException as exc:
                _note_refusal(part, exc)
                raise
            if part.disk_full:
                _note_room(part)
            return {part.index: iter(stored)}
        by_partition: dict[int, list[PartitionPlan]] = {}
        for plan in plans:
            by_partition.setdefault(plan.part.index, []).append(plan)
        infos: dict[int, Iterator] = {}
        done: list[tuple[Partition, int]] = []
        for part_plans in by_partition.values():
            part = part_plans[0].part
            start = offset = part.log_end_offset
            for plan in part_plans:
                plan.base_offset = offset
                offset += sum(b.record_count for b in plan.batches)
            try:
                stored = part.store([b for plan in part_plans for b in plan.batches], now_ms=now)
            except BaseException as exc:
                _note_refusal(part, exc)
                _undo(done, exc)
                raise
            done.append((part, start))
            infos[part.index] = iter(stored)
            if part.disk_full:
                _note_room(part)
        return infos

    def _route(self, topic: Topic, records: list[bytes]) -> list[tuple[Partition, list[CheckedBatch]]]:
        s = topic.meta.settings
        n = len(topic.partitions)
        groups: dict[int, list[bytes]] = {}
        keys: dict[int, list[str]] = {}
        with_keys = s.dedup_window_ms > 0
        for i, raw in enumerate(records):
            try:
                record = pb.Record.FromString(raw)
            except Exception:
                raise InvalidArgument("records", f"record {i} is not a serialized Record") from None
            if len(raw) > s.max_record_bytes:
                raise RecordTooLarge("record", len(raw), s.max_record_bytes)
            if record.HasField("key"):
                p = key_partition(record.key, n)
            else:
                p = topic.next_round_robin % n
                topic.next_round_robin += 1
            groups.setdefault(p, []).append(raw)
            if with_keys:
                keys.setdefault(p, []).append(record.idempotency_key)
        compress = s.compression == "lz4"
        return [
            (topic.partitions[p], [batch_from_records(raws, compress=compress, keys=keys.get(p))])
            for p, raws in sorted(groups.items())
        ]

    # -- read ----------------------------------------------------------------
    def read(self, name: str, partition: int, offset: int, limits: ReadLimits) -> ReadOut:
        """Stored frames from the one holding ``offset``, never past the high watermark
        (``Partition.read``)."""
        return self.partition(name, partition).read(offset, limits)

    async def fetch(self, name: str, partition: int, offset: int, limits: ReadLimits, *, max_wait_ms: int) -> ReadOut:
        self.check_serving()
        part = self.partition(name, partition)
        if offset >= part.high_watermark and max_wait_ms > 0:
            await part.wait_for_data(offset, min(max_wait_ms, MAX_WAIT_MS) / 1000)
            if part.closed and self.state == "serving":
                raise TopicNotFound(part.topic)  # deleted while we waited
            # Stopping: answer now with what there is (nothing new can arrive); the
            # logs are closed only once the RPCs in flight have ended.
        return self.read(name, partition, offset, limits)

    def offset_for(self, name: str, partition: int, *, position: str | None = None, timestamp_ms: int | None = None) -> int:
        part = self.partition(name, partition)
        if timestamp_ms is not None:
            return part.offset_for_time(timestamp_ms)
        return part.high_watermark if position == "latest" else part.log_start_offset

    async def subscribe(self, name: str, partition: int, offset: int, limits: ReadLimits) -> AsyncIterator[ReadOut]:
        """Stored frames from ``offset`` on, then new ones as they are appended."""
        self.check_serving()
        part = self.partition(name, partition)
        part.check_offset(offset)
        while True:
            self._check_open(part)
            if offset >= part.high_watermark:
                await part.wait_for_data(offset, None)
                continue
            out = self.read(name, partition, offset, limits)
            offset = out.next_offset
            yield out

    # -- background ----------------------------------------------------------
    def all_partitions(self) -> list[Partition]:
        return [p for t in self.topics.values() for p in t.partitions]

    async def _every(self, interval_ms: int, job) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background job %s failed", getattr(job, "__name__", job))

    async def _flush_interval_topics(self) -> None:
        now = self.clock.now_ms()
        for topic in list(self.topics.values()):
            s = topic.meta.settings
            if s.fsync_policy != "interval":
                continue
            for part in topic.partitions:
                if now - part.last_flush_ms >= s.fsync_interval_ms:
                    part.last_flush_ms = now
                    await self._each(part, "fsync", part.flush())

    async def checkpoint_all(self) -> None:
        """Flush and record each partition's recovery point, so a crash rescans only
        what was written since (this bounds start-up time for every fsync policy)."""
        loop = asyncio.get_running_loop()

        async def one(part: Partition) -> None:
            await part.flush()
            await loop.run_in_executor(self.executor, part.checkpoint)
            await part.write_snapshot(self.clock.now_ms())

        for part in self.all_partitions():
            await self._each(part, "checkpoint", one(part))

    async def repair_failed(self) -> None:
        """Open again, from disk, every partition whose log failed (module docstring)."""
        for part in self.all_partitions():
            if part.failed and not part.closed:
                await self._each(part, "repair", self._repair(part))

    async def _repair(self, part: Partition) -> None:
        failed = part.failed_log()
        topic = self.topics.get(part.topic)
        if failed is None or topic is None or part.repair is not None:
            return
        loop = asyncio.get_running_loop()

        def reopen():
            failed.abandon()  # still refuses every call (LogFailed) while this runs
            return self._load_partition(topic.meta, failed.directory, part.index)

        part.repair = loop.run_in_executor(self.executor, reopen)
        try:
            plog, producers, covers, dedup = await asyncio.shield(part.repair)
        except asyncio.CancelledError:
            raise  # part.repair stays: whoever closes the partition closes what it opened
        except BaseException:
            part.repair = None
            raise
        part.repair = None
        if part.closed or not part.holds(failed):  # deleted or stopped meanwhile
            await loop.run_in_executor(self.executor, plog.close)
            return
        part.replace_log(plog, producers, covers, dedup)
        log.warning("%s/%d: opened again after its failed fsync: %s; log end offset %d", part.topic, part.index,
                    plog.recovery, plog.log_end_offset,
                    extra={"event": "repaired", "topic": part.topic, "partition": part.index})

    async def _end_repair(self, part: Partition) -> None:
        """Before closing a partition: wait for a reopening of its log still running
        (its job cannot be stopped) and close the log it opened, if not taken."""
        job = part.repair
        if job is None:
            return
        try:
            plog = (await asyncio.shield(job))[0]
        except Exception:
            return
        if not part.holds(plog):
            await asyncio.get_running_loop().run_in_executor(self.executor, plog.close)

    async def apply_retention(self) -> None:
        """Delete expired segments; the file work (unlink, fsync) runs in the executor."""
        now = self.clock.now_ms()
        loop = asyncio.get_running_loop()
        for topic in list(self.topics.values()):
            s = topic.meta.settings
            for part in topic.partitions:
                if part.closed:
                    continue
                job = functools.partial(
                    part.apply_retention, now_ms=now, retention_ms=s.retention_ms, retention_bytes=s.retention_bytes
                )
                deleted = await self._each(part, "retention", loop.run_in_executor(self.executor, job))
                if deleted:
                    part.retention_deleted_segments += len(deleted)
                    part.retention_deleted_bytes += sum(d.size_bytes for d in deleted)
                    log.info(
                        "retention deleted %d segment(s) of %s/%d; log start offset now %d",
                        len(deleted), topic.meta.name, part.index, part.log_start_offset,
                        extra={"event": "retention", "topic": topic.meta.name, "partition": part.index,
                               "segments": len(deleted), "log_start_offset": part.log_start_offset},
                    )

    async def _each(self, part: Partition, what: str, work):
        """Run one partition's share of a background job; a failure there is logged
        and never stops the job for the other partitions."""
        if part.closed:
            if asyncio.iscoroutine(work):
                work.close()
            return None
        try:
            result = await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not part.closed:
                quiet = is_disk_full(exc) and what in part.failing_jobs  # said once, until it works again
                if is_disk_full(exc):
                    part.failing_jobs.add(what)
                if not quiet:
                    _log_failure(f"{what} of {part.topic}/{part.index}", exc)
            return None
        if what in part.failing_jobs:
            part.failing_jobs.discard(what)
            log.info("%s of %s/%d works again", what, part.topic, part.index)
        return result


def _note_refusal(part: Partition, exc: BaseException) -> None:
    """Count (metrics) and log, once until it takes appends again, a partition that
    had no room for an append."""
    if not is_disk_full(exc):
        return
    part.disk_full_refusals += 1
    if not part.disk_full:
        part.disk_full = True
        log.warning("%s/%d: %s; produce answers DISK_FULL until there is room", part.topic, part.index, exc,
                    extra={"event": "disk_full", "topic": part.topic, "partition": part.index})


def _note_room(part: Partition) -> None:
    part.disk_full = False
    log.info("%s/%d takes appends again", part.topic, part.index,
             extra={"event": "disk_space", "topic": part.topic, "partition": part.index})


def _undo(done: list[tuple[Partition, int]], exc: BaseException) -> None:
    """Take back what a failed request stored in the partitions before the one that
    refused it. If an undo fails (its log then fails: UNAVAILABLE, so the producer
    retries unchanged), that is the error to answer."""
    undo_failed = None
    for part, start in reversed(done):
        try:
            part.undo(start)
        except Exception as failure:
            undo_failed = failure
    if undo_failed is not None:
        raise undo_failed from exc


def _log_failure(what: str, exc: Exception) -> None:
    """A background job's failure: a full disk (or a failed log) in one line, as it
    repeats until there is room (or the repair job opened the log again); anything
    else with its traceback."""
    if is_disk_full(exc) or isinstance(exc, LogFailed):
        log.warning("%s failed: %s", what, exc, extra={"event": "disk_full" if is_disk_full(exc) else "log_failed"})
    else:
        log.error("%s failed", what, exc_info=exc)


def _scratch_name(topic: str) -> str:
    """A unique @tmp/@deleted entry name for ``topic``; never parsed back (start-up
    removes both directories whole)."""
    return f"{topic[:SCRATCH_PREFIX_CHARS]}.{uuid.uuid4().hex}"


def _partition_in(topic: Topic, partition: int) -> Partition:
    if not 0 <= partition < len(topic.partitions):
        raise PartitionNotFound(topic.meta.name, partition, len(topic.partitions))
    return topic.partitions[partition]


async def _save_producer_state(part: Partition, now_ms: int) -> None:
    """Snapshot the producer state after a batch that only moved a sequence. The
    sequence has moved whatever happens here, so a failure to write (ENOSPC would
    otherwise answer RESOURCE_EXHAUSTED, which a producer reads as "not appended")
    is reported as retryable: the retry is answered as a duplicate."""
    try:
        await part.write_snapshot(now_ms)
    except OSError as exc:
        raise ProducerStateNotSaved(part.topic, part.index, exc) from exc


async def _gather(*aws) -> None:
    await asyncio.gather(*aws)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
