"""The names of a partition directory's files: the one place that spells them.

A partition directory (``PartitionLog``) holds, per segment, three files named by the
segment's base offset (20 decimal digits, zero-padded, so names sort as offsets do),
plus two small state files::

    00000000000000000000.log        the frames (``batch``)
    00000000000000000000.index      relative offset -> byte position (``index``)
    00000000000000000000.timeindex  append time -> relative offset (``index``)
    partition.json                  log start offset and recovery point (``recovery``)
    clean-shutdown                  present only after a clean close (``recovery``)

Transient names, removed by recovery when a crash leaves them: ``<file>.deleted``
(a segment file renamed before its unlink: retention and truncation) and
``.<name>.<random>.tmp`` (a state file being written: ``checkpoint``).

Everything that names these files (inside ``segments`` and the offline
``streamd inspect``) imports them from here, as Kafka's ``LogFileUtils``.
"""

from __future__ import annotations

import re
from typing import Final

LOG_SUFFIX: Final = ".log"
INDEX_SUFFIX: Final = ".index"
TIME_INDEX_SUFFIX: Final = ".timeindex"
DELETED_SUFFIX: Final = ".deleted"
TEMP_SUFFIX: Final = ".tmp"
STATE_FILE: Final = "partition.json"
CLEAN_SHUTDOWN_FILE: Final = "clean-shutdown"
#: The digits of a segment file name (a base offset below 10**20 fits any int64).
SEGMENT_NAME_DIGITS: Final = 20
#: A segment file: (base offset digits, suffix).
SEGMENT_FILE: Final = re.compile(
    rf"(\d{{{SEGMENT_NAME_DIGITS}}})({re.escape(LOG_SUFFIX)}|{re.escape(INDEX_SUFFIX)}|{re.escape(TIME_INDEX_SUFFIX)})"
)


def segment_name(base_offset: int) -> str:
    """The stem of a segment's files: its base offset, zero-padded."""
    return f"{base_offset:0{SEGMENT_NAME_DIGITS}d}"
