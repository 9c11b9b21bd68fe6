"""``streamd replay``: copy a range of a topic's records into another topic or to JSON lines.

Two layers, so the choice of records can be tested without a broker:

- selection (pure, ``replay_select``): ``--from``/``--to`` become one ``PartitionRange``
  [start, stop) per partition, and ``select`` picks the records in range that pass a
  ``RecordFilter`` (exact key, every wanted header).
- I/O: ``_fetch_range`` reads a range with Fetch (a loop bounded by the range and by
  ``EMPTY_FETCH_LIMIT``); a sink writes what was selected (``TopicSink`` builds one
  RecordSet per target partition and ships it with the SDK Producer's ``send_batch`` from
  a writer thread, so reading goes on while batches are acknowledged; ``JsonLinesSink``
  writes to a file or stdout); ``TokenBucket`` paces, ``Progress`` reports.

Resuming: a sink knows, per source partition, the first offset not yet copied *and*
acknowledged (its ``frontier``). On KeyboardInterrupt (exit 130) or a failure mid-way
(exit 1) the frontiers are printed with a command line whose ``--resume P:OFF,...``
continues from them and whose ``--to P:OFF,...`` pins the ends resolved by the first run,
so the resumed run copies exactly the rest even while producers keep writing. A record
whose acknowledgement did not arrive within ``ACK_WAIT_S`` counts as not copied: replay
is at least once, never at most once.

Datetimes select by the broker's append time (ListOffsets), as ``consume --from @T`` does;
record timestamps are copied, never used to select.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shlex
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from streamd.client import Consumer, CorruptRecordsError, Producer, RecordMetadata, StreamdError
from streamd.client.consumer import skip_past
from streamd.client.producer import DEFAULT_BATCH_MAX_BYTES
from streamd.client.records import ConsumerRecord, add_record
from streamd.partitioner import key_partition
from streamd.v1 import streamd_pb2 as pb

from .common import TokenBucket, client_warnings
from .format import record_json, table
from .replay_select import (
    PartitionRange,
    RecordFilter,
    parse_partition_offsets,
    parse_position,
    requested_offsets,
    resolve_ranges,
    select,
)
from .timeouts import client_options, producer_options

PROVENANCE_HEADERS = ("streamd-source-topic", "streamd-source-partition", "streamd-source-offset")
ACK_WAIT_S = 30.0  # how long to wait for outstanding acknowledgements when stopping
BATCH_MAX_BYTES = DEFAULT_BATCH_MAX_BYTES
BATCH_MAX_RECORDS = 10_000
MAX_BATCHES_IN_FLIGHT = 8  # shipped but unacknowledged batches before reading waits
LINGER_S = 0.05  # a batch ships at the latest this long after its first record
FETCH_MAX_RECORDS = 5_000
EMPTY_FETCH_LIMIT = 5  # empty answers in a row below the stop offset before giving up
EMPTY_FETCH_WAIT_MS = 100
PROGRESS_INTERVAL_S = 0.2  # at most ~5 progress updates a second


class ReplayError(Exception):
    """A replay could not go on (no records where the log says there are, acks too slow)."""


@dataclass
class ReplayState:
    """Counts and, per source partition, the next offset to look at."""

    position: dict[int, int]
    read: int = 0
    matched: int = 0
    skipped: int = 0  # damaged offsets passed over (--skip-corrupt)
    started: float = field(default_factory=time.monotonic)


def _fetch_range(consumer: Consumer, topic: str, rng: PartitionRange, state: ReplayState) -> Iterator[ConsumerRecord]:
    """The records of ``rng`` in offset order. Each round either advances or counts as
    empty; ``EMPTY_FETCH_LIMIT`` empty rounds in a row end it with ReplayError."""
    position, empty = rng.start, 0
    while position < rng.stop:
        try:
            records, reply = consumer.fetch(
                topic, rng.partition, position, max_records=FETCH_MAX_RECORDS,
                max_wait_ms=EMPTY_FETCH_WAIT_MS if empty else 0,
            )
        except CorruptRecordsError as err:  # damaged records: stop, or skip them (--skip-corrupt)
            position = skip_past(err, consumer.skip_corrupt)
            state.skipped += min(position, rng.stop) - max(err.first_offset, rng.start)
            continue
        if not records:
            empty += 1
            if empty >= EMPTY_FETCH_LIMIT:
                raise ReplayError(f"partition {rng.partition}: no records at offset {position} (stop {rng.stop})")
            continue
        empty = 0
        for record in records:
            if record.offset >= rng.stop:
                return
            state.read += 1
            yield record
        position = max(position + 1, records[-1].offset + 1)


# -- I/O: writing -------------------------------------------------------------------------
def _provenance(record: ConsumerRecord) -> list[tuple[str, bytes]]:
    # A replayed record names the record it was copied from, so provenance headers it
    # already carried (from an earlier replay) are replaced: one answer per header name.
    kept = [h for h in record.headers if h[0] not in PROVENANCE_HEADERS]
    values = (record.topic, str(record.partition), str(record.offset))
    return kept + [(k, v.encode()) for k, v in zip(PROVENANCE_HEADERS, values, strict=True)]


@dataclass
class _Batch:
    """Records bound for one target partition: filled here, then shipped by the writer."""

    opened: float
    record_set: pb.RecordSet = field(default_factory=pb.RecordSet)
    first: dict[int, int] = field(default_factory=dict)  # source partition -> lowest offset
    count: int = 0
    size: int = 0
    future: concurrent.futures.Future[RecordMetadata] | None = None

    def sent(self) -> concurrent.futures.Future[RecordMetadata]:
        """The send of a shipped batch (every batch in ``TopicSink._shipped`` has one)."""
        assert self.future is not None, "the batch was never shipped"
        return self.future


class TopicSink:
    """Writes batches through the SDK Producer (``send_batch`` of a RecordSet per target
    partition), routed as the SDK routes: a key by ``key_partition`` over the target's
    partition count, keyless records round-robin batch by batch.

    A batch ships when it reaches BATCH_MAX_BYTES or BATCH_MAX_RECORDS, or LINGER_S after
    its first record. One writer thread ships batches in that order, each acknowledged
    before the next goes (so per-partition order holds), while the caller reads on; at
    most MAX_BATCHES_IN_FLIGHT wait. ``frontier`` is, per source partition, the lowest
    offset not acknowledged yet. Used from one thread.
    """

    def __init__(self, producer: Producer, topic: str, *, clock=time.monotonic) -> None:
        self._producer = producer
        self._topic = topic
        self._clock = clock
        self._partition_count = producer.partition_count(topic)
        self._open: dict[int, _Batch] = {}
        self._shipped: deque[_Batch] = deque()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamd-replay")
        self._keyless = 0  # the target partition of keyless records, modulo the count
        self._linger_check = 0.0
        self.written = 0  # acknowledged

    def write(self, record: ConsumerRecord) -> None:
        key, headers = record.key, _provenance(record)
        target = self._keyless % self._partition_count if key is None else key_partition(key, self._partition_count)
        now = self._clock()
        batch = self._open.get(target)
        if batch is None:
            batch = self._open[target] = _Batch(now)
        batch.first.setdefault(record.partition, record.offset)
        add_record(batch.record_set, record.value, key, headers, record.timestamp_ms)
        batch.count += 1
        batch.size += len(record.value) + len(key or b"") + sum(len(k) + len(v) + 4 for k, v in headers) + 16
        if batch.size >= BATCH_MAX_BYTES or batch.count >= BATCH_MAX_RECORDS:
            self._ship(target)
        if now >= self._linger_check:  # scan for old batches a few times per linger, not per record
            self._linger_check = now + LINGER_S / 4
            for old in [t for t, b in self._open.items() if now - b.opened >= LINGER_S]:
                self._ship(old)
        _raise_failure(self._collect())

    def _ship(self, target: int) -> None:
        # Ordered (and safe to repeat) so that an interrupt anywhere leaves the batch
        # tracked as unacknowledged: a resume may copy a record twice, never skip one.
        batch = self._open[target]
        if batch.future is None:
            batch.future = self._writer.submit(self._producer.send_batch, self._topic, target, batch.record_set)
            if target == self._keyless % self._partition_count:
                self._keyless += 1
        if not self._shipped or self._shipped[-1] is not batch:
            self._shipped.append(batch)
        del self._open[target]
        while len(self._shipped) > MAX_BATCHES_IN_FLIGHT:  # bounded: each pass retires a batch or raises
            oldest = self._shipped[0].sent()
            concurrent.futures.wait([oldest], timeout=ACK_WAIT_S)
            if not oldest.done():
                raise ReplayError(f"no acknowledgement from the broker within {ACK_WAIT_S:.0f}s")
            _raise_failure(self._collect())

    def _collect(self) -> BaseException | None:
        """Retire acknowledged batches in shipping order; return the first failure (a
        failed or cancelled batch and those after it stay unacknowledged)."""
        while self._shipped and self._shipped[0].sent().done():
            future = self._shipped[0].sent()
            if future.cancelled():
                return None
            if future.exception() is not None:
                return future.exception()
            self.written += self._shipped.popleft().count
        return None

    def settle(self, timeout: float = ACK_WAIT_S) -> BaseException | None:
        """Stop writing: with no failure so far, ship what is buffered and wait (bounded)
        for every acknowledgement; after a failure, drop what is queued behind it (it
        would only be copied again on resume). Returns the first failure."""
        error = self._collect()
        if error is None:
            try:
                for target in list(self._open):
                    self._ship(target)
            except Exception as exc:  # reported by the caller with where the replay stopped
                return exc
        else:
            for batch in self._shipped:
                batch.sent().cancel()
        concurrent.futures.wait([b.sent() for b in self._shipped], timeout=timeout)
        return self._collect()

    def finish(self) -> None:
        _raise_failure(self.settle())
        if self._shipped:
            raise ReplayError(f"{len(self._shipped)} batch(es) not acknowledged within {ACK_WAIT_S:.0f}s")

    def frontier(self, partition: int, position: int) -> int:
        waiting = [b.first[partition] for b in (*self._shipped, *self._open.values()) if partition in b.first]
        return min(waiting, default=position)

    def close(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)


def _raise_failure(error: BaseException | None) -> None:
    if error is not None:
        raise error


class JsonLinesSink:
    """One ``format.record_json`` line per record (its own topic/partition/offset are the
    source); a record counts as copied once written to the stream."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.written = 0

    def write(self, record: ConsumerRecord) -> None:
        self._stream.write(record_json(record) + "\n")
        self.written += 1

    def settle(self, timeout: float = ACK_WAIT_S) -> BaseException | None:
        try:
            self._stream.flush()
        except OSError as exc:
            return exc
        return None

    def finish(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        pass  # the stream belongs to the caller

    def frontier(self, partition: int, position: int) -> int:
        return position


# -- pacing and reporting -----------------------------------------------------------------
class Progress:
    """One ``\\r``-updated line on a TTY, at most every PROGRESS_INTERVAL_S."""

    def __init__(self, stream, total: int, *, clock=time.monotonic) -> None:
        self._stream = stream
        self._total = total
        self._clock = clock
        self._enabled = stream.isatty()
        self._last = 0.0
        self._width = 0

    def update(self, state: ReplayState) -> None:
        now = self._clock()
        if not self._enabled or now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        elapsed = max(now - state.started, 1e-6)
        eta = (self._total - state.read) / (state.read / elapsed) if state.read else 0
        line = f"replay: {state.matched} copied, {state.matched / elapsed:.0f} rec/s, ETA {eta:.0f}s"
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def clear(self) -> None:
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._width = 0


def _offsets_text(offsets: Mapping[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(offsets.items()))


def resume_command(args: argparse.Namespace, ranges: list[PartitionRange], frontier: Mapping[int, int]) -> str:
    argv = ["streamd"] + (["--server", args.server] if args.server else []) + ["replay", args.topic]
    if args.from_ is not None:
        argv += ["--from", args.from_]
    argv += ["--to", _offsets_text({r.partition: r.stop for r in ranges})]
    for text in args.partition or ():
        argv += ["--partition", text]
    if args.key is not None:
        argv += ["--key", args.key]
    for name, value in args.header:
        argv += ["--header", f"{name}={value.decode()}"]
    argv += ["--into", args.into] if args.into else ["--output", args.output]
    if args.rate is not None:
        argv += ["--rate", f"{args.rate:g}/s"]
    if getattr(args, "skip_corrupt", False):
        argv += ["--skip-corrupt"]
    return shlex.join(argv + ["--resume", _offsets_text(frontier)])


# -- the command ----------------------------------------------------------------------------
def _plan(consumer: Consumer, args: argparse.Namespace) -> tuple[list[PartitionRange], list[str]]:
    earliest = consumer.list_offsets(args.topic)
    bounds = {o.partition: (o.log_start_offset, o.log_end_offset) for o in earliest}
    partitions = sorted(bounds)
    if args.partition:
        wanted = sorted({int(p) for text in args.partition for p in text.split(",") if p.strip()})
        missing = [p for p in wanted if p not in bounds]
        if missing:
            raise ValueError(f"topic {args.topic} has no partition {missing[0]} (it has {len(bounds)})")
        partitions = wanted

    def offsets_for_time(timestamp_ms: int) -> dict[int, int]:
        return consumer.offsets_for_time(args.topic, timestamp_ms)

    log_start = {p: b[0] for p, b in bounds.items()}
    log_end = {p: b[1] for p, b in bounds.items()}
    from_ = parse_position(args.from_) if args.from_ is not None else None
    to = parse_position(args.to) if args.to is not None else None
    starts = requested_offsets(from_, partitions, default=log_start, offsets_for_time=offsets_for_time)
    stops = requested_offsets(to, partitions, default=log_end, offsets_for_time=offsets_for_time)
    resume = parse_partition_offsets(args.resume) if args.resume else None
    return resolve_ranges(bounds, starts, stops, resume=resume)


def _summary(state: ReplayState, written: int, next_offsets: Mapping[int, int] | None) -> str:
    elapsed = time.monotonic() - state.started
    line = f"replay: read {state.read}, matched {state.matched}, written {written} in {elapsed:.2f}s"
    if state.skipped:
        line += f", skipped {state.skipped} damaged"
    if next_offsets is None:
        return line + " (dry run)"
    return f"{line}; next offsets {_offsets_text(next_offsets) or '-'}"


def _dry_run(consumer: Consumer, args: argparse.Namespace, ranges: list[PartitionRange], wanted: RecordFilter) -> int:
    state = ReplayState({r.partition: r.start for r in ranges})
    rows = []
    for rng in ranges:
        if wanted.selects_all:  # offsets are dense: nothing to read to count them
            state.read += rng.size
            matched = rng.size
        else:
            records = _fetch_range(consumer, args.topic, rng, state)
            matched = sum(1 for _ in select(records, from_offset=rng.start, to_offset=rng.stop,
                                            key=wanted.key, headers=wanted.headers))
        state.matched += matched
        rows.append((rng.partition, rng.start, rng.stop, rng.size, matched))
    print(table(["PARTITION", "FROM", "TO", "RECORDS", "MATCHED"], rows))
    print(_summary(state, 0, None), file=sys.stderr)
    return 0


def _copy(consumer, args, ranges, wanted: RecordFilter, sink, state: ReplayState) -> None:
    limiter = TokenBucket(args.rate) if args.rate else None
    progress = Progress(sys.stderr, sum(r.size for r in ranges))
    try:
        for rng in ranges:
            records = _fetch_range(consumer, args.topic, rng, state)
            for record in select(records, from_offset=rng.start, to_offset=rng.stop,
                                 key=wanted.key, headers=wanted.headers):
                if limiter is not None:
                    limiter.acquire()
                sink.write(record)
                state.matched += 1
                state.position[rng.partition] = record.offset + 1
                progress.update(state)
            state.position[rng.partition] = rng.stop
        sink.finish()
    finally:
        progress.clear()


def _report_stop(args, ranges, sink, state: ReplayState, why: str, cause: BaseException | None = None) -> None:
    error = sink.settle()
    frontier = {r.partition: sink.frontier(r.partition, state.position[r.partition]) for r in ranges}
    if error is not None and error is not cause:
        print(f"streamd: replay: a write failed: {error}", file=sys.stderr)
    print(_summary(state, sink.written, frontier), file=sys.stderr)
    print(f"streamd: replay {why}; next offsets not yet copied: {_offsets_text(frontier)}", file=sys.stderr)
    print(f"streamd: resume with: {resume_command(args, ranges, frontier)}", file=sys.stderr)


def _open_sink(args: argparse.Namespace, close_later: list):
    if args.into:
        producer = Producer(args.server, **producer_options(args))
        close_later.append(producer)
        sink = TopicSink(producer, args.into)
        close_later.append(sink)  # closed first: its writer thread uses the producer
        return sink
    if args.output == "-":
        return JsonLinesSink(sys.stdout)
    # A resumed replay appends to the file the first run wrote, completing it.
    stream = open(args.output, "a" if args.resume else "w", encoding="utf-8")
    close_later.append(stream)
    return JsonLinesSink(stream)


def cmd_replay(args: argparse.Namespace) -> int:
    if not args.dry_run and not (args.into or args.output):
        print("streamd replay: one of --into TOPIC or --output FILE|- is required (or --dry-run)", file=sys.stderr)
        return 2
    if args.from_ is None and args.resume is None:
        print("streamd replay: --from OFFSET|DATETIME is required (or --resume)", file=sys.stderr)
        return 2
    wanted = RecordFilter(None if args.key is None else args.key.encode(), tuple(args.header))

    with Consumer(args.server, skip_corrupt=args.skip_corrupt, **client_options(args)) as consumer, \
            client_warnings():
        ranges, notes = _plan(consumer, args)
        for note in notes:
            print(f"streamd: replay: {note}", file=sys.stderr)
        if args.into:
            consumer.partition_count(args.into)  # the target must exist: fail before reading
        if args.dry_run:
            return _dry_run(consumer, args, ranges, wanted)
        state = ReplayState({r.partition: r.start for r in ranges})
        close_later: list = []
        sink = None
        try:
            sink = _open_sink(args, close_later)
            _copy(consumer, args, ranges, wanted, sink, state)
        except KeyboardInterrupt:
            if sink is None:
                print("streamd: replay interrupted before copying anything", file=sys.stderr)
            else:
                _report_stop(args, ranges, sink, state, "interrupted")
            return 130
        except BrokenPipeError:
            raise
        except (StreamdError, ReplayError, OSError) as exc:
            if sink is None:
                raise
            print(f"streamd: replay failed: {exc}", file=sys.stderr)
            _report_stop(args, ranges, sink, state, "stopped", exc)
            return 1
        finally:
            for resource in reversed(close_later):
                resource.close()
    print(_summary(state, sink.written, state.position), file=sys.stderr)
    return 0


# -- parser -----------------------------------------------------------------------------------
def _header(text: str) -> tuple[str, bytes]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value.encode()


def _rate(text: str) -> float:
    number = text.removesuffix("/s")
    try:
        rate = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N/s, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError("the rate must be positive")
    return rate


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "replay",
        help="copy a range of records into another topic or to JSON lines",
        description="Copy records of TOPIC in [--from, --to) per partition into another topic (with "
                    "provenance headers and original timestamps) or to JSON lines. Datetimes select "
                    "by broker append time. Ctrl-C prints a command that resumes exactly.",
    )
    p.add_argument("topic")
    p.add_argument("--from", dest="from_", metavar="OFFSET|DATETIME",
                   help="first offset (per partition), P:OFF,... or a time (@EPOCH_MS or ISO-8601)")
    p.add_argument("--to", metavar="OFFSET|DATETIME",
                   help="exclusive end, same forms as --from (default: the log end when the replay starts)")
    p.add_argument("--partition", action="append", metavar="P[,P...]", help="only these partitions (repeatable)")
    p.add_argument("--key", help="only records with exactly this key (UTF-8)")
    p.add_argument("--header", action="append", type=_header, default=[], metavar="NAME=VALUE",
                   help="only records carrying this header (repeatable; all must match)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--into", metavar="TOPIC", help="an existing topic to produce the records to")
    target.add_argument("--output", metavar="FILE|-", help="write JSON lines to FILE (appends with --resume) or stdout")
    p.add_argument("--rate", type=_rate, metavar="N/s", help="at most N records per second")
    p.add_argument("--dry-run", action="store_true", help="print the plan per partition and write nothing")
    p.add_argument("--resume", metavar="P:OFF,...", help="start these partitions here (overrides --from)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="go on past records the broker cannot read (a damaged log), with a warning, instead "
                        "of stopping there (the resume command then starts at them)")
    p.set_defaults(func=cmd_replay)
    return p
