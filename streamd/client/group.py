"""GroupConsumer: read a topic's partitions as one member of a consumer group.

The broker assigns partitions (see the GroupService comment in the proto). This class
keeps the membership stream open on a background thread (it sends heartbeats and
queues each assignment it receives); the reading thread applies assignments between
fetches, so records, commits and callbacks all happen on the caller's thread:

- revoked partitions: their processed offsets are committed (at-least-once), the
  ``on_revoke`` callback runs, then the member acknowledges the generation so the
  broker can hand the partitions on;
- new partitions: reading starts at the group's committed offset, or at ``start``
  ("earliest"/"latest") when nothing is committed (or the commit is older than the
  log start), then ``on_assign`` runs;
- an operator reset (``offsets_reset``): every partition restarts from the
  committed offsets.

Delivery: ``"at-least-once"`` (default) counts a record as processed once the caller
asks for the next one, and commits processed offsets every ``auto_commit_interval_ms``,
on revocation and on close (so the record in hand when the loop was left is read
again by the next owner); ``commit()`` with no argument also commits the record in
hand. ``"at-most-once"`` commits each fetched batch before its
records are handed out. With ``auto_commit_interval_ms=None`` call ``commit()``.

A commit that the broker refuses as stale (the partition moved, or an operator reset
fenced the generation) is dropped: the partition's new owner, or the reset, decides
where reading continues.

Damaged records (DATA_LOSS / CORRUPT_BATCH): the records before them are handed out,
then ``records()`` raises ``CorruptRecordsError`` (and again on each call while the
partition stays there). With ``skip_corrupt=True`` the member goes on at the range's
``next_offset``, logs a warning, and counts the range as processed, so the next
commit moves past it and the partition's next owner does not stop there either.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc

from streamd.v1 import streamd_pb2 as pb

from ._channel import DEFAULT_TIMEOUT_S, Security, SyncClient
from .consumer import fetch_future, skip_past
from .errors import CorruptRecordsError, StreamdError
from .records import ConsumerRecord, iter_batch

log = logging.getLogger("streamd.client.group")

TopicPartition = tuple[str, int]
Callback = Callable[[set[TopicPartition]], None]
#: Errors after which joining again can work (server restart, member fenced).
RETRIABLE = {"UNAVAILABLE", "ABORTED", "CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"}
DEFAULT_HEARTBEAT_S = 1.0
IDLE_WAIT_S = 0.02


class _StreamEnded:
    def __init__(self, error: StreamdError | None) -> None:
        self.error = error


class _Membership:
    """One JoinGroup stream: a sender generator fed from a queue, and a receiving
    thread that queues every message (or the end of the stream) for the reader."""

    def __init__(
        self, stub, join: pb.MemberJoin, events: queue.Queue, wake: threading.Event, *, heartbeat_s: float
    ) -> None:
        self.events, self.wake = events, wake
        self.outbox: queue.Queue = queue.Queue()
        self.heartbeat_s = heartbeat_s
        self.applied_generation = 0
        self.outbox.put(pb.JoinGroupRequest(join=join))
        self.call = stub.JoinGroup(self._requests())
        self.thread = threading.Thread(target=self._receive, name="streamd-group", daemon=True)
        self.thread.start()

    def _requests(self) -> Iterator[pb.JoinGroupRequest]:
        while True:
            try:
                item = self.outbox.get(timeout=self.heartbeat_s)
            except queue.Empty:
                item = self.heartbeat()
            if item is None:
                return
            yield item

    def heartbeat(self) -> pb.JoinGroupRequest:
        return pb.JoinGroupRequest(heartbeat=pb.Heartbeat(generation=self.applied_generation))

    def _receive(self) -> None:
        error = None
        try:
            for message in self.call:
                interval = message.assignment.heartbeat_interval_ms / 1000
                if interval and interval != self.heartbeat_s:
                    self.heartbeat_s = interval
                    self.outbox.put(self.heartbeat())  # wakes the sender to use it
                self.events.put(message.assignment)
                self.wake.set()
        except grpc.RpcError as err:
            error = StreamdError.from_rpc_error(err)
        self.events.put(_StreamEnded(error))
        self.wake.set()

    def ack(self, generation: int) -> None:
        self.applied_generation = generation
        self.outbox.put(self.heartbeat())

    def end(self, *, leave: bool, timeout_s: float = 5.0) -> None:
        if leave:
            self.outbox.put(pb.JoinGroupRequest(leave=pb.LeaveGroup()))
        self.outbox.put(None)
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.call.cancel()
            self.thread.join(timeout_s)


class GroupConsumer(SyncClient):
    def __init__(
        self,
        group: str,
        topics: Iterable[str] | str,
        server: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        security: Security | None = None,
        instance_id: str = "",
        client_id: str = "",
        session_timeout_ms: int = 0,
        rebalance_timeout_ms: int = 0,
        auto_commit_interval_ms: int | None = 1000,
        delivery: str = "at-least-once",
        start: str = "earliest",
        on_assign: Callback | None = None,
        on_revoke: Callback | None = None,
        max_wait_ms: int = 200,
        max_bytes: int = 0,
        skip_corrupt: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """``timeout_s``: the deadline of each call (a Fetch: plus ``max_wait_ms``); the
        membership stream has none."""
        if delivery not in ("at-least-once", "at-most-once"):
            raise ValueError("delivery must be 'at-least-once' or 'at-most-once'")
        if start not in ("earliest", "latest"):
            raise ValueError("start must be 'earliest' or 'latest'")
        super().__init__(server, channel=channel, security=security, timeout_s=timeout_s)
        self.group = group
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self._join_request = pb.MemberJoin(
            group=group, topics=self.topics, instance_id=instance_id, client_id=client_id,
            session_timeout_ms=session_timeout_ms, rebalance_timeout_ms=rebalance_timeout_ms,
        )
        self.static = bool(instance_id)
        self.delivery, self.start = delivery, start
        self.auto_commit_s = None if auto_commit_interval_ms is None else auto_commit_interval_ms / 1000
        self.on_assign, self.on_revoke = on_assign, on_revoke
        self.max_wait_ms, self.max_bytes = max_wait_ms, max_bytes
        self.skip_corrupt = skip_corrupt
        self.member_id, self.generation = "", 0
        #: Partitions owned now; next offset to fetch; next offset after the last
        #: processed record; last committed offset.
        self.assigned: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.processed: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self._events: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._inflight: dict[TopicPartition, grpc.Future] = {}
        self._last: ConsumerRecord | None = None
        self._last_commit = time.monotonic()
        #: Bumped per partition when it is (re)positioned or revoked, so a reply being
        #: handed out notices that its partition changed under it.
        self._epochs: dict[TopicPartition, int] = {}
        self._epoch_counter = itertools.count(1)
        self._unapplied: pb.Assignment | None = None
        self._reader: int | None = None
        self._closed = False
        self._close_requested = False
        self._closed_event = threading.Event()
        self._leave: bool | None = None
        self._rejoin_at = 0.0
        self._backoff_s = 0.1
        self._session_timeout_ms = session_timeout_ms
        self._membership: _Membership | None = self._join()

    def _join(self) -> _Membership:
        first = self._session_timeout_ms / 3000 if self._session_timeout_ms else DEFAULT_HEARTBEAT_S
        return _Membership(self._groups, self._join_request, self._events, self._wake, heartbeat_s=first)

    # -- public ---------------------------------------------------------------------
    def records(self, *, idle_timeout_s: float | None = None) -> Iterator[ConsumerRecord]:
        """Records of the assigned partitions, as they arrive; stops after
        ``idle_timeout_s`` without records (None: never) or when closed. Leaving the
        loop inside a reply is safe: reading resumes at the record in hand."""
        idle_since = time.monotonic()
        self._reader = threading.get_ident()
        try:
            while not self._closed and not self._close_requested:
                got = 0
                for tp, reply in self._fetch_round():
                    got += len(reply.batches)
                    yield from self._hand_out(tp, reply)
                    if self._close_requested:
                        break
                if got:
                    idle_since = time.monotonic()
                elif idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                    return
                self._maybe_autocommit()
        finally:
            self._reader = None
            if self._close_requested and not self._closed:
                self._finish_close()

    def _hand_out(self, tp: TopicPartition, reply: pb.FetchResponse) -> Iterator[ConsumerRecord]:
        epoch = self._epochs.get(tp)
        start = self.positions[tp]
        self.positions[tp] = reply.next_offset
        if self.delivery == "at-most-once":
            self._commit({tp: reply.next_offset})
            self.processed[tp] = reply.next_offset
        finished = False
        try:
            for batch in reply.batches:
                for record in iter_batch(batch, tp[0], tp[1], start):
                    self._last = record  # the record in hand (cheap: no dict work per record)
                    yield record
                self._last = None
                if self._epochs.get(tp) != epoch:
                    break  # revoked or reset while we handed the batch out: stop here
                # The caller asked for the record after the batch: it processed all of it.
                self.processed[tp] = batch.base_offset + batch.record_count
            finished = True
        finally:
            if not finished and self._epochs.get(tp) == epoch:
                # Left inside the reply: the rest of it (from the record in hand) is
                # fetched again, so nothing is skipped.
                last = self._last
                self._refetch(tp, last.offset if last is not None else start)

    def wait_for_assignment(self, timeout_s: float = 10.0) -> set[TopicPartition]:
        """Apply assignments until one arrives (or ``timeout_s`` passes); the assignment."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.member_id:
            self._wake.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            self._wake.clear()
            self._apply_events()
        return set(self.assigned)

    def poll_assignment(self) -> set[TopicPartition]:
        """Apply any assignment received so far; the current assignment."""
        self._apply_events()
        return set(self.assigned)

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Commit ``offsets``; by default everything handed out so far, including the
        last record (the caller says it is done with it)."""
        if offsets is None:
            self._fold_in_hand(done=True)
            last = self._last
            if last is not None and self.positions.get((last.topic, last.partition)) == last.offset:
                # The loop was left holding this record (reading would resume at it),
                # and the caller now says it is done: resume after it.
                self._refetch((last.topic, last.partition), last.offset + 1)
                self._last = None
            self._commit(self._uncommitted(), explicit=True)
        else:
            self._commit(offsets, explicit=True)
            for tp, offset in offsets.items():
                if tp in self.assigned:
                    self.processed[tp] = max(self.processed.get(tp, 0), offset)

    def _fold_in_hand(self, *, done: bool) -> None:
        """Count the records before the one in hand (and, if ``done``, that one too)
        as processed: the loop was left, or ``commit()`` called, inside a batch."""
        last = self._last
        if last is not None and (last.topic, last.partition) in self.assigned:
            tp = (last.topic, last.partition)
            self.processed[tp] = max(self.processed.get(tp, 0), last.offset + done)

    def close(self, *, leave: bool | None = None, timeout_s: float = 30.0) -> None:
        """Commit processed offsets (at-least-once with auto-commit) and leave. A static
        member, by default, does not leave: it keeps its partitions for its session
        timeout, so a restart with the same instance id is not a rebalance.

        Safe to call from another thread (a signal handler, a stop hook): the reading
        thread then closes at its next batch boundary, and this call waits for it."""
        if self._closed:
            return
        self._leave = leave
        reader = self._reader
        if reader is not None and reader != threading.get_ident():
            self._close_requested = True
            self._wake.set()
            if self._closed_event.wait(timeout_s):
                return
            log.warning("group %s: the reading thread did not stop within %.0f s; closing anyway",
                        self.group, timeout_s)
        self._finish_close()

    def _finish_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_inflight(set(self._inflight))
        try:
            if self.auto_commit_s is not None and self.delivery == "at-least-once" and self.member_id:
                self._fold_in_hand(done=False)
                self._commit(self._uncommitted())
        finally:
            if self._membership is not None:
                leave = self._leave
                # Bounded by the call deadline: a broker that answers ends the stream at once.
                self._membership.end(leave=(not self.static) if leave is None else leave,
                                     timeout_s=min(5.0, self.timeout_s))
            super().close()
            self._closed_event.set()

    # -- fetching -------------------------------------------------------------------------
    def _fetch_round(self) -> Iterator[tuple[TopicPartition, pb.FetchResponse]]:
        """The replies that have arrived, in partition order; waits (for a reply, an
        assignment or a close) when none has. Every fetch long-polls, so an idle
        member costs the broker one Fetch per partition per ``max_wait_ms``."""
        self._apply_events()
        ready = sorted(tp for tp, f in self._inflight.items() if f.done())
        if not ready:
            self._wake.wait(IDLE_WAIT_S if self._inflight else IDLE_WAIT_S * 5)
            self._wake.clear()
            return
        for tp in ready:
            future = self._inflight.get(tp)
            if future is None or not future.done():
                continue  # revoked or refetched meanwhile
            try:
                reply = future.result()
            except (grpc.RpcError, grpc.FutureCancelledError) as err:
                if self._closed or self._close_requested:
                    return
                self._inflight.pop(tp, None)
                if isinstance(err, grpc.RpcError):
                    self._fetch_failed(tp, StreamdError.from_rpc_error(err))
                continue
            if reply.batches:
                self._inflight[tp] = self._fetch(tp, reply.next_offset)
                yield tp, reply
            else:
                self._inflight[tp] = self._fetch(tp, self.positions[tp])
            self._apply_events()

    def _fetch(self, tp: TopicPartition, offset: int, *, max_wait_ms: int | None = None) -> grpc.Future:
        wait_ms = self.max_wait_ms if max_wait_ms is None else max_wait_ms
        future = fetch_future(
            self._log, tp, offset, max_wait_ms=wait_ms, max_bytes=self.max_bytes,
            timeout=self._calls.deadline(wait_s=wait_ms / 1000),
        )
        future.add_done_callback(lambda _: self._wake.set())
        return future

    def _refetch(self, tp: TopicPartition, offset: int) -> None:
        self._cancel_inflight({tp})
        self.positions[tp] = offset
        if not self._closed:
            self._inflight[tp] = self._fetch(tp, offset, max_wait_ms=0)

    def _fetch_failed(self, tp: TopicPartition, error: StreamdError) -> None:
        if tp not in self.assigned:
            return
        if isinstance(error, CorruptRecordsError) and self.skip_corrupt:
            offset = skip_past(error, True)
            if self.processed.get(tp) == self.positions[tp]:  # everything before it was processed
                self.processed[tp] = max(self.processed[tp], offset)
            self._refetch(tp, offset)
            return
        if error.code == "OUT_OF_RANGE":
            # Retention passed our position (or the offset was never valid): restart
            # from the log start, as Kafka's auto.offset.reset=earliest does.
            start = int(error.metadata.get("log_start_offset", "0"))
            log.warning("%s/%d: offset %d out of range; continuing at %d", *tp, self.positions[tp], start)
            self._refetch(tp, start)
            return
        # Keep the partition alive either way (retried after a pause), so a caller that
        # catches a non-retriable error can go on reading the others.
        time.sleep(IDLE_WAIT_S)
        self._refetch(tp, self.positions[tp])
        if error.code not in RETRIABLE | {"NOT_FOUND"}:
            raise error

    def _cancel_inflight(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            future = self._inflight.pop(tp, None)
            if future is not None:
                future.cancel()

    # -- assignments ----------------------------------------------------------------------
    def _apply_events(self) -> None:
        if self._membership is None and not self._closed and time.monotonic() >= self._rejoin_at:
            self._membership = self._join()
        while True:
            if self._unapplied is not None:
                event, self._unapplied = self._unapplied, None
            else:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    return
            if isinstance(event, _StreamEnded):
                self._stream_ended(event.error)
            else:
                try:
                    self._apply(event)
                except StreamdError:
                    self._unapplied = event  # positioning failed: apply it again next time
                    raise

    def _apply(self, a: pb.Assignment) -> None:
        new = {(tp.topic, p) for tp in a.partitions for p in tp.partitions}
        newly = new - self.assigned
        added = new if a.offsets_reset else newly
        if added:
            positions = self._positions(added)  # may raise: nothing has changed yet
        revoked = self.assigned - new
        if revoked:
            self._revoke(revoked)
        self.member_id, self.generation = a.member_id, a.generation
        self._backoff_s = 0.1
        self.assigned = new
        if added:
            self._cancel_inflight(added)
            for tp, (position, committed) in positions.items():
                self._epochs[tp] = next(self._epoch_counter)
                self.positions[tp] = self.processed[tp] = position
                if committed >= 0:
                    self.committed[tp] = committed
                else:
                    self.committed.pop(tp, None)
                self._inflight[tp] = self._fetch(tp, position, max_wait_ms=0)
            if newly and self.on_assign is not None:
                self.on_assign(set(newly))
        if self._membership is not None:
            self._membership.ack(a.generation)

    def _revoke(self, revoked: set[TopicPartition]) -> None:
        if self.delivery == "at-least-once" and self.auto_commit_s is not None:
            self._commit({tp: o for tp, o in self._uncommitted().items() if tp in revoked})
        self._forget(revoked)
        if self.on_revoke is not None:
            self.on_revoke(set(revoked))

    def _forget(self, tps: set[TopicPartition]) -> None:
        self._cancel_inflight(tps)
        for tp in tps:
            self.positions.pop(tp, None)
            self.processed.pop(tp, None)
            self.committed.pop(tp, None)
            self._epochs.pop(tp, None)
        self.assigned -= tps

    def _positions(self, tps: set[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        """(position, committed offset or -1) for new partitions: the committed offset
        when valid, else ``start``."""
        by_topic: dict[str, list[int]] = {}
        for t, p in tps:
            by_topic.setdefault(t, []).append(p)
        request = pb.FetchOffsetsRequest(
            group=self.group, partitions=[pb.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()]
        )
        committed = {(o.topic, o.partition): o.offset for o in self._call(self._groups.FetchOffsets, request).offsets}
        spec = pb.OFFSET_SPEC_LATEST if self.start == "latest" else pb.OFFSET_SPEC_EARLIEST
        out = {}
        for t, ps in by_topic.items():
            reply = self._call(self._log.ListOffsets, pb.ListOffsetsRequest(topic=t, partitions=ps, position=spec))
            for o in reply.offsets:
                c = committed.get((t, o.partition), -1)
                out[(t, o.partition)] = (c if o.log_start_offset <= c <= o.log_end_offset else o.offset, c)
        return out

    def _stream_ended(self, error: StreamdError | None) -> None:
        self._membership = None
        lost = set(self.assigned)
        if lost:  # no commit: we may no longer own them
            self._forget(lost)
            if self.on_revoke is not None:
                self.on_revoke(lost)
        self.member_id, self.generation = "", 0
        if self._closed:
            return
        if error is not None and (error.code not in RETRIABLE or error.reason == "INSTANCE_FENCED"):
            raise error
        log.info("group %s: membership ended (%s); joining again", self.group, error)
        self._rejoin_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, 2.0)

    # -- commits ------------------------------------------------------------------------------
    def _uncommitted(self) -> dict[TopicPartition, int]:
        # Only forward: an explicit commit may already be ahead of what the loop counted.
        return {tp: o for tp, o in self.processed.items() if tp in self.assigned and o > self.committed.get(tp, -1)}

    def _maybe_autocommit(self) -> None:
        if self.auto_commit_s is None or self.delivery != "at-least-once":
            return
        if time.monotonic() - self._last_commit >= self.auto_commit_s:
            self._commit(self._uncommitted())

    def _commit(self, offsets: dict[TopicPartition, int], *, explicit: bool = False) -> None:
        """Commit; a refusal or a transient failure of an automatic commit (interval,
        revocation, close) is logged and dropped: it costs duplicates, never records."""
        self._last_commit = time.monotonic()
        if not offsets or not self.member_id:
            return
        request = pb.CommitOffsetsRequest(
            group=self.group,
            member_id=self.member_id,
            generation=self.generation,
            offsets=[pb.OffsetCommit(topic=t, partition=p, offset=o) for (t, p), o in offsets.items()],
        )
        try:
            self._call(self._groups.CommitOffsets, request)
        except StreamdError as err:
            if explicit or err.code not in RETRIABLE:
                raise
            log.info("group %s: commit not taken (%s %s); going on", self.group, err.code, err.reason)
            return
        self.committed.update(offsets)
