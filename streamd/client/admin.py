"""Topic administration (blocking): create, delete, list, describe, offsets.

Every method takes ``timeout_s=`` (seconds; default: the client's ``timeout_s``,
30 s) and raises StreamdError ``DEADLINE_EXCEEDED``/``TIMED_OUT`` when no answer
came within it (``streamd.client._channel``)."""

from __future__ import annotations

from streamd.v1 import streamd_pb2 as pb

from ._channel import SyncClient

FSYNC = {
    "always": pb.FSYNC_POLICY_ALWAYS,
    "interval": pb.FSYNC_POLICY_INTERVAL,
    "never": pb.FSYNC_POLICY_NEVER,
}
COMPRESSION = {"producer": pb.COMPRESSION_UNSPECIFIED, "none": pb.COMPRESSION_NONE, "lz4": pb.COMPRESSION_LZ4}


class Admin(SyncClient):
    def create_topic(
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
        return self._call(self._topics.CreateTopic, request, timeout_s=timeout_s).topic

    def delete_topic(self, topic: str, *, timeout_s: float | None = None) -> None:
        self._call(self._topics.DeleteTopic, pb.DeleteTopicRequest(topic=topic), timeout_s=timeout_s)

    def list_topics(self, *, timeout_s: float | None = None) -> list[pb.TopicDescription]:
        return list(self._call(self._topics.ListTopics, pb.ListTopicsRequest(), timeout_s=timeout_s).topics)

    def describe_topic(self, topic: str, *, timeout_s: float | None = None) -> pb.TopicDescription:
        return self._call(self._topics.DescribeTopic, pb.DescribeTopicRequest(topic=topic), timeout_s=timeout_s).topic

    def list_offsets(self, topic: str, *, timestamp_ms: int | None = None, latest: bool = False,
                     timeout_s: float | None = None) -> list[pb.PartitionOffset]:
        if timestamp_ms is not None:
            request = pb.ListOffsetsRequest(topic=topic, timestamp_ms=timestamp_ms)
        else:
            spec = pb.OFFSET_SPEC_LATEST if latest else pb.OFFSET_SPEC_EARLIEST
            request = pb.ListOffsetsRequest(topic=topic, position=spec)
        return list(self._call(self._log.ListOffsets, request, timeout_s=timeout_s).offsets)

    # -- consumer groups ----------------------------------------------------------
    def list_groups(self, *, timeout_s: float | None = None) -> list[pb.GroupListing]:
        return list(self._call(self._groups.ListGroups, pb.ListGroupsRequest(), timeout_s=timeout_s).groups)

    def describe_group(self, group: str, *, timeout_s: float | None = None) -> pb.GroupDescription:
        return self._call(self._groups.DescribeGroup, pb.DescribeGroupRequest(group=group), timeout_s=timeout_s).group

    def delete_group(self, group: str, *, timeout_s: float | None = None) -> None:
        self._call(self._groups.DeleteGroup, pb.DeleteGroupRequest(group=group), timeout_s=timeout_s)

    def fetch_offsets(self, group: str, partitions: dict[str, list[int]] | None = None, *,
                      timeout_s: float | None = None) -> list[pb.CommittedOffset]:
        request = pb.FetchOffsetsRequest(group=group, partitions=_topic_partitions(partitions or {}))
        return list(self._call(self._groups.FetchOffsets, request, timeout_s=timeout_s).offsets)

    def commit_offsets(self, group: str, offsets: dict[tuple[str, int], int], *, metadata: str = "",
                       timeout_s: float | None = None) -> None:
        """Commit for a group with no live members (tools, standalone consumers)."""
        commits = [pb.OffsetCommit(topic=t, partition=p, offset=o, metadata=metadata) for (t, p), o in offsets.items()]
        request = pb.CommitOffsetsRequest(group=group, offsets=commits)
        self._call(self._groups.CommitOffsets, request, timeout_s=timeout_s)

    def reset_offsets(
        self,
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
            **target,
        )
        return self._call(self._groups.ResetOffsets, request, timeout_s=timeout_s)


def _topic_partitions(partitions: dict[str, list[int]]) -> list[pb.TopicPartitions]:
    return [pb.TopicPartitions(topic=t, partitions=ps) for t, ps in partitions.items()]
