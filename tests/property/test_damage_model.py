"""PartitionLog with damaged segment files against a plain model: batches, which of
them are damaged, and the segments they are in.

Real files get real damage (a flipped bit in a header field, the CRC or the body; a
segment cut short), in sealed segments and in the last one (the active segment, after
a clean close: its recorded log end is trusted), then the log is opened as a restarted
broker opens it.
The model says, for each segment, which runs of batches are unreadable. Checked:

- a reader that skips each ``CorruptRecords`` (going on at its ``next_offset``) gets
  every good batch exactly once, in order, and is told exactly the damaged runs;
- a read at any offset returns the batch holding it first, or raises the damaged
  range holding it; never an empty answer below the log end;
- a time lookup answers what a scan of the good batches answers, or raises when a
  damaged run (whose append times are unknown) may hold the answer;
- ``damaged()`` lists the runs found;
- the log end is the one the close recorded, and the next append gets it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segments import CorruptRecords, PartitionLog, ReadLimits
from segments.batch import iter_headers
from tests.faults import flip_byte

from ..framing import frames

SEGMENT_BYTES = 300
INDEX_INTERVAL = 64
#: Byte ranges of the frame header fields (``segments.batch``) and the body.
FIELDS = {"tag": (0, 1), "length": (1, 6), "crc": (7, 11), "base": (12, 20), "time": (21, 29),
          "count": (30, 34), "body": (34, None)}


def _open(path: Path) -> PartitionLog:
    return PartitionLog.open(path, segment_bytes=SEGMENT_BYTES, segment_ms=10**9,
                             index_interval_bytes=INDEX_INTERVAL, now_ms=10**9, topic="t", partition=0)


def _write(path: Path, batches) -> list[tuple[int, int, int, bytes]]:
    written, now = [], 0
    with _open(path) as log:
        for count, size, dt in batches:
            now += dt
            body = bytes([65 + len(written) % 26]) * size
            info = log.append(body, record_count=count, append_time_ms=now)
            written.append((info.base_offset, count, info.append_time_ms, body))
    return written


def _layout(path: Path):
    """{segment file: [(frame position, frame size, base offset)]}, in offset order."""
    out = {}
    for log_file in sorted(path.glob("*.log")):
        data = log_file.read_bytes()
        out[log_file] = [(h.position, h.size, h.base_offset) for h in iter_headers(data)]
    return out




def _model_runs(layout, damaged: set[int], counts: dict[int, int]) -> list[tuple[int, int]]:
    """Maximal runs of damaged batches within one segment, as offset ranges."""
    runs = []
    for frames_ in layout.values():
        run = None
        for _position, _size, base in frames_:
            if base in damaged:
                run = (run[0] if run else base, base + counts[base] - 1)
            elif run:
                runs.append(run)
                run = None
        if run:
            runs.append(run)
    return runs


def _within(exc: CorruptRecords, runs) -> bool:
    return any(a <= exc.first_offset and exc.last_offset <= b for a, b in runs)


damage_spec = st.lists(st.tuples(st.floats(0, 1), st.sampled_from(sorted(FIELDS)), st.floats(0, 1)),
                       min_size=1, max_size=3)
batch_spec = st.lists(st.tuples(st.integers(1, 4), st.integers(0, 60), st.integers(0, 40)), min_size=8,
                      max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batch_spec, damage=damage_spec, truncate=st.one_of(st.none(), st.floats(0, 1)),
       limits=st.lists(st.integers(1, 400), min_size=1, max_size=5), times=st.lists(st.integers(-5, 1500),
                                                                                   max_size=8))
def test_damaged_segments_against_a_model(batches, damage, truncate, limits, times):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p"
        written = _write(path, batches)
        layout = _layout(path)
        files = list(layout)
        targets = [(f, fr) for f, fr in layout.items() if fr]  # the last one too (see docstring)
        assert targets and files
        damaged: set[int] = set()
        flipped: set[tuple[Path, int]] = set()
        ends = {}  # base offset of each batch -> its record count
        for base, count, _, _ in written:
            ends[base] = count
        for where, field, at in damage:
            log_file, frames_ = targets[int(where * len(targets)) % len(targets)]
            position, size, base = frames_[int(at * len(frames_)) % len(frames_)]
            lo, hi = FIELDS[field]
            hi = size if hi is None else hi
            if lo >= hi:  # an empty body: flip the CRC instead
                lo, hi = FIELDS["crc"]
            byte = position + lo + int(at * (hi - lo)) % (hi - lo)
            if (log_file, byte) not in flipped:  # twice would undo it
                flipped.add((log_file, byte))
                flip_byte(log_file, byte)
                damaged.add(base)
        if truncate is not None:
            log_file, frames_ = targets[int(truncate * len(targets)) % len(targets)]
            size = os.path.getsize(log_file)
            cut = max(1, int(truncate * size)) if size > 1 else 0
            os.truncate(log_file, cut)
            damaged.update(base for position, length, base in frames_ if position + length > cut)
        runs = _model_runs(layout, damaged, ends)
        good = [b for b in written if b[0] not in damaged]
        log_end = written[-1][0] + written[-1][1]

        with _open(path) as log:
            # 1. A reader that skips the damage gets every good batch, once, in order.
            got, told, offset, steps = [], [], 0, 0
            while offset < log_end:
                steps += 1
                assert steps < 10 * len(written) + 10
                try:
                    res = log.read(offset, ReadLimits(1 << 20, limits[steps % len(limits)]))
                except CorruptRecords as exc:
                    assert exc.first_offset <= offset <= exc.last_offset
                    assert (exc.topic, exc.partition) == ("t", 0)
                    told.append((exc.first_offset, exc.last_offset))
                    offset = exc.next_offset
                    continue
                assert res.batch_count > 0 and res.next_offset > offset
                got += [b for b in frames(res.data) if b[0] + b[1] > offset]
                offset = res.next_offset
            assert got == good
            assert told == runs
            assert [(d.first_offset, d.last_offset) for d in log.damaged()] == runs
            assert log.log_end_offset == log_end
            # 2. Any offset: its batch first, or the damaged range holding it.
            for base, count, _, _ in written:
                for o in (base, base + count - 1):
                    try:
                        res = log.read(o, ReadLimits(1, 1))
                    except CorruptRecords as exc:
                        # From where the walk starts, a run may be found in parts.
                        assert base in damaged and _within(exc, runs)
                        assert exc.first_offset <= o <= exc.last_offset
                    else:
                        assert base not in damaged and frames(res.data)[0][0] == base
            # 3. Time lookups: the first good batch at or after T, unless a damaged run
            #    since the last good batch older than T may hold it.
            for t in times:
                expected, ambiguous, pending = log_end, False, False
                for base, _count, when, _ in written:
                    if base in damaged:
                        pending = True
                    elif when >= t:
                        expected, ambiguous = base, pending
                        break
                    else:
                        pending = False
                else:
                    ambiguous = pending
                try:
                    answer = log.offset_for_time(t)
                except CorruptRecords as exc:
                    assert ambiguous, (t, exc)
                    assert _within(exc, runs)
                else:
                    assert not ambiguous and answer == expected, (t, answer, expected)
            # 4. Offsets are never reused: the next batch goes at the recorded log end.
            assert log.append(b"new", record_count=1, append_time_ms=10**6).base_offset == log_end
            assert frames(log.read(log_end, ReadLimits(1, 1)).data)[0][0] == log_end
