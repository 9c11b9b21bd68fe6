"""Translation between broker dataclasses and streamd.v1 messages."""

from __future__ import annotations

from collections.abc import Sequence

from segments import DamagedOffsets, LogStats
from streamd.broker.errors import InvalidArgument
from streamd.broker.topic import TopicMeta, TopicSettings
from streamd.v1 import streamd_pb2 as pb

FSYNC_TO_PB = {
    "always": pb.FSYNC_POLICY_ALWAYS,
    "interval": pb.FSYNC_POLICY_INTERVAL,
    "never": pb.FSYNC_POLICY_NEVER,
}
FSYNC_FROM_PB = {v: k for k, v in FSYNC_TO_PB.items()}
COMPRESSION_TO_PB = {"producer": pb.COMPRESSION_UNSPECIFIED, "lz4": pb.COMPRESSION_LZ4}
_INT_FIELDS = (
    "retention_ms",
    "retention_bytes",
    "segment_bytes",
    "segment_ms",
    "max_record_bytes",
    "fsync_interval_ms",
    "dedup_window_ms",
)


def overrides_from_pb(config: pb.TopicConfig) -> dict[str, object]:
    """The settings a CreateTopic request names (absent fields keep defaults)."""
    out: dict[str, object] = {}
    for name in _INT_FIELDS:
        if config.HasField(name):
            out[name] = getattr(config, name)
    if config.HasField("fsync_policy") and config.fsync_policy != pb.FSYNC_POLICY_UNSPECIFIED:
        if config.fsync_policy not in FSYNC_FROM_PB:
            raise InvalidArgument("config.fsync_policy", f"unknown value {config.fsync_policy}")
        out["fsync_policy"] = FSYNC_FROM_PB[config.fsync_policy]
    if config.HasField("compression"):
        if config.compression == pb.COMPRESSION_LZ4:
            out["compression"] = "lz4"
        elif config.compression in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE):
            out["compression"] = "producer"
        else:
            raise InvalidArgument("config.compression", f"unknown value {config.compression}")
    return out


def settings_to_pb(s: TopicSettings) -> pb.TopicConfig:
    return pb.TopicConfig(
        retention_ms=s.retention_ms,
        retention_bytes=s.retention_bytes,
        segment_bytes=s.segment_bytes,
        segment_ms=s.segment_ms,
        max_record_bytes=s.max_record_bytes,
        fsync_policy=FSYNC_TO_PB[s.fsync_policy],
        fsync_interval_ms=s.fsync_interval_ms,
        compression=COMPRESSION_TO_PB[s.compression],
        dedup_window_ms=s.dedup_window_ms,
    )


def partition_to_pb(index: int, stats: LogStats, damaged: Sequence[DamagedOffsets] = ()) -> pb.PartitionDescription:
    return pb.PartitionDescription(
        damaged=[pb.DamagedRange(first_offset=d.first_offset, last_offset=d.last_offset, cause=d.cause)
                 for d in damaged],
        partition=index,
        log_start_offset=stats.log_start_offset,
        log_end_offset=stats.log_end_offset,
        segment_count=stats.segment_count,
        size_bytes=stats.size_bytes,
        oldest_timestamp_ms=stats.oldest_timestamp_ms,
        newest_timestamp_ms=stats.newest_timestamp_ms,
    )


def topic_to_pb(meta: TopicMeta, stats: list[LogStats],
                damaged: list[list[DamagedOffsets]] | None = None) -> pb.TopicDescription:
    return pb.TopicDescription(
        name=meta.name,
        partition_count=meta.partition_count,
        config=settings_to_pb(meta.settings),
        partitions=[partition_to_pb(i, s, damaged[i] if damaged else ()) for i, s in enumerate(stats)],
        created_ms=meta.created_ms,
    )
