"""``streamd queue``: create, list, stats, seek, redrive and delete queue groups.

``redrive`` moves dead letters back: it reads the dead-letter topic through its own
queue group (``streamd-redrive``), produces each matching record to the target topic
(key, value, original timestamp and headers, without the ``streamd-dlq-*`` ones) and
acks it once the target acknowledged, so a dead letter is moved once, also across
interrupted runs (at least once: a crash between the copy and the ack copies it
again). Records the filters leave out stay for later redrives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from google.protobuf import json_format

from streamd.client.queue import QueueReceiver
from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc

from .common import TokenBucket, format_age, parse_time
from .format import table
from .timeouts import client_options

REDRIVE_GROUP = "streamd-redrive"
REDRIVE_LEASE_MS = 10 * 60_000
DLQ_PREFIX = "streamd-dlq-"


def _json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _receiver(args, group: str, topic: str, **kw) -> QueueReceiver:
    return QueueReceiver(group, topic, args.server, **client_options(args), **kw)


def cmd_create(args: argparse.Namespace) -> int:
    config = {k: v for k, v in {
        "lease_ms": args.lease_ms, "max_deliveries": args.max_deliveries, "dead_letter_topic": args.dead_letter_topic,
        "initial_delay_ms": args.initial_delay_ms, "multiplier": args.multiplier, "max_delay_ms": args.max_delay_ms,
        "jitter": args.jitter, "ordered_by_key": args.ordered_by_key or None, "at_most_once": args.at_most_once or None,
        "max_in_flight": args.max_in_flight, "start": args.start,
    }.items() if v is not None}
    with _receiver(args, args.group, args.topic) as r:
        d = r.create(**config)
    print(json.dumps(_json(d)) if args.json else f"created queue group {args.group} on {args.topic}")
    return 0


def _groups(args) -> list[pb.QueueGroupDescription]:
    with _receiver(args, "x", "x") as r:
        stub = rpc.QueueServiceStub(r._channel)
        return list(r._call(stub.ListQueueGroups, pb.ListQueueGroupsRequest(topic=args.topic or "")).groups)


def cmd_list(args: argparse.Namespace) -> int:
    groups = _groups(args)
    if args.json:
        print(json.dumps([_json(g) for g in groups]))
        return 0
    rows = [[g.group, g.topic, sum(p.backlog for p in g.partitions), sum(p.in_flight for p in g.partitions),
             sum(p.dead_lettered for p in g.partitions)] for g in groups]
    print(table(["GROUP", "TOPIC", "BACKLOG", "IN-FLIGHT", "DEAD-LETTERED"], rows))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    groups = [g for g in _groups(args) if g.group == args.group]
    if not groups:
        print(f"streamd: no queue group {args.group!r}" + (f" on {args.topic!r}" if args.topic else ""),
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([_json(g) for g in groups]))
        return 0
    rows = []
    for g in groups:
        for p in g.partitions:
            rows.append([g.group, g.topic, p.partition, p.start_offset, p.log_end_offset, p.backlog, p.in_flight,
                         p.waiting, p.acked, p.redelivered, p.dead_lettered, format_age(p.oldest_unacked_ms),
                         p.lost_to_retention + p.lost_to_corruption])
    print(table(["GROUP", "TOPIC", "PARTITION", "START", "LOG-END", "BACKLOG", "IN-FLIGHT", "WAITING", "ACKED",
                 "REDELIVERED", "DEAD-LETTERED", "OLDEST-UNACKED", "LOST"], rows))
    return 0


def cmd_seek(args: argparse.Namespace) -> int:

    target: dict = {}
    if args.to_offset is not None:
        target["offset"] = args.to_offset
    elif args.to_datetime is not None:
        target["timestamp_ms"] = parse_time(args.to_datetime)
    else:
        target["position"] = pb.OFFSET_SPEC_LATEST if args.to_latest else pb.OFFSET_SPEC_EARLIEST
    request = pb.SeekQueueGroupRequest(group=args.group, topic=args.topic, partitions=args.partition or [],
                                       execute=args.execute, **target)
    with _receiver(args, args.group, args.topic) as r:
        reply = r._call(r._queues.SeekQueueGroup, request)
    rows = [[p.partition, p.old_offset, p.new_offset, p.new_offset - p.old_offset, "clamped" if p.clamped else ""]
            for p in reply.plan]
    print(table(["PARTITION", "OLD-START", "NEW-START", "DELTA", "NOTE"], rows))
    print("applied" if reply.executed else "dry run: nothing changed (add --execute to apply)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _receiver(args, args.group, args.topic) as r:
        r._call(r._queues.DeleteQueueGroup, pb.DeleteQueueGroupRequest(group=args.group, topic=args.topic))
    print(f"deleted queue group {args.group} on {args.topic}")
    return 0


# -- redrive -------------------------------------------------------------------------
def _matches(msg, key: str | None, headers: list[tuple[str, bytes]], reason: str | None) -> bool:
    if key is not None and msg.key != key.encode():
        return False
    have = dict(msg.headers)
    if any(have.get(k) != v for k, v in headers):
        return False
    return reason is None or reason.encode() in have.get(f"{DLQ_PREFIX}reason", b"")


def _restored(msg) -> pb.Record:
    record = pb.Record(value=msg.value, timestamp_ms=msg.timestamp_ms)
    if msg.key is not None:
        record.key = msg.key
    for k, v in msg.headers:
        if not k.startswith(DLQ_PREFIX):
            record.headers.add(key=k, value=v)
    return record


def cmd_redrive(args: argparse.Namespace) -> int:
    """Lease the dead letters through the redrive group; move the matching ones
    (produce, then ack); keep the others leased until the end of the run (so the next
    receive brings new ones), then hand them back."""
    headers = [_header(h) for h in args.header or []]
    bucket = TokenBucket(args.rate) if args.rate else None
    # With a rate, take no more than a minute's worth at once: leases last 10 minutes.
    batch_size = min(500, max(1, int(args.rate * 60))) if args.rate else 500
    progress = sys.stderr.isatty()
    moved = left = 0
    held: list = []
    started = time.monotonic()
    with _receiver(args, REDRIVE_GROUP, args.from_, max_records=batch_size, max_wait_ms=300) as r:
        r.create(exist_ok=True, max_deliveries=1000, lease_ms=REDRIVE_LEASE_MS, initial_delay_ms=0, jitter="none")
        log_stub = rpc.LogServiceStub(r._channel)
        backlog = sum(p.backlog + p.waiting for p in r.describe().partitions)
        try:
            while batch := r.receive():
                wanted = [m for m in batch if _matches(m, args.key, headers, args.reason)]
                held += [m for m in batch if m not in wanted]
                left += len(batch) - len(wanted)
                if args.dry_run:
                    held += wanted
                    moved += len(wanted)
                    continue
                if bucket is not None:
                    for _ in wanted:
                        bucket.acquire()
                if wanted:
                    r._call(log_stub.Produce, pb.ProduceRequest(topic=args.to, records=[_restored(m) for m in wanted]))
                    results = r._send([pb.Settlement(lease=m.lease, action=pb.SETTLE_ACTION_ACK) for m in wanted])
                    refused = sum(res.HasField("error") for res in results)
                    if refused:  # their leases ran out: they stay dead letters (already copied once)
                        print(f"redrive: {refused} record(s) copied but not acknowledged in time; they may "
                              "move again on the next run", file=sys.stderr)
                    moved += len(wanted) - refused
                if progress:
                    elapsed = max(time.monotonic() - started, 1e-6)
                    eta = max(0, backlog - moved - left) / max(moved / elapsed, 1e-6)
                    sys.stderr.write(f"\rredrive: {moved} moved, {moved / elapsed:.0f} rec/s, ETA {eta:.0f}s   ")
                    sys.stderr.flush()
        except KeyboardInterrupt:
            print(f"\nredrive: interrupted after {moved} record(s); run it again to go on (moved records "
                  "are not moved twice)", file=sys.stderr)
            return 130
        finally:
            for i in range(0, len(held), 1000):  # hand back what this run leaves behind
                r._send([pb.Settlement(lease=m.lease, action=pb.SETTLE_ACTION_NACK, delay_ms=0,
                                       reason="left by redrive") for m in held[i:i + 1000]])
    if progress:
        sys.stderr.write("\n")
    verb = "would move" if args.dry_run else "moved"
    print(f"redrive: {verb} {moved} record(s) from {args.from_} to {args.to}; {left} left by the filters")
    return 0


def _header(text: str) -> tuple[str, bytes]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--header {text!r}: expected NAME=VALUE")
    return name, value.encode()


def add_parser(sub) -> None:
    queue = sub.add_parser("queue", help="queue groups: create, list, stats, seek, redrive, delete")
    qsub = queue.add_subparsers(dest="queue_command", required=True)

    p = qsub.add_parser("create", help="create a queue group on a topic")
    p.add_argument("group")
    p.add_argument("--topic", required=True)
    p.add_argument("--lease-ms", type=int)
    p.add_argument("--max-deliveries", type=int)
    p.add_argument("--dead-letter-topic")
    p.add_argument("--initial-delay-ms", type=int)
    p.add_argument("--multiplier", type=float)
    p.add_argument("--max-delay-ms", type=int)
    p.add_argument("--jitter", choices=["none", "full", "equal"])
    p.add_argument("--ordered-by-key", action="store_true")
    p.add_argument("--at-most-once", action="store_true")
    p.add_argument("--max-in-flight", type=int)
    p.add_argument("--start", choices=["earliest", "latest"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_create)

    p = qsub.add_parser("list")
    p.add_argument("--topic")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = qsub.add_parser("stats", help="backlog, in flight, acked, redelivered, dead-lettered, oldest unacked age")
    p.add_argument("group")
    p.add_argument("--topic")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = qsub.add_parser("seek", help="move a queue group's start offset (plan; --execute applies)")
    p.add_argument("group")
    p.add_argument("--topic", required=True)
    p.add_argument("--partition", type=int, action="append")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-offset", type=int)
    target.add_argument("--to-datetime")
    target.add_argument("--to-earliest", action="store_true")
    target.add_argument("--to-latest", action="store_true")
    p.add_argument("--execute", action="store_true")
    p.set_defaults(func=cmd_seek)

    p = qsub.add_parser("redrive", help="move dead letters back to a topic")
    p.add_argument("--from", dest="from_", required=True, metavar="T.dlq")
    p.add_argument("--to", required=True, metavar="T")
    p.add_argument("--key", help="only dead letters with exactly this key")
    p.add_argument("--header", action="append", metavar="NAME=VALUE", help="only with this header (repeatable)")
    p.add_argument("--reason", help="only dead letters whose reason contains this text")
    p.add_argument("--rate", type=float, metavar="N", help="at most N records per second")
    p.add_argument("--dry-run", action="store_true", help="count what would move; move nothing")
    p.set_defaults(func=cmd_redrive)

    p = qsub.add_parser("delete")
    p.add_argument("group")
    p.add_argument("--topic", required=True)
    p.set_defaults(func=cmd_delete)

