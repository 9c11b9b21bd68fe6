"""streamd.v1.GroupService: membership streams, offsets, lag, resets.

Glue between gRPC, the ``Coordinator`` (membership and ownership), the
``OffsetStore`` (committed offsets) and the ``Broker`` (log offsets for range checks,
lag and resets). All decisions live in those; this module validates requests and
converts messages.
"""

from __future__ import annotations

import asyncio
import logging

from consumer_groups import coordinator as coord
from consumer_groups.coordinator import Coordinator, Member, check_group_name
from consumer_groups.errors import (
    GroupNotEmpty,
    GroupNotFound,
    InstanceFenced,
    InvalidGroupRequest,
    MemberFenced,
    NothingToUndo,
)
from consumer_groups.offsets import OffsetStore
from segments import CorruptRecords, OffsetOutOfRange
from streamd.broker.broker import Broker
from streamd.broker.errors import BrokerUnavailable, InvalidArgument
from streamd.v1 import streamd_pb2 as pb

log = logging.getLogger("streamd.groups")

MAX_METADATA_BYTES = 4096
MAX_COMMIT_PARTITIONS = 10_000
STATES = {"empty": pb.GROUP_STATE_EMPTY, "stable": pb.GROUP_STATE_STABLE, "rebalancing": pb.GROUP_STATE_REBALANCING}

TopicPartition = tuple[str, int]


def _grouped(tps) -> list[pb.TopicPartitions]:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(tps):
        by_topic.setdefault(topic, []).append(partition)
    return [pb.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()]


def assignment_message(member: Member, generation: int) -> pb.JoinGroupResponse:
    reset, member.offsets_reset = member.offsets_reset, False
    return pb.JoinGroupResponse(
        assignment=pb.Assignment(
            member_id=member.member_id,
            generation=generation,
            partitions=_grouped(member.assigned),
            heartbeat_interval_ms=member.heartbeat_interval_ms,
            offsets_reset=reset,
        )
    )


class GroupService:
    def __init__(self, broker: Broker, coordinator: Coordinator, store: OffsetStore) -> None:
        self.broker = broker
        self.coordinator = coordinator
        self.store = store
        self._pending_commits: dict[str, set[asyncio.Future]] = {}

    # -- membership -----------------------------------------------------------
    async def JoinGroup(self, read, context) -> None:
        first = await read()
        if first is None:
            return
        self.broker.check_serving()
        if first.WhichOneof("kind") != "join":
            raise InvalidArgument("join", "the first message of a JoinGroup stream must be a MemberJoin")
        j = first.join
        for topic in j.topics:
            self.broker.topic(topic)
        member = self.coordinator.join(
            j.group,
            j.topics,
            instance_id=j.instance_id,
            client_id=j.client_id[:256],
            peer=context.peer() or "",
            session_timeout_ms=j.session_timeout_ms,
            rebalance_timeout_ms=j.rebalance_timeout_ms,
        )
        reader = asyncio.create_task(self._read_member(read, member))
        try:
            await self._push_assignments(member, reader, context)
        finally:
            reader.cancel()
            self.coordinator.disconnected(member)

    async def _push_assignments(self, member: Member, reader: asyncio.Task, context) -> None:
        while True:
            changed = asyncio.ensure_future(member.changed.wait())
            await asyncio.wait([changed, reader], return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if member.removed is not None:
                if member.removed in (coord.LEFT, coord.STREAM_CLOSED):
                    return
                if member.removed == coord.SHUTDOWN:
                    raise BrokerUnavailable("stopping")
                if member.removed == coord.REPLACED:
                    raise InstanceFenced(member.group, member.member_id, member.instance_id)
                raise MemberFenced(member.group, member.member_id, member.removed)
            if reader.done():
                reader.result()  # a bad message ends the stream with its error
                return
            member.changed.clear()
            generation = self.coordinator.groups[member.group].generation
            await context.write(assignment_message(member, generation))

    async def _read_member(self, read, member: Member) -> None:
        while (message := await read()) is not None:
            kind = message.WhichOneof("kind")
            if kind == "heartbeat":
                if member.removed is None:
                    self.coordinator.heartbeat(member, message.heartbeat.generation)
            elif kind == "leave":
                self.coordinator.leave(member)
                return
            else:
                raise InvalidArgument("kind", "after MemberJoin a member sends only Heartbeat or LeaveGroup")

    # -- offsets ----------------------------------------------------------------
    async def CommitOffsets(self, request: pb.CommitOffsetsRequest, context) -> pb.CommitOffsetsResponse:
        self.broker.check_serving()
        check_group_name(request.group)
        if len(request.offsets) > MAX_COMMIT_PARTITIONS:
            raise InvalidGroupRequest("offsets", f"at most {MAX_COMMIT_PARTITIONS} partitions per commit")
        entries: dict[TopicPartition, tuple[int, str]] = {}
        for o in request.offsets:
            part = self.broker.partition(o.topic, o.partition)
            if o.offset < 0:
                raise InvalidArgument("offset", f"must not be negative, not {o.offset}", reason="NEGATIVE_OFFSET")
            if o.offset > part.high_watermark:
                raise OffsetOutOfRange(
                    o.offset, part.log_start_offset, part.high_watermark, name=f"{o.topic}/{o.partition}"
                )
            if len(o.metadata.encode()) > MAX_METADATA_BYTES:
                raise InvalidGroupRequest("metadata", f"at most {MAX_METADATA_BYTES} bytes")
            entries[(o.topic, o.partition)] = (o.offset, o.metadata)
        self.coordinator.check_commit(request.group, request.member_id, request.generation, entries)
        # No await between the check and the store taking the commit: an offset reset
        # (which fences the generation) is ordered either wholly before or after it.
        commit = asyncio.ensure_future(self.store.commit(request.group, entries))
        pending = self._pending_commits.setdefault(request.group, set())
        pending.add(commit)
        commit.add_done_callback(lambda f: self._commit_done(request.group, f))
        await commit
        return pb.CommitOffsetsResponse()

    def _commit_done(self, group: str, commit: asyncio.Future) -> None:
        pending = self._pending_commits.get(group)
        if pending is not None:
            pending.discard(commit)
            if not pending:
                del self._pending_commits[group]

    async def _committed(self, group: str):
        """The group's offsets once every commit accepted so far is durable (a read
        barrier: a new owner never reads an offset its old owner is still writing)."""
        pending = list(self._pending_commits.get(group, ()))
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return self.store.offsets(group)

    async def FetchOffsets(self, request: pb.FetchOffsetsRequest, context) -> pb.FetchOffsetsResponse:
        check_group_name(request.group)
        committed = await self._committed(request.group)
        if request.partitions:
            wanted = [(tp.topic, p) for tp in request.partitions for p in tp.partitions]
        else:
            wanted = sorted(committed)
        response = pb.FetchOffsetsResponse()
        for tp in wanted:
            c = committed.get(tp)
            if c is None:
                response.offsets.add(topic=tp[0], partition=tp[1], offset=-1)
            else:
                response.offsets.add(
                    topic=tp[0], partition=tp[1], offset=c.offset, metadata=c.metadata, commit_time_ms=c.commit_time_ms
                )
        return response

    # -- inspection -------------------------------------------------------------
    def group_topics(self, group: str) -> set[str]:
        """Topics the group has offsets in or members subscribed to (that exist)."""
        g = self.coordinator.groups.get(group)
        topics = {t for t, _ in self.store.offsets(group)}
        if g is not None:
            topics |= g.topics()
        return {t for t in topics if t in self.broker.topics}

    async def DescribeGroup(self, request: pb.DescribeGroupRequest, context) -> pb.DescribeGroupResponse:
        check_group_name(request.group)
        g = self.coordinator.groups.get(request.group)
        committed = self.store.offsets(request.group)
        if g is None and not committed:
            raise GroupNotFound(request.group)
        d = pb.GroupDescription(group=request.group)
        d.state = STATES[g.state] if g is not None else pb.GROUP_STATE_EMPTY
        owners: dict[TopicPartition, str] = {}
        if g is not None:
            d.generation = g.generation
            for m in sorted(g.members.values(), key=lambda m: m.member_id):
                d.members.add(
                    member_id=m.member_id, instance_id=m.instance_id, client_id=m.client_id, peer=m.peer,
                    assignment=_grouped(m.assigned), revoking=_grouped(m.revoking), topics=sorted(m.topics),
                    last_heartbeat_ms=m.last_seen_ms, connected=m.connected,
                )
                owners.update({tp: m.member_id for tp in m.assigned | m.revoking})
        now = self.broker.clock.now_ms()
        for topic in sorted(self.group_topics(request.group)):
            for p in range(len(self.broker.topics[topic].partitions)):
                d.partitions.append(self.partition_lag(topic, p, committed.get((topic, p)), owners.get((topic, p), ""), now))
        return pb.DescribeGroupResponse(group=d)

    def partition_lag(self, topic: str, p: int, committed, owner: str, now: int) -> pb.PartitionLag:
        """Lag of a group at ``committed`` (None: nothing committed) on one partition:
        records to the high watermark and the age of the first of them."""
        part = self.broker.partition(topic, p)
        start, end = part.log_start_offset, part.high_watermark
        position = max(committed.offset, start) if committed is not None else start
        lag = max(0, end - position)
        lag_ms = 0
        if lag:
            try:
                first = part.append_time_at(position)
            except CorruptRecords:  # the log reported it; lag in records is still right
                pass
            except Exception as exc:  # lag in records is still worth showing
                log.warning("lag time of %s/%d: %s", topic, p, exc)
            else:
                lag_ms = max(0, now - first) if first is not None else 0
        return pb.PartitionLag(
            topic=topic, partition=p, committed_offset=committed.offset if committed is not None else -1,
            log_start_offset=start, log_end_offset=end, lag=lag, lag_ms=lag_ms, member_id=owner,
            metadata=committed.metadata if committed is not None else "",
        )

    async def ListGroups(self, request: pb.ListGroupsRequest, context) -> pb.ListGroupsResponse:
        names = set(self.store.groups()) | set(self.coordinator.groups)
        response = pb.ListGroupsResponse()
        for name in sorted(names):
            g = self.coordinator.groups.get(name)
            response.groups.add(
                group=name,
                state=STATES[g.state] if g is not None else pb.GROUP_STATE_EMPTY,
                member_count=len(g.members) if g is not None else 0,
                topics=sorted(self.group_topics(name)),
            )
        return response

    async def DeleteGroup(self, request: pb.DeleteGroupRequest, context) -> pb.DeleteGroupResponse:
        self.broker.check_serving()
        check_group_name(request.group)
        members = self.coordinator.live_members(request.group)
        if members:
            raise GroupNotEmpty(request.group, members, "stop its consumers before deleting it")
        if not self.store.offsets(request.group) and self.store.undo_offsets(request.group) is None:
            raise GroupNotFound(request.group)
        await self.store.delete_group(request.group)
        return pb.DeleteGroupResponse()

    # -- resets -------------------------------------------------------------------
    async def ResetOffsets(self, request: pb.ResetOffsetsRequest, context) -> pb.ResetOffsetsResponse:
        self.broker.check_serving()
        check_group_name(request.group)
        plan = self._plan(request)
        response = pb.ResetOffsetsResponse(plan=plan)
        if not request.execute or not plan:
            return response
        # Shielded: a client that gives up (deadline, Ctrl-C) must not leave the group
        # fenced and its members untold.
        await asyncio.shield(asyncio.ensure_future(self._apply_reset(request, plan, response)))
        return response

    async def _apply_reset(self, request, plan, response: pb.ResetOffsetsResponse) -> None:
        group = request.group
        # Fence first: from here until notify_reset every member commit is refused, so
        # nothing in flight can overwrite the new offsets.
        response.generation = self.coordinator.fence(group)
        try:
            if request.WhichOneof("target") != "undo":
                await self.store.save_undo(group, {(e.topic, e.partition): e.old_offset for e in plan})
            forget = {(e.topic, e.partition) for e in plan if e.new_offset < 0}  # undo to "nothing committed"
            metadata = self.store.offsets(group)
            await self.store.commit(
                group,
                {
                    (e.topic, e.partition): (e.new_offset, getattr(metadata.get((e.topic, e.partition)), "metadata", ""))
                    for e in plan
                    if e.new_offset >= 0
                },
            )
            if forget:
                await self.store.delete_partitions(group, forget)
            response.executed = True
            log.info("group %s: reset %d partition offset(s)", group, len(plan))
        finally:
            self.coordinator.notify_reset(group)

    def _reset_partitions(self, request: pb.ResetOffsetsRequest) -> list[TopicPartition]:
        if request.all_topics:
            topics = self.group_topics(request.group)
            if not topics:
                raise GroupNotFound(request.group)
            return [(t, p) for t in sorted(topics) for p in range(len(self.broker.topics[t].partitions))]
        if not request.partitions:
            raise InvalidGroupRequest("partitions", "name the partitions to reset, or set all_topics")
        out = []
        for tps in request.partitions:
            topic = self.broker.topic(tps.topic)
            for p in tps.partitions or range(len(topic.partitions)):
                self.broker.partition(tps.topic, p)
                out.append((tps.topic, p))
        return sorted(set(out))

    def _plan(self, request: pb.ResetOffsetsRequest) -> list[pb.OffsetResetPlan]:
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidGroupRequest("target", "say where to move the offsets")
        committed = self.store.offsets(request.group)
        undo = self.store.undo_offsets(request.group) if target == "undo" else None
        if target == "undo" and undo is None:
            raise NothingToUndo(request.group)
        if target == "undo" and (request.all_topics or not request.partitions):
            tps = sorted(tp for tp in undo if tp[0] in self.broker.topics)
        else:
            tps = self._reset_partitions(request)
        now = self.broker.clock.now_ms()
        plan = []
        for topic, p in tps:
            part = self.broker.partition(topic, p)
            start, end = part.log_start_offset, part.high_watermark
            c = committed.get((topic, p))
            old = c.offset if c is not None else -1
            if target == "undo":
                if (topic, p) not in undo:
                    continue
                wanted = undo[(topic, p)]
            else:
                wanted = self._target(request, topic, p, old, start, end, now)
            # -1 ("nothing committed") only comes back through undo; any other target clamps.
            new = wanted if target == "undo" and wanted < 0 else min(max(wanted, start), end)
            plan.append(
                pb.OffsetResetPlan(
                    topic=topic, partition=p, old_offset=old, new_offset=new, requested_offset=wanted,
                    clamped=new != wanted, log_start_offset=start, log_end_offset=end,
                )
            )
        return plan

    def _target(self, request, topic: str, p: int, old: int, start: int, end: int, now: int) -> int:
        target = request.WhichOneof("target")
        if target == "position":
            if request.position == pb.OFFSET_SPEC_LATEST:
                return end
            if request.position == pb.OFFSET_SPEC_EARLIEST:
                return start
            raise InvalidGroupRequest("position", "must be EARLIEST or LATEST")
        if target == "offset":
            if request.offset < 0:
                raise InvalidArgument("offset", f"must not be negative, not {request.offset}", reason="NEGATIVE_OFFSET")
            return request.offset
        if target == "shift_by":
            return (old if old >= 0 else start) + request.shift_by
        if target == "timestamp_ms":
            return self.broker.offset_for(topic, p, timestamp_ms=request.timestamp_ms)
        if request.duration_ms < 0:
            raise InvalidGroupRequest("duration_ms", "must not be negative")
        return self.broker.offset_for(topic, p, timestamp_ms=now - request.duration_ms)

    # -- housekeeping ---------------------------------------------------------------
    async def forget_topic(self, topic: str) -> None:
        """Before a topic is deleted: its offsets go first, so a failure leaves the
        topic (and a retry possible), never a re-created topic inheriting old offsets."""
        await self.store.delete_topic(topic)

    def topic_deleted(self, topic: str) -> None:
        self.coordinator.topics_changed(topic)

    async def purge_missing_topics(self) -> None:
        """At start-up: offsets of topics deleted while a crash kept the journal from
        hearing of it."""
        for topic in sorted(self.store.topics() - set(self.broker.topics)):
            log.info("deleting committed offsets of topic %s, which no longer exists", topic)
            await self.store.delete_topic(topic)

    def topic_created(self, topic: str) -> None:
        self.coordinator.topics_changed(topic)


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
