"""streamd.v1.GroupService: membership streams, offsets, lag, resets.

Glue between gRPC and ``consumer_groups``: the ``Coordinator`` (membership and
ownership), the ``OffsetStore`` (committed offsets), ``GroupView`` (the topics a
group covers, lag) and ``reset`` (reset plans and their execution), with the
``Broker`` for the range check of a commit. All decisions live in those; this module
validates requests and converts messages.
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
)
from consumer_groups.lag import GroupView, PartitionLag
from consumer_groups.offsets import OffsetStore
from consumer_groups.reset import ResetTarget, apply_reset, plan_reset
from segments import OffsetOutOfRange
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
        #: The read side the metrics scrape shares: topics of a group, lag.
        self.view = GroupView(broker, coordinator, store)
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
        for lag in self.view.group_lag(request.group, self.broker.clock.now_ms()):
            d.partitions.append(_lag_pb(lag, owners.get((lag.topic, lag.partition), "")))
        return pb.DescribeGroupResponse(group=d)

    async def ListGroups(self, request: pb.ListGroupsRequest, context) -> pb.ListGroupsResponse:
        response = pb.ListGroupsResponse()
        for name in self.view.names():
            g = self.coordinator.groups.get(name)
            response.groups.add(
                group=name,
                state=STATES[g.state] if g is not None else pb.GROUP_STATE_EMPTY,
                member_count=len(g.members) if g is not None else 0,
                topics=sorted(self.view.topics(name)),
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
        target = _reset_target(request)
        planned = plan_reset(self.view, request.group, target, all_topics=request.all_topics,
                             requested=[(tps.topic, list(tps.partitions)) for tps in request.partitions])
        plan = [
            pb.OffsetResetPlan(
                topic=e.topic, partition=e.partition, old_offset=e.old_offset, new_offset=e.new_offset,
                requested_offset=e.requested_offset, clamped=e.clamped, log_start_offset=e.log_start_offset,
                log_end_offset=e.log_end_offset,
            )
            for e in planned
        ]
        response = pb.ResetOffsetsResponse(plan=plan)
        if not request.execute or not plan:
            return response
        # Shielded: a client that gives up (deadline, Ctrl-C) must not leave the group
        # fenced and its members untold.
        response.generation = await asyncio.shield(
            asyncio.ensure_future(apply_reset(self.view, request.group, planned, undo=target.kind == "undo"))
        )
        response.executed = True
        return response

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


def _reset_target(request: pb.ResetOffsetsRequest) -> ResetTarget:
    kind = request.WhichOneof("target")
    if kind is None:
        raise InvalidGroupRequest("target", "say where to move the offsets")
    if kind == "position":
        position = {pb.OFFSET_SPEC_LATEST: "latest", pb.OFFSET_SPEC_EARLIEST: "earliest"}.get(request.position, "")
        return ResetTarget(kind, position=position)
    return ResetTarget(kind, 0 if kind == "undo" else getattr(request, kind))


def _lag_pb(lag: PartitionLag, owner: str) -> pb.PartitionLag:
    return pb.PartitionLag(
        topic=lag.topic, partition=lag.partition, committed_offset=lag.committed_offset,
        log_start_offset=lag.log_start_offset, log_end_offset=lag.log_end_offset, lag=lag.lag, lag_ms=lag.lag_ms,
        member_id=owner, metadata=lag.metadata,
    )
