"""Topic names, topic settings and the topic metadata file.

On disk a topic is ``DATA_DIR/<name>/`` holding ``topic.json`` and one directory per
partition (``0/``, ``1/``, ...). ``topic.json`` is written once, atomically, before
the directory is renamed into place, so a topic either exists whole or not at all.
Names are ``[A-Za-z0-9._-]{1,249}`` and not ``.`` or ``..``: a name is always one
plain path component inside the data directory. Broker-internal entries of the data
directory start with ``@``, which no topic name can.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from segments.checkpoint import write_atomic

from .errors import InvalidArgument, InvalidTopicName

TOPIC_FILE = "topic.json"
MAX_TOPIC_NAME_CHARS = 249  # a topic's directory name, under the 255-byte file name limit
_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_TOPIC_NAME_CHARS}}}")
FSYNC_POLICIES = ("always", "interval", "never")
COMPRESSIONS = ("producer", "lz4")
MAX_DEDUP_WINDOW_MS = 7 * 24 * 3600 * 1000


def check_topic_name(name: str, *, field: str = "topic") -> str:
    """``name`` if it is a valid topic name, else InvalidTopicName naming ``field``
    (the request field that carried it)."""
    if not isinstance(name, str) or not name:
        raise InvalidTopicName(str(name), "it is empty", field=field)
    if not _NAME.fullmatch(name):
        raise InvalidTopicName(name, f"use 1 to {MAX_TOPIC_NAME_CHARS} of A-Z a-z 0-9 . _ -", field=field)
    if name in (".", ".."):
        raise InvalidTopicName(name, "'.' and '..' are reserved", field=field)
    return name


@dataclass(frozen=True)
class TopicSettings:
    """The effective settings of a topic (every field filled in)."""

    retention_ms: int
    retention_bytes: int
    segment_bytes: int
    segment_ms: int
    max_record_bytes: int
    fsync_policy: str
    fsync_interval_ms: int
    compression: str
    #: Idempotency keys are deduplicated within this window; 0 turns it off.
    dedup_window_ms: int = 0

    @property
    def max_batch_bytes(self) -> int:
        """Largest batch body accepted: room for several maximal records."""
        return max(self.max_record_bytes, 1024 * 1024) * 4

    def validate(self) -> TopicSettings:
        for name in ("retention_ms", "retention_bytes"):
            value = getattr(self, name)
            if value < -1 or value == 0:
                raise InvalidArgument(f"config.{name}", f"must be positive or -1 (unlimited), not {value}")
        for name in ("segment_bytes", "segment_ms", "max_record_bytes", "fsync_interval_ms"):
            value = getattr(self, name)
            if value <= 0:
                raise InvalidArgument(f"config.{name}", f"must be positive, not {value}")
        if self.segment_bytes < 4096 or self.segment_bytes > (1 << 31) - 1:
            raise InvalidArgument("config.segment_bytes", "must be between 4096 and 2 GiB - 1")
        if self.max_record_bytes > 8 * 1024 * 1024:
            # batches may reach 4x this; a fetch answer must stay under 64 MiB
            raise InvalidArgument("config.max_record_bytes", "must be at most 8 MiB")
        if self.fsync_policy not in FSYNC_POLICIES:
            raise InvalidArgument("config.fsync_policy", f"must be one of {FSYNC_POLICIES}")
        if self.compression not in COMPRESSIONS:
            raise InvalidArgument("config.compression", f"must be one of {COMPRESSIONS}")
        if not 0 <= self.dedup_window_ms <= MAX_DEDUP_WINDOW_MS:
            raise InvalidArgument("config.dedup_window_ms", f"must be 0 (off) .. {MAX_DEDUP_WINDOW_MS} (7 days)")
        return self


@dataclass(frozen=True)
class TopicMeta:
    name: str
    partition_count: int
    settings: TopicSettings
    created_ms: int

    def to_json(self) -> bytes:
        doc = {
            "version": 1,
            "name": self.name,
            "partition_count": self.partition_count,
            "created_ms": self.created_ms,
            "settings": dataclasses.asdict(self.settings),
        }
        return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> TopicMeta:
        doc = json.loads(raw)
        return cls(
            name=doc["name"],
            partition_count=int(doc["partition_count"]),
            settings=TopicSettings(**doc["settings"]),
            created_ms=int(doc["created_ms"]),
        )

    def write(self, topic_dir: Path) -> None:
        write_atomic(topic_dir / TOPIC_FILE, self.to_json())

    @classmethod
    def read(cls, topic_dir: Path) -> TopicMeta:
        return cls.from_json((topic_dir / TOPIC_FILE).read_bytes())
