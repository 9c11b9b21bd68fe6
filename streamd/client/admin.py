"""Topic and group administration: create, delete, list, describe, offsets, resets.

``AsyncAdmin`` (asyncio) is the client; ``Admin`` runs one on a private event-loop
thread for blocking code (``_loop``), method for method: every method of
``AsyncAdmin`` is a method of ``Admin`` with the same arguments, returning what the
coroutine returns (a test holds the two lists equal).

Every method takes ``timeout_s=`` (seconds; default: the client's ``timeout_s``,
30 s) and raises StreamdError ``DEADLINE_EXCEEDED``/``TIMED_OUT`` when no answer
came within it (``streamd.client._channel``)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import grpc.aio

from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from ._channel import DEFAULT_TIMEOUT_S, AsyncClient, Security, stub
from ._loop import LoopThread

FSYNC = {
    "always": pb.FSYNC_POLICY_ALWAYS,
    "interval": pb.FSYNC_POLICY_INTERVAL,
    "never": pb.FSYNC_POLICY_NEVER,
}
COMPRESSION = {"producer": pb.COMPRESSION_UNSPECIFIED, "none": pb.COMPRESSION_NONE, "lz4": pb.COMPRESSION_LZ4}

P = ParamSpec("P")
T = TypeVar("T")


class AsyncAdmin(AsyncClient):
    def __init__(self, server: str | None = None, *, channel: grpc.aio.Channel | None = None,
                 security: Security | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """``security``: TLS files and token (default: from ``STREAMD_TLS_*``/``STREAMD_TOKEN``).
        ``timeout_s``: the default deadline of each call (see the module docstring)."""
        super().__init__(server, channel=channel, security=security, timeout_s=timeout_s)
        self._topics = stub(rpc.TopicServiceStub, self._channel)
        self._log = stub(rpc.LogServiceStub, self._channel)
        self._groups = stub(rpc.GroupServiceStub, self._channel)

    # -- topics -------------------------------------------------------------------
    async def create_topic(
        self,
        topic: str,
        partitions: int = 1,
        *,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        segment_bytes: int | None = None,
        segment_ms: int | None = None,
        max_record_bytes: int | None = None,
        fsync: str | None = None,
        fsync_interval_ms: int | None = None,
        compression: str | None = None,
        dedup_window_ms: int | None = None,
        timeout_s: float | None = None,
    ) -> pb.TopicDescription:
        config = pb.TopicConfig(
            retention_ms=retention_ms,
            retention_bytes=retention_bytes,
            segment_bytes=segment_bytes,
            segment_ms=segment_ms,
            max_record_bytes=max_record_bytes,
            fsync_policy=FSYNC[fsync] if fsync else None,
            fsync_interval_ms=fsync_interval_ms,
            compression=COMPRESSION[compression] if compression else None,
            dedup_window_ms=dedup_window_ms,
        )
        request = pb.CreateTopicRequest(topic=topic, partition_count=partitions, config=config)
        reply: pb.CreateTopicResponse = await self._calls.acall(self._topics.CreateTopic, request, timeout_s=timeout_s)
        return reply.topic

    async def delete_topic(self, topic: str, *, timeout_s: float | None = None) -> None:
        await self._calls.acall(self._topics.DeleteTopic, pb.DeleteTopicRequest(topic=topic), timeout_s=timeout_s)

    async def list_topics(self, *, timeout_s: float | None = None) -> list[pb.TopicDescription]:
        reply: pb.ListTopicsResponse = await self._calls.acall(
            self._topics.ListTopics, pb.ListTopicsRequest(), timeout_s=timeout_s)
        return list(reply.topics)

    async def describe_topic(self, topic: str, *, timeout_s: float | None = None) -> pb.TopicDescription:
        reply: pb.DescribeTopicResponse = await self._calls.acall(
            self._topics.DescribeTopic, pb.DescribeTopicRequest(topic=topic), timeout_s=timeout_s)
        return reply.topic

    async def list_offsets(self, topic: str, *, timestamp_ms: int | None = None, latest: bool = False,
                           timeout_s: float | None = None) -> list[pb.PartitionOffset]:
        if timestamp_ms is not None:
            request = pb.ListOffsetsRequest(topic=topic, timestamp_ms=timestamp_ms)
        else:
            spec = pb.OFFSET_SPEC_LATEST if latest else pb.OFFSET_SPEC_EARLIEST
            request = pb.ListOffsetsRequest(topic=topic, position=spec)
        reply: pb.ListOffsetsResponse = await self._calls.acall(self._log.ListOffsets, request, timeout_s=timeout_s)
        return list(reply.offsets)

    # -- consumer groups ----------------------------------------------------------
    async def list_groups(self, *, timeout_s: float | None = None) -> list[pb.GroupListing]:
        reply: pb.ListGroupsResponse = await self._calls.acall(
            self._groups.ListGroups, pb.ListGroupsRequest(), timeout_s=timeout_s)
        return list(reply.groups)

    async def describe_group(self, group: str, *, timeout_s: float | None = None) -> pb.GroupDescription:
        reply: pb.DescribeGroupResponse = await self._calls.acall(
            self._groups.DescribeGroup, pb.DescribeGroupRequest(group=group), timeout_s=timeout_s)
        return reply.group

    async def delete_group(self, group: str, *, timeout_s: float | None = None) -> None:
        await self._calls.acall(self._groups.DeleteGroup, pb.DeleteGroupRequest(group=group), timeout_s=timeout_s)

    async def fetch_offsets(self, group: str, partitions: dict[str, list[int]] | None = None, *,
                            timeout_s: float | None = None) -> list[pb.CommittedOffset]:
        request = pb.FetchOffsetsRequest(group=group, partitions=_topic_partitions(partitions or {}))
        reply: pb.FetchOffsetsResponse = await self._calls.acall(
            self._groups.FetchOffsets, request, timeout_s=timeout_s)
        return list(reply.offsets)

    async def commit_offsets(self, group: str, offsets: dict[tuple[str, int], int], *, metadata: str = "",
                             timeout_s: float | None = None) -> None:
        """Commit for a group with no live members (tools, standalone consumers)."""
        commits = [pb.OffsetCommit(topic=t, partition=p, offset=o, metadata=metadata) for (t, p), o in offsets.items()]
        request = pb.CommitOffsetsRequest(group=group, offsets=commits)
        await self._calls.acall(self._groups.CommitOffsets, request, timeout_s=timeout_s)

    async def reset_offsets(
        self,
        /,
        group: str,
        *,
        partitions: dict[str, list[int]] | None = None,
        execute: bool = False,
        timeout_s: float | None = None,
        **target: int | bool,
    ) -> pb.ResetOffsetsResponse:
        """Plan (or with ``execute``, apply) an offset reset. ``partitions`` maps topic
        to partitions ([] = all); None means every topic of the group. ``target`` is
        one of position=pb.OFFSET_SPEC_*, offset=, shift_by=, timestamp_ms=,
        duration_ms=, undo=True."""
        request = pb.ResetOffsetsRequest(
            group=group,
            partitions=_topic_partitions(partitions or {}),
            all_topics=partitions is None,
            execute=execute,
            **target,  # type: ignore[arg-type]  # one of several fields, each an int or a bool
        )
        reply: pb.ResetOffsetsResponse = await self._calls.acall(
            self._groups.ResetOffsets, request, timeout_s=timeout_s)
        return reply


def _topic_partitions(partitions: dict[str, list[int]]) -> list[pb.TopicPartitions]:
    return [pb.TopicPartitions(topic=t, partitions=ps) for t, ps in partitions.items()]


def _blocking(method: Callable[Concatenate[AsyncAdmin, P], Coroutine[Any, Any, T]]) -> Callable[Concatenate[Admin, P], T]:
    """``AsyncAdmin.<method>`` as a blocking method of ``Admin``."""

    @functools.wraps(method)
    def call(self: Admin, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(method(self._admin, *args, **kwargs))

    return call


class Admin:
    """A blocking admin client: an ``AsyncAdmin`` on a private event-loop thread."""

    def __init__(self, server: str | None = None, *, security: Security | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """As ``AsyncAdmin``'s (a blocking client cannot share a caller's channel: its
        channel lives on its own loop)."""
        self._loop = LoopThread("streamd-admin")
        try:
            self._admin = self._loop.run(_make_async_admin(server, security, timeout_s))
        except BaseException:
            self._loop.close()
            raise
        # Dropped without close() (``Admin(addr).list_topics()``): its thread and
        # channel go with it, as a blocking channel's did.
        self._finalizer = weakref.finalize(self, _abandoned, self._loop, self._admin)
        self._finalizer.atexit = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer.detach()
        if self._loop.closed:
            return
        try:
            self._loop.run(self._admin.close())
        finally:
            self._loop.close()

    @property
    def timeout_s(self) -> float:
        """The default deadline of this client's calls, in seconds."""
        return self._admin.timeout_s

    create_topic = _blocking(AsyncAdmin.create_topic)
    delete_topic = _blocking(AsyncAdmin.delete_topic)
    list_topics = _blocking(AsyncAdmin.list_topics)
    describe_topic = _blocking(AsyncAdmin.describe_topic)
    list_offsets = _blocking(AsyncAdmin.list_offsets)
    list_groups = _blocking(AsyncAdmin.list_groups)
    describe_group = _blocking(AsyncAdmin.describe_group)
    delete_group = _blocking(AsyncAdmin.delete_group)
    fetch_offsets = _blocking(AsyncAdmin.fetch_offsets)
    commit_offsets = _blocking(AsyncAdmin.commit_offsets)
    reset_offsets = _blocking(AsyncAdmin.reset_offsets)


def _abandoned(loop: LoopThread, admin: AsyncAdmin) -> None:
    loop.abandon(admin.close())


async def _make_async_admin(server: str | None, security: Security | None, timeout_s: float) -> AsyncAdmin:
    # On the loop thread: the channel belongs to the loop it is made on.
    return AsyncAdmin(server, security=security, timeout_s=timeout_s)
