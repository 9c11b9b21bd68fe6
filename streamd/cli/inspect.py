"""``streamd inspect``: offline, read-only inspection of one partition directory.

``streamd inspect DATA_DIR/TOPIC/PARTITION [--segment BASE] [--verify] [--records] [--json]``
lists every segment, its batches, its ``.index``/``.timeindex`` entries and
``partition.json``, checks each against the log, and with ``--records`` decodes the
records. It needs no running server: it is the one CLI command that reads storage
directly rather than through ``streamd.client``, because it exists to look at a log
the broker cannot or should not open.

The reading and every check are ``segments.inspection`` (strictly read-only; its
docstring lists the checks): this module knows no file format. It adds what storage
does not know, the records (``describe``: a batch's codec, and with ``--records`` its
records, decoded as the SDK decodes them), and prints the report as tables or JSON.

Exit codes: ``--verify`` lists the problems and exits 1 if there is any error, else 0;
without ``--verify`` the exit code is 0 whatever the data holds, and only a path that
is not a partition directory is an error, exit 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict
from pathlib import Path

from google.protobuf.message import DecodeError

from segments.inspection import BatchInfo, Describe, NotAPartition, PartitionReport, SegmentInfo, partition_names
from segments.inspection import inspect_partition as inspect_directory
from segments.layout import STATE_FILE
from streamd.client.records import iter_batch
from streamd.v1 import streamd_pb2 as pb

from .format import record_json, table

__all__ = ["NotAPartition", "PartitionReport", "add_parser", "cmd_inspect", "inspect_partition", "report_json"]

_CODECS = {pb.COMPRESSION_UNSPECIFIED: "none", pb.COMPRESSION_NONE: "none", pb.COMPRESSION_LZ4: "lz4"}


# -- reading: segments.inspection, with the records ---------------------------------
def inspect_partition(path: Path | str, *, segment: int | None = None, records: bool = False) -> PartitionReport:
    """Read the partition directory ``path`` (never writing to it) and check it; only
    the segment with base offset ``segment`` if given; decode records if ``records``."""
    return inspect_directory(path, segment=segment, describe=_describer(path, records=records))


def _describer(path: Path | str, *, records: bool) -> Describe:
    """Each batch's codec; with ``records``, its records (of a batch whose checksum
    holds), decoded as the SDK does."""
    where = partition_names(path)

    def describe(record_batch: bytes, info: BatchInfo) -> None:
        try:
            batch = pb.RecordBatch.FromString(record_batch)
            info.codec = _CODECS.get(batch.compression, f"unknown({batch.compression})")
        except DecodeError:
            batch = None
        if records and info.checksum_ok:
            _decode_records(info, batch, where)

    return describe


def _decode_records(info: BatchInfo, batch: pb.RecordBatch | None, where: tuple[str, int | None]) -> None:
    if batch is None:
        info.notes.append("the body is not a RecordBatch")
        return
    try:
        # partition is None when the directory is not named by a partition number.
        records = list(iter_batch(batch, where[0], where[1]))  # type: ignore[arg-type]
    except (DecodeError, RuntimeError) as exc:  # RuntimeError: lz4
        info.notes.append(f"records do not decode: {exc}")
        return
    info.records = [json.loads(record_json(r)) for r in records]
    if records:
        stamps = [r.timestamp_ms for r in records]
        info.min_timestamp_ms, info.max_timestamp_ms = min(stamps), max(stamps)
    if len(records) != info.record_count:
        info.notes.append(f"header says {info.record_count} records, the body holds {len(records)}")


# -- printing -----------------------------------------------------------------------
def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    try:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return "?"


def _or_dash(value: int | None) -> object:
    return "-" if value is None else value


def _text(raw) -> str:
    """A record field as record_json renders it: text, base64 or absent."""
    if raw is None:
        return "-"
    if isinstance(raw, dict):
        return "base64:" + raw["base64"]
    return json.dumps(raw, ensure_ascii=False)


def report_json(report: PartitionReport) -> dict:
    doc = asdict(report)
    for seg_doc, seg in zip(doc["segments"], report.segments, strict=True):
        for batch_doc, batch in zip(seg_doc["batches"], seg.batches, strict=True):
            batch_doc["last_offset"] = batch.last_offset
            batch_doc["append_time"] = _iso(batch.append_time_ms)
            batch_doc["checksum"] = "ok" if batch.checksum_ok else "CORRUPT"
    doc["errors"], doc["warnings"] = len(report.errors), len(report.warnings)
    return doc


def _print_segment(seg: SegmentInfo, *, records: bool) -> None:
    print(f"\nsegment {seg.file}: base offset {seg.base_offset}, {seg.file_bytes} bytes "
          f"({seg.data_bytes} in {len(seg.batches)} batches), next offset {seg.next_offset}"
          + ("" if seg.end_verified else " (the last batch fails its checksum: not from its header)"))
    stamps = ["MIN-TS-MS", "MAX-TS-MS"] if records else []  # known only from decoded records
    rows = [(b.position, b.base_offset, b.last_offset, b.record_count, b.append_time_ms, _iso(b.append_time_ms),
             *([_or_dash(b.min_timestamp_ms), _or_dash(b.max_timestamp_ms)] if records else []), b.size_bytes,
             b.codec, "ok" if b.checksum_ok else "CORRUPT", "; ".join(b.notes)) for b in seg.batches]
    print(table(["POSITION", "BASE-OFFSET", "LAST-OFFSET", "RECORDS", "APPEND-TIME-MS", "APPEND-TIME", *stamps,
                 "BYTES", "CODEC", "CHECKSUM", "NOTE"], rows))
    if seg.tail is not None:
        print(f"tail: {seg.tail.size_bytes} bytes from position {seg.tail.position}, "
              f"{seg.tail.nonzero_bytes} non-zero ({seg.tail.reason})")
    for index, key, label in ((seg.offset_index, "position", "POSITION"),
                              (seg.time_index, "timestamp_ms", "TIMESTAMP-MS")):
        if not index.present:
            print(f"{index.file}: missing")
            continue
        print(f"{index.file}: {index.used} used of {index.capacity} entries")
        rows = [(e.number, e.relative_offset, e.offset, getattr(e, key), e.problem or "ok") for e in index.entries]
        print(table(["ENTRY", "RELATIVE-OFFSET", "OFFSET", label, "STATUS"], rows))
    if records:
        rows = [(r["offset"], r["timestamp_ms"], _text(r["key"]), _text(r["value"]),
                 ",".join(f"{k}={_text(v)}" for k, v in r["headers"].items()))
                for b in seg.batches for r in (b.records or ())]
        print(f"records of {seg.file}:")
        print(table(["OFFSET", "TIMESTAMP-MS", "KEY", "VALUE", "HEADERS"], rows))


def _print_report(report: PartitionReport, *, verify: bool, records: bool) -> None:
    where = f" (topic {report.topic}, partition {report.partition})" if report.partition is not None else ""
    print(f"partition {report.path}{where}")
    print(f"log start offset {_or_dash(report.log_start_offset)}, log end offset {_or_dash(report.log_end_offset)}, "
          f"{len(report.segment_bases)} segment(s), clean shutdown: {'yes' if report.clean_shutdown else 'no'}")
    if report.state is not None:
        print(f"{STATE_FILE}: {json.dumps(report.state, sort_keys=True)}")
    for seg in report.segments:
        _print_segment(seg, records=records)
    counts = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    if not verify:
        print(f"\nstatus: {counts}" + (" (details with --verify)" if report.problems else ""))
        return
    print()
    if report.problems:
        rows = [(p.severity, p.file, _or_dash(p.position), _or_dash(p.offset), p.message) for p in report.problems]
        print(table(["SEVERITY", "FILE", "POSITION", "OFFSET", "PROBLEM"], rows))
    print(f"verify: {'FAILED' if report.errors else 'ok'}: {counts}")


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        report = inspect_partition(args.path, segment=args.segment, records=args.records)
    except NotAPartition as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report_json(report)))
    else:
        _print_report(report, verify=args.verify, records=args.records)
    return 1 if args.verify and report.errors else 0


def add_parser(sub) -> None:
    """Register ``inspect`` on the ``streamd`` subparsers."""
    p = sub.add_parser("inspect", help="show and check a partition directory offline (read-only)")
    p.add_argument("path", help="DATA_DIR/TOPIC/PARTITION")
    p.add_argument("--segment", type=int, metavar="BASE", help="only the segment with this base offset")
    p.add_argument("--verify", action="store_true", help="list every problem; exit 1 if the data has errors")
    p.add_argument("--records", action="store_true", help="decode and print every record")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_inspect)
