"""``streamd groups``: list, describe (lag), delete, reset-offsets.

``reset-offsets`` prints the plan (old, new, delta per partition) and changes nothing
unless ``--execute`` is given; the broker computes the plan, clamps it to each
partition's valid range, and on a group with live members applies it by fencing the
generation, so the members continue from the new offsets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from google.protobuf import json_format

from streamd.client import Admin
from streamd.v1 import streamd_pb2 as pb

from .common import format_age, parse_time
from .format import table
from .timeouts import client_options

STATES = {pb.GROUP_STATE_EMPTY: "Empty", pb.GROUP_STATE_STABLE: "Stable", pb.GROUP_STATE_REBALANCING: "Rebalancing"}
_DURATION = re.compile(
    r"P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?", re.I
)


def parse_duration_ms(text: str) -> int:
    """ISO-8601 duration ``PnWnDTnHnMnS`` (each part optional) in milliseconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or not any(m.groupdict().values()) or text.upper().endswith("T"):
        raise ValueError(f"{text!r} is not an ISO-8601 duration like P1DT2H30M or PT15M")
    parts = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    seconds = (((parts["w"] * 7 + parts["d"]) * 24 + parts["h"]) * 60 + parts["m"]) * 60 + parts["s"]
    return int(seconds * 1000)


def _json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def parse_topic_partitions(specs: list[str]) -> dict[str, list[int]]:
    """``T`` (every partition) or ``T:0,1,2``."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        topic, _, parts = spec.partition(":")
        if not topic:
            raise ValueError(f"--topic {spec!r}: expected TOPIC or TOPIC:P,P,...")
        try:
            partitions = [int(p) for p in parts.split(",")] if parts else []
        except ValueError:
            raise ValueError(f"--topic {spec!r}: partitions must be integers") from None
        out.setdefault(topic, []).extend(partitions)
    return out


# -- commands ----------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    with Admin(args.server, **client_options(args)) as admin:
        groups = admin.list_groups()
    if args.json:
        print(json.dumps([_json(g) for g in groups]))
        return 0
    rows = [[g.group, STATES.get(g.state, "?"), g.member_count, ",".join(g.topics)] for g in groups]
    print(table(["GROUP", "STATE", "MEMBERS", "TOPICS"], rows))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    with Admin(args.server, **client_options(args)) as admin:
        d = admin.describe_group(args.group)
    if args.json:
        print(json.dumps(_json(d)))
        return 0
    print(f"group {d.group}: {STATES.get(d.state, '?')}, generation {d.generation}, {len(d.members)} member(s)")
    rows = [
        [
            d.group, p.topic, p.partition,
            p.committed_offset if p.committed_offset >= 0 else "-",
            p.log_end_offset, p.lag, format_age(p.lag_ms), p.member_id or "-",
        ]
        for p in d.partitions
    ]
    print(table(["GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "LAG-TIME", "MEMBER"], rows))
    if d.members:
        print()
        members = [
            [m.member_id, m.instance_id or "-", m.client_id or "-", m.peer or "-",
             "yes" if m.connected else "no", _tps(m.assignment), _tps(m.revoking) or "-"]
            for m in d.members
        ]
        print(table(["MEMBER", "INSTANCE", "CLIENT", "PEER", "CONNECTED", "ASSIGNMENT", "REVOKING"], members))
    return 0


def _tps(tps) -> str:
    return " ".join(f"{t.topic}:{','.join(map(str, t.partitions))}" for t in tps)


def cmd_delete(args: argparse.Namespace) -> int:
    with Admin(args.server, **client_options(args)) as admin:
        admin.delete_group(args.group)
    print(f"deleted group {args.group}")
    return 0


def _target(args: argparse.Namespace) -> dict:

    if args.to_earliest:
        return {"position": pb.OFFSET_SPEC_EARLIEST}
    if args.to_latest:
        return {"position": pb.OFFSET_SPEC_LATEST}
    if args.to_offset is not None:
        if args.to_offset < 0:
            raise ValueError("--to-offset must not be negative")
        return {"offset": args.to_offset}
    if args.shift_by is not None:
        return {"shift_by": args.shift_by}
    if args.to_datetime is not None:
        return {"timestamp_ms": parse_time(args.to_datetime)}
    if args.by_duration is not None:
        return {"duration_ms": parse_duration_ms(args.by_duration)}
    return {"undo": True}


def cmd_reset(args: argparse.Namespace) -> int:
    partitions = None if args.all_topics else parse_topic_partitions(args.topic or [])
    if partitions is not None and not partitions and not args.undo:
        raise ValueError("name --topic T[:P,...] (repeatable) or --all-topics")
    with Admin(args.server, **client_options(args)) as admin:
        reply = admin.reset_offsets(args.group, partitions=partitions, execute=args.execute, **_target(args))
    if args.json:
        print(json.dumps(_json(reply)))
        return 0
    rows = []
    for e in reply.plan:
        delta = e.new_offset - e.old_offset if e.old_offset >= 0 and e.new_offset >= 0 else "-"
        note = f"clamped from {e.requested_offset} to [{e.log_start_offset}, {e.log_end_offset}]" if e.clamped else ""
        rows.append([args.group, e.topic, e.partition, _offset(e.old_offset), _offset(e.new_offset), delta, note])
    print(table(["GROUP", "TOPIC", "PARTITION", "OLD-OFFSET", "NEW-OFFSET", "DELTA", "NOTE"], rows))
    clamped = sum(e.clamped for e in reply.plan)
    if clamped:
        print(f"{clamped} partition(s) clamped to the valid offset range", file=sys.stderr)
    if reply.executed:
        fenced = f"; live members fenced at generation {reply.generation}" if reply.generation else ""
        print(f"applied to {len(reply.plan)} partition(s){fenced} (undo with --undo)")
    else:
        print("dry run: nothing changed (add --execute to apply)")
    return 0


def _offset(value: int) -> object:
    return value if value >= 0 else "-"


def add_parser(sub) -> None:
    groups = sub.add_parser("groups", help="consumer groups: list, describe, delete, reset-offsets")
    gsub = groups.add_subparsers(dest="groups_command", required=True)
    p = gsub.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = gsub.add_parser("describe", help="members, assignment and lag per partition")
    p.add_argument("group")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_describe)
    p = gsub.add_parser("delete", help="delete a group without members (its committed offsets)")
    p.add_argument("group")
    p.set_defaults(func=cmd_delete)

    p = gsub.add_parser("reset-offsets", help="move a group's committed offsets (plan; --execute applies)")
    p.add_argument("group")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--topic", action="append", metavar="T[:P,P..]", help="repeatable")
    scope.add_argument("--all-topics", action="store_true")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-earliest", action="store_true")
    target.add_argument("--to-latest", action="store_true")
    target.add_argument("--to-offset", type=int, metavar="N")
    target.add_argument("--shift-by", type=int, metavar="±N")
    target.add_argument("--to-datetime", metavar="ISO-8601")
    target.add_argument("--by-duration", metavar="PnDTnHnMnS", help="to now minus this duration")
    target.add_argument("--undo", action="store_true", help="restore the offsets the last executed reset replaced")
    p.add_argument("--execute", action="store_true", help="apply the plan (default: print it only)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reset)
