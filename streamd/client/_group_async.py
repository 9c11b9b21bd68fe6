"""``AsyncGroupConsumer``: the one engine of group consumers (the contract is in
``streamd.client.group``'s docstring; ``GroupConsumer`` runs this class on a loop
thread).

State, per assigned partition: ``positions`` (next offset to fetch), ``processed``
(next offset after the last record the caller is done with), ``committed``, and an
epoch bumped whenever the partition is (re)positioned or revoked. One Fetch per
partition is always in flight (``_inflight``), the next one sent as soon as a reply
arrives, before its records are handed out.

Reading goes in rounds of turns (``Turn``: one Fetch reply with records; a round:
the replies that had arrived). ``_rounds`` applies assignments, begins the turns of
the next round (the next Fetch of each partition goes out) and, after the round,
fetches a partition again from the record in hand if the caller left inside its
reply; ``_hand_out`` yields a turn's records and counts whole batches as processed.
Between turns of a round, what arrived meanwhile is applied first
(``_between_turns``), so a revoked partition's turn is skipped.

``_hand_out`` is plain Python with no awaits, so the blocking consumer runs it on the
caller's thread (no thread hop per record, one per round) while the loop thread
touches none of this state: the membership stream and the Fetch calls only queue
events and wake the reader.

Seams for the blocking consumer: ``_call`` (every unary call) and ``_callback``
(``on_assign``/``on_revoke``).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import grpc.aio

from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from ._channel import DEFAULT_TIMEOUT_S, AsyncClient, Security, stub
from ._membership import Event, Membership, StreamEnded
from .consumer import skip_past
from .errors import CorruptRecordsError, StreamdError
from .records import ConsumerRecord, iter_batch

log = logging.getLogger("streamd.client.group")

TopicPartition = tuple[str, int]
#: ``on_assign``/``on_revoke``: called with the partitions; an AsyncGroupConsumer
#: awaits what a callback returns when it is awaitable.
Callback = Callable[[set[TopicPartition]], object]
#: Errors after which joining again can work (server restart, member fenced).
RETRIABLE = {"UNAVAILABLE", "ABORTED", "CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"}
DEFAULT_HEARTBEAT_S = 1.0
IDLE_WAIT_S = 0.02


class Turn:
    """One Fetch reply to hand out: its partition, where the reply starts (``start``),
    the partition's epoch when it began, whether its records started being handed out
    and whether every one was asked past (``finished``)."""

    __slots__ = ("tp", "reply", "start", "epoch", "started", "finished")

    def __init__(self, tp: TopicPartition, reply: pb.FetchResponse, start: int, epoch: int | None) -> None:
        self.tp, self.reply, self.start, self.epoch = tp, reply, start, epoch
        self.started = self.finished = False


class AsyncGroupConsumer(AsyncClient):
    def __init__(
        self,
        group: str,
        topics: Iterable[str] | str,
        server: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
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
        """Joins at once: create it inside a running event loop. ``timeout_s``: the
        deadline of each call (a Fetch: plus ``max_wait_ms``); the membership stream
        has none."""
        if delivery not in ("at-least-once", "at-most-once"):
            raise ValueError("delivery must be 'at-least-once' or 'at-most-once'")
        if start not in ("earliest", "latest"):
            raise ValueError("start must be 'earliest' or 'latest'")
        asyncio.get_running_loop()  # fail before opening anything
        super().__init__(server, channel=channel, security=security, timeout_s=timeout_s)
        self._log = stub(rpc.LogServiceStub, self._channel)
        self._groups = stub(rpc.GroupServiceStub, self._channel)
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
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._inflight: dict[TopicPartition, Any] = {}  # grpc.aio.UnaryUnaryCall of each Fetch
        #: The partitions of this fetch round not looked at yet (None: between rounds).
        self._ready: list[TopicPartition] | None = None
        self._last: ConsumerRecord | None = None
        self._last_commit = time.monotonic()
        #: Bumped per partition when it is (re)positioned or revoked, so a reply being
        #: handed out notices that its partition changed under it.
        self._epochs: dict[TopicPartition, int] = {}
        self._epoch_counter = itertools.count(1)
        self._unapplied: pb.Assignment | None = None
        self._reader: object | None = None  # who iterates records() now (a task)
        self._closed = False
        self._close_requested = False
        self._closed_event = asyncio.Event()
        self._leave: bool | None = None
        self._rejoin_at = 0.0
        self._backoff_s = 0.1
        self._session_timeout_ms = session_timeout_ms
        self._membership: Membership | None = self._join()

    def _join(self) -> Membership:
        first = self._session_timeout_ms / 3000 if self._session_timeout_ms else DEFAULT_HEARTBEAT_S
        return Membership(self._groups, self._join_request, self._events, self._wake, heartbeat_s=first)

    # -- public ---------------------------------------------------------------------
    async def records(self, *, idle_timeout_s: float | None = None) -> AsyncIterator[ConsumerRecord]:
        """Records of the assigned partitions, as they arrive; stops after
        ``idle_timeout_s`` without records (None: never) or when closed."""
        self._reader = asyncio.current_task()
        rounds = self._rounds(idle_timeout_s)
        try:
            async for turns in rounds:
                for turn in turns:
                    if self._close_requested:
                        break
                    if self._between_turns():
                        await self._apply_events()
                    for record in self._hand_out(turn):
                        yield record
        finally:
            await rounds.aclose()
            self._reader = None
            if self._close_requested and not self._closed:
                await self._finish_close()

    async def wait_for_assignment(self, timeout_s: float = 10.0) -> set[TopicPartition]:
        """Apply assignments until one arrives (or ``timeout_s`` passes); the assignment."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.member_id:
            await self._sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            await self._apply_events()
        return set(self.assigned)

    async def poll_assignment(self) -> set[TopicPartition]:
        """Apply any assignment received so far; the current assignment."""
        await self._apply_events()
        return set(self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
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
            await self._commit(self._uncommitted(), explicit=True)
        else:
            await self._commit(offsets, explicit=True)
            for tp, offset in offsets.items():
                if tp in self.assigned:
                    self.processed[tp] = max(self.processed.get(tp, 0), offset)

    async def close(self, *, leave: bool | None = None, timeout_s: float = 30.0) -> None:
        """Commit processed offsets (at-least-once with auto-commit) and leave. A static
        member, by default, does not leave: it keeps its partitions for its session
        timeout, so a restart with the same instance id is not a rebalance.

        Safe to call from another task: the reading task then closes at its next
        reply boundary, and this call waits for it."""
        if self._closed:
            return
        self._leave = leave
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            self._close_requested = True
            self._wake.set()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._closed_event.wait()
                return
            except TimeoutError:
                log.warning("group %s: the reading task did not stop within %.0f s; closing anyway",
                            self.group, timeout_s)
        await self._finish_close()

    # -- seams the blocking GroupConsumer moves to the caller's thread ------------------
    async def _call(self, method: Any, request: Any) -> Any:
        """Every unary call the consumer makes."""
        return await self._calls.acall(method, request)

    async def _callback(self, fn: Callback, tps: set[TopicPartition]) -> None:
        result = fn(tps)
        if inspect.isawaitable(result):
            await result

    # -- reading ----------------------------------------------------------------------
    async def _rounds(self, idle_timeout_s: float | None) -> AsyncGenerator[list[Turn], None]:
        """The fetch rounds to hand out (the turns of the replies that had arrived),
        until idle for ``idle_timeout_s`` or closed. After each round, handed out or
        abandoned, a partition left inside its reply (or never reached) is fetched
        again from the record in hand (or the reply's start)."""
        idle_since = time.monotonic()
        self._ready = None
        while not self._closed and not self._close_requested:
            got = 0
            while turns := await self._next_turns():
                got += sum(len(turn.reply.batches) for turn in turns)
                try:
                    yield turns
                finally:
                    self._end_turns(turns)
                if self._close_requested:
                    break
            if got:
                idle_since = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                return
            await self._maybe_autocommit()

    def _between_turns(self) -> bool:
        """Whether something must be applied before the next turn of a round (an
        assignment arrived, the membership ended): ``_apply_events``, as the turns are
        handed out one by one. Reads only (the blocking consumer asks from its thread)."""
        return self._unapplied is not None or not self._events.empty() or self._membership is None

    def _hand_out(self, turn: Turn) -> Iterator[ConsumerRecord]:
        """The records of ``turn`` (plain Python work only: the blocking consumer runs
        it on the caller's thread, while the loop does nothing with this state)."""
        tp, epoch = turn.tp, turn.epoch
        turn.started = True
        if self._epochs.get(tp) != epoch:  # revoked or reset before its turn came
            turn.finished = True
            return
        for batch in turn.reply.batches:
            for record in iter_batch(batch, tp[0], tp[1], turn.start):
                self._last = record  # the record in hand (cheap: no dict work per record)
                yield record
            self._last = None
            if self._epochs.get(tp) != epoch:
                break  # revoked or reset while we handed the batch out: stop here
            # The caller asked for the record after the batch: it processed all of it.
            self.processed[tp] = batch.base_offset + batch.record_count
        turn.finished = True

    def _end_turns(self, turns: list[Turn]) -> None:
        for turn in turns:
            if not turn.finished and self._epochs.get(turn.tp) == turn.epoch:
                # Left inside the reply (or before it): the rest of it, from the record
                # in hand, is fetched again, so nothing is skipped.
                last = self._last if turn.started else None
                self._refetch(turn.tp, last.offset if last is not None else turn.start)

    async def _next_turns(self) -> list[Turn]:
        """The turns of the next fetch round, in partition order ([] when there is none
        yet, after waiting for a reply, an assignment or a close). An at-most-once
        round is one reply (its batch is committed as its turn begins). Every fetch
        long-polls, so an idle member costs the broker one Fetch per partition per
        ``max_wait_ms``."""
        await self._apply_events()
        if self._ready is None:
            ready = sorted(tp for tp, call in self._inflight.items() if call.done())
            if not ready:
                await self._sleep(IDLE_WAIT_S if self._inflight else IDLE_WAIT_S * 5)
                return []
            self._ready = ready
        elif not self._ready:
            self._ready = None  # every reply of the round was taken: the round is over
            return []
        replies: list[tuple[TopicPartition, pb.FetchResponse]] = []
        failed: list[tuple[TopicPartition, StreamdError]] = []
        limit = 1 if self.delivery == "at-most-once" else len(self._ready)
        while self._ready and len(replies) < limit:
            tp = self._ready.pop(0)
            call = self._inflight.get(tp)
            if call is None or not call.done():
                continue  # revoked or refetched meanwhile
            try:
                if call.cancelled():
                    raise asyncio.CancelledError
                reply: pb.FetchResponse = await call
            except (grpc.RpcError, asyncio.CancelledError) as err:
                if self._closed or self._close_requested:
                    self._ready = None
                    return []
                self._inflight.pop(tp, None)
                if isinstance(err, grpc.RpcError):
                    failed.append((tp, StreamdError.from_rpc_error(err)))
                continue
            if reply.batches:
                replies.append((tp, reply))
            else:
                self._inflight[tp] = self._fetch(tp, self.positions[tp])
        if not self._ready and not replies:
            self._ready = None
        # Failures first: one may raise, and the replies are not begun yet (their
        # calls stay in flight, done, and are read again by the next round).
        for tp, error in failed:
            await self._fetch_failed(tp, error)
        return [await self._begin_turn(tp, reply) for tp, reply in replies]

    async def _begin_turn(self, tp: TopicPartition, reply: pb.FetchResponse) -> Turn:
        turn = Turn(tp, reply, self.positions[tp], self._epochs.get(tp))
        self._inflight[tp] = self._fetch(tp, reply.next_offset)  # the next reply comes while this one is read
        self.positions[tp] = reply.next_offset
        if self.delivery == "at-most-once":
            await self._commit({tp: reply.next_offset})
            self.processed[tp] = reply.next_offset
        return turn

    async def _sleep(self, timeout_s: float) -> None:
        """Wait for a wake-up (a reply, an event, a close) or ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    def _fetch(self, tp: TopicPartition, offset: int, *, max_wait_ms: int | None = None) -> Any:
        wait_ms = self.max_wait_ms if max_wait_ms is None else max_wait_ms
        request = pb.FetchRequest(topic=tp[0], partition=tp[1], offset=offset, max_wait_ms=wait_ms,
                                  max_bytes=self.max_bytes)
        call = self._log.Fetch(request, timeout=self._calls.deadline(wait_s=wait_ms / 1000))
        call.add_done_callback(lambda _: self._wake.set())
        return call

    def _refetch(self, tp: TopicPartition, offset: int) -> None:
        self._cancel_inflight({tp})
        self.positions[tp] = offset
        if not self._closed:
            self._inflight[tp] = self._fetch(tp, offset, max_wait_ms=0)

    async def _fetch_failed(self, tp: TopicPartition, error: StreamdError) -> None:
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
        await asyncio.sleep(IDLE_WAIT_S)
        self._refetch(tp, self.positions[tp])
        if error.code not in RETRIABLE | {"NOT_FOUND"}:
            raise error

    def _cancel_inflight(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            call = self._inflight.pop(tp, None)
            if call is not None:
                call.cancel()

    # -- assignments ----------------------------------------------------------------------
    async def _apply_events(self) -> None:
        if self._membership is None and not self._closed and time.monotonic() >= self._rejoin_at:
            self._membership = self._join()
        while True:
            if self._unapplied is not None:
                event: Event = self._unapplied
                self._unapplied = None
            else:
                try:
                    event = self._events.get_nowait()
                except asyncio.QueueEmpty:
                    return
            if isinstance(event, StreamEnded):
                await self._stream_ended(event.error)
            else:
                try:
                    await self._apply(event)
                except StreamdError:
                    self._unapplied = event  # positioning failed: apply it again next time
                    raise

    async def _apply(self, a: pb.Assignment) -> None:
        new = {(tp.topic, p) for tp in a.partitions for p in tp.partitions}
        newly = new - self.assigned
        added = new if a.offsets_reset else newly
        positions = await self._positions(added) if added else {}  # may raise: nothing has changed yet
        revoked = self.assigned - new
        if revoked:
            await self._revoke(revoked)
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
                await self._callback(self.on_assign, set(newly))
        if self._membership is not None:
            self._membership.ack(a.generation)

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        if self.delivery == "at-least-once" and self.auto_commit_s is not None:
            await self._commit({tp: o for tp, o in self._uncommitted().items() if tp in revoked})
        self._forget(revoked)
        if self.on_revoke is not None:
            await self._callback(self.on_revoke, set(revoked))

    def _forget(self, tps: set[TopicPartition]) -> None:
        self._cancel_inflight(tps)
        for tp in tps:
            self.positions.pop(tp, None)
            self.processed.pop(tp, None)
            self.committed.pop(tp, None)
            self._epochs.pop(tp, None)
        self.assigned -= tps

    async def _positions(self, tps: set[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        """(position, committed offset or -1) for new partitions: the committed offset
        when valid, else ``start``."""
        by_topic: dict[str, list[int]] = {}
        for t, p in tps:
            by_topic.setdefault(t, []).append(p)
        request = pb.FetchOffsetsRequest(
            group=self.group, partitions=[pb.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()]
        )
        fetched: pb.FetchOffsetsResponse = await self._call(self._groups.FetchOffsets, request)
        committed = {(o.topic, o.partition): o.offset for o in fetched.offsets}
        spec = pb.OFFSET_SPEC_LATEST if self.start == "latest" else pb.OFFSET_SPEC_EARLIEST
        out = {}
        for t, ps in by_topic.items():
            listed: pb.ListOffsetsResponse = await self._call(
                self._log.ListOffsets, pb.ListOffsetsRequest(topic=t, partitions=ps, position=spec))
            for o in listed.offsets:
                c = committed.get((t, o.partition), -1)
                out[(t, o.partition)] = (c if o.log_start_offset <= c <= o.log_end_offset else o.offset, c)
        return out

    async def _stream_ended(self, error: StreamdError | None) -> None:
        self._membership = None
        lost = set(self.assigned)
        if lost:  # no commit: we may no longer own them
            self._forget(lost)
            if self.on_revoke is not None:
                await self._callback(self.on_revoke, lost)
        self.member_id, self.generation = "", 0
        if self._closed:
            return
        if error is not None and (error.code not in RETRIABLE or error.reason == "INSTANCE_FENCED"):
            raise error
        log.info("group %s: membership ended (%s); joining again", self.group, error)
        self._rejoin_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, 2.0)

    # -- commits ------------------------------------------------------------------------------
    def _fold_in_hand(self, *, done: bool) -> None:
        """Count the records before the one in hand (and, if ``done``, that one too)
        as processed: the loop was left, or ``commit()`` called, inside a batch."""
        last = self._last
        if last is not None and (last.topic, last.partition) in self.assigned:
            tp = (last.topic, last.partition)
            self.processed[tp] = max(self.processed.get(tp, 0), last.offset + done)

    def _uncommitted(self) -> dict[TopicPartition, int]:
        # Only forward: an explicit commit may already be ahead of what the loop counted.
        return {tp: o for tp, o in self.processed.items() if tp in self.assigned and o > self.committed.get(tp, -1)}

    async def _maybe_autocommit(self) -> None:
        if self.auto_commit_s is None or self.delivery != "at-least-once":
            return
        if time.monotonic() - self._last_commit >= self.auto_commit_s:
            await self._commit(self._uncommitted())

    async def _commit(self, offsets: dict[TopicPartition, int], *, explicit: bool = False) -> None:
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
            await self._call(self._groups.CommitOffsets, request)
        except StreamdError as err:
            if explicit or err.code not in RETRIABLE:
                raise
            log.info("group %s: commit not taken (%s %s); going on", self.group, err.code, err.reason)
            return
        self.committed.update(offsets)

    async def _finish_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_inflight(set(self._inflight))
        try:
            if self.auto_commit_s is not None and self.delivery == "at-least-once" and self.member_id:
                self._fold_in_hand(done=False)
                await self._commit(self._uncommitted())
        finally:
            if self._membership is not None:
                leave = self._leave
                # Bounded by the call deadline: a broker that answers ends the stream at once.
                await self._membership.end(leave=(not self.static) if leave is None else leave,
                                           timeout_s=min(5.0, self.timeout_s))
            await self._close_channel()
            self._closed_event.set()

