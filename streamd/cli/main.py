"""``streamd`` subcommands: serve, health, topics, produce, consume, offsets, groups, queue, replay, inspect.

Exit codes: 0 success, 1 error (one line on stderr), 2 usage error (argparse);
``streamd health`` has its own (0 SERVING, 1 not serving, 2 unreachable).
The server address comes from ``--server``, else ``STREAMD_SERVER``, else
127.0.0.1:50051. ``--timeout SECONDS`` (default 30) bounds every call to it
(``timeouts``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from streamd.client import Admin, Consumer, CorruptRecordsError, Producer, StreamdError
from streamd.client.admin import COMPRESSION, FSYNC
from streamd.config import CONFIG_ENV, BrokerConfig

from . import groups as groups_cmd
from . import health as health_cmd
from . import inspect as inspect_cmd
from . import queue as queue_cmd
from . import replay as replay_cmd
from . import timeouts
from .common import client_warnings, parse_time
from .format import format_record, record_json, table
from .timeouts import client_options, producer_options


def _topic_json(t) -> dict:
    return json_format.MessageToDict(t, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _ms(ts: int) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts / 1000, dt.UTC).isoformat(timespec="milliseconds")


# -- serve --------------------------------------------------------------------
#: ``streamd serve`` flags for the common settings (every setting can come from the
#: config file or a STREAMD_* variable); each is the setting's name with dashes.
SERVE_FLAGS = {
    "data_dir": str, "listen": str, "metrics_listen": str, "fsync_policy": str, "segment_bytes": int, "retention_ms": int,
    "default_partitions": int, "shutdown_grace_s": float, "shutdown_drain_s": float,
    "log_level": str, "log_format": str,
    "tls_cert_file": str, "tls_key_file": str, "tls_client_ca_file": str, "auth_file": str,
}
SERVE_ALIASES = {"fsync_policy": ["--fsync"], "tls_cert_file": ["--tls-cert"], "tls_key_file": ["--tls-key"],
                 "tls_client_ca_file": ["--tls-client-ca"]}
SERVE_HELP = {
    "data_dir": "data directory (default ./data)",
    "listen": "HOST:PORT (default 127.0.0.1:50051)",
    "metrics_listen": "Prometheus /metrics over HTTP, HOST:PORT (default 127.0.0.1:9464; '' turns it off)",
    "fsync_policy": "default topic fsync policy: always | interval | never",
    "shutdown_grace_s": "seconds in-flight RPCs get to finish on SIGTERM/SIGINT (default 10)",
    "shutdown_drain_s": "seconds a stopping broker keeps answering NOT_SERVING/UNAVAILABLE (default 0)",
    "log_level": "DEBUG | INFO | WARNING | ERROR | CRITICAL",
    "log_format": "text (default) | json (one object per line)",
    "tls_cert_file": "server certificate chain (PEM): serve TLS",
    "tls_key_file": "server private key (PEM)",
    "tls_client_ca_file": "CA (PEM) client certificates must chain to: mutual TLS",
    "auth_file": "principals, tokens and allow rules (TOML; see docs/operations.md, Security)",
}


def cmd_serve(args: argparse.Namespace) -> int:
    from streamd.server import run

    flags = {name: getattr(args, name) for name in SERVE_FLAGS}
    if flags["data_dir"] is not None:
        flags["data_dir"] = Path(flags["data_dir"])
    config_file = args.config or os.environ.get(CONFIG_ENV) or None
    config = BrokerConfig.load(flags=flags, file=Path(config_file) if config_file else None)
    if args.print_config:
        sys.stdout.write(config.to_toml())
        return 0
    from streamd.broker.broker import DataDirLocked

    try:
        run(config)
    except DataDirLocked as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return 1
    return 0


# -- topics -------------------------------------------------------------------
def cmd_topics_create(args: argparse.Namespace) -> int:
    with Admin(args.server, **client_options(args)) as admin:
        t = admin.create_topic(
            args.name,
            args.partitions,
            retention_ms=args.retention_ms,
            retention_bytes=args.retention_bytes,
            segment_bytes=args.segment_bytes,
            segment_ms=args.segment_ms,
            max_record_bytes=args.max_record_bytes,
            fsync=args.fsync,
            fsync_interval_ms=args.fsync_interval_ms,
            compression=args.compression,
            dedup_window_ms=args.dedup_window_ms,
        )
    print(json.dumps(_topic_json(t)) if args.json else f"created topic {t.name} with {t.partition_count} partition(s)")
    return 0


def cmd_topics_list(args: argparse.Namespace) -> int:
    with Admin(args.server, **client_options(args)) as admin:
        topics = admin.list_topics()
    if args.json:
        print(json.dumps([_topic_json(t) for t in topics]))
        return 0
    rows = [
        (t.name, t.partition_count, sum(p.log_end_offset - p.log_start_offset for p in t.partitions),
         sum(p.size_bytes for p in t.partitions))
        for t in topics
    ]
    print(table(["TOPIC", "PARTITIONS", "RECORDS", "BYTES"], rows))
    return 0


def cmd_topics_describe(args: argparse.Namespace) -> int:
    with Admin(args.server, **client_options(args)) as admin:
        t = admin.describe_topic(args.name)
    if args.json:
        print(json.dumps(_topic_json(t)))
        return 0
    c = t.config
    fsync = {v: k for k, v in FSYNC.items()}.get(c.fsync_policy, "?")
    compression = {v: k for k, v in COMPRESSION.items()}.get(c.compression, "?")
    print(f"topic {t.name}: {t.partition_count} partition(s), created {_ms(t.created_ms)}")
    print(
        f"config: retention_ms={c.retention_ms} retention_bytes={c.retention_bytes} segment_bytes={c.segment_bytes} "
        f"segment_ms={c.segment_ms} max_record_bytes={c.max_record_bytes} fsync={fsync} "
        f"fsync_interval_ms={c.fsync_interval_ms} compression={compression}"
        + (f" dedup_window_ms={c.dedup_window_ms}" if c.dedup_window_ms else "")
    )
    rows = [
        (p.partition, p.log_start_offset, p.log_end_offset, p.segment_count, p.size_bytes,
         _ms(p.oldest_timestamp_ms), _ms(p.newest_timestamp_ms))
        for p in t.partitions
    ]
    print(table(["PARTITION", "LOG-START", "LOG-END", "SEGMENTS", "BYTES", "OLDEST", "NEWEST"], rows))
    for p in t.partitions:
        for d in p.damaged:
            print(f"damaged: partition {p.partition} offsets {d.first_offset}..{d.last_offset} cannot be read "
                  f"({d.cause})")
    return 0


def cmd_topics_delete(args: argparse.Namespace) -> int:
    with Admin(args.server, **client_options(args)) as admin:
        admin.delete_topic(args.name)
    print(f"deleted topic {args.name}")
    return 0


# -- produce / consume / offsets -------------------------------------------------
def cmd_produce(args: argparse.Namespace) -> int:
    futures = []
    with Producer(args.server, linger_ms=args.linger_ms, compression=args.compression,
                  **producer_options(args)) as producer:
        for line in sys.stdin.buffer:
            line = line.rstrip(b"\r\n")
            key = None
            if args.key_delimiter is not None:
                delim = args.key_delimiter.encode()
                if delim in line:
                    key, line = line.split(delim, 1)
            futures.append(producer.send(args.topic, line, key=key, partition=args.partition))
        producer.flush()
        errors = [f.exception() for f in futures if f.exception() is not None]
    acked = len(futures) - len(errors)
    if args.json:
        print(json.dumps({"acknowledged": acked, "failed": len(errors)}))
    else:
        print(f"{acked} record(s) acknowledged", file=sys.stderr)
    if errors:
        print(f"streamd: {len(errors)} record(s) failed: {errors[0]}", file=sys.stderr)
        return 1
    return 0


def _start(consumer: Consumer, topic: str, partitions, start: str) -> None:
    if start in ("beginning", "end"):
        consumer.assign(topic, partitions, start=start)
    elif start.startswith("@"):
        consumer.assign(topic, partitions)
        consumer.seek_to_time(topic, parse_time(start))
    else:
        offset = int(start)
        consumer.assign(topic, partitions)
        for (t, p) in list(consumer.positions):
            if offset < 0:  # relative to the end, as kcat's -o -N
                consumer.seek(t, p, max(consumer.ends[(t, p)] + offset, 0))
            else:
                consumer.seek(t, p, offset)


def cmd_consume(args: argparse.Namespace) -> int:
    fmt = args.format
    count = 0
    out = sys.stdout
    with Consumer(args.server, skip_corrupt=args.skip_corrupt, **client_options(args)) as consumer, \
            client_warnings():
        _start(consumer, args.topic, None if args.partition is None else [args.partition], args.from_)
        try:
            for record in consumer.records(exit_at_end=args.exit_at_end):
                out.write(record_json(record) + "\n" if args.json else format_record(fmt, record))
                count += 1
                if args.count is not None and count >= args.count:
                    break
        except KeyboardInterrupt:
            pass
        except CorruptRecordsError as exc:
            out.flush()
            print(f"streamd: {exc} (--skip-corrupt reads on past them)", file=sys.stderr)
            return 1
        finally:
            out.flush()
    return 0


def cmd_offsets(args: argparse.Namespace) -> int:
    with Admin(args.server, **client_options(args)) as admin:
        earliest = admin.list_offsets(args.topic)
        at = admin.list_offsets(args.topic, timestamp_ms=parse_time(args.at)) if args.at else None
    rows = []
    for i, o in enumerate(earliest):
        row = {"partition": o.partition, "earliest": o.log_start_offset, "latest": o.log_end_offset}
        if at is not None:
            row["at"] = at[i].offset
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        print(table([k.upper() for k in rows[0]] if rows else ["PARTITION"], [list(r.values()) for r in rows]))
    return 0


def cmd_new_token(args: argparse.Namespace) -> int:
    from streamd.auth import new_token

    token, digest = new_token()
    print(f"token (give it to the client as STREAMD_TOKEN; it is not stored anywhere): {token}")
    print(f'\n[[principal]]\nname = "{args.principal}"\ntoken_sha256 = ["{digest}"]')
    return 0


def _client_security(args: argparse.Namespace) -> None:
    """The global TLS and token flags, for every client this command makes (they read
    the environment; see ``streamd.client._channel``)."""
    for flag, env in (("tls_ca", "STREAMD_TLS_CA"), ("tls_client_cert", "STREAMD_TLS_CERT"),
                      ("tls_client_key", "STREAMD_TLS_KEY")):
        if getattr(args, flag, None):
            os.environ[env] = getattr(args, flag)
    if getattr(args, "token_file", None):
        with open(args.token_file) as fh:
            os.environ["STREAMD_TOKEN"] = fh.read().strip()


# -- parser ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamd", description="streamd: event log and work queue")
    parser.add_argument("--server", help="broker address (default $STREAMD_SERVER or 127.0.0.1:50051)")
    parser.add_argument("--tls-ca", help="CA (PEM) that signed the broker's certificate: talk TLS ($STREAMD_TLS_CA)")
    parser.add_argument("--tls-client-cert", help="this client's certificate (PEM), for mutual TLS ($STREAMD_TLS_CERT)")
    parser.add_argument("--tls-client-key", help="this client's private key (PEM) ($STREAMD_TLS_KEY)")
    parser.add_argument("--token-file", help="file holding the bearer token (else $STREAMD_TOKEN)")
    timeouts.add_global(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run a broker")
    for name, kind in SERVE_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        aliases = SERVE_ALIASES.get(name, [])
        p.add_argument(flag, *aliases, dest=name, type=kind, help=SERVE_HELP.get(name))
    p.add_argument("--config", help=f"TOML config file (default ${CONFIG_ENV})")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config as TOML (usable as --config) and exit")
    p.set_defaults(func=cmd_serve)

    auth = sub.add_parser("auth", help="tokens for the auth file").add_subparsers(dest="auth_command", required=True)
    p = auth.add_parser("new-token", help="print a new token and the auth-file lines holding its SHA-256")
    p.add_argument("--principal", default="NAME")
    p.set_defaults(func=cmd_new_token)

    topics = sub.add_parser("topics", help="manage topics").add_subparsers(dest="topics_command", required=True)
    p = topics.add_parser("create")
    p.add_argument("name")
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--retention-ms", type=int)
    p.add_argument("--retention-bytes", type=int)
    p.add_argument("--segment-bytes", type=int)
    p.add_argument("--segment-ms", type=int)
    p.add_argument("--max-record-bytes", type=int)
    p.add_argument("--fsync", choices=sorted(FSYNC))
    p.add_argument("--fsync-interval-ms", type=int)
    p.add_argument("--compression", choices=["producer", "lz4"])
    p.add_argument("--dedup-window-ms", type=int,
                   help="drop records whose idempotency key the partition saw within this window (0: off)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_topics_create)
    p = topics.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_topics_list)
    p = topics.add_parser("describe")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_topics_describe)
    p = topics.add_parser("delete")
    p.add_argument("name")
    p.set_defaults(func=cmd_topics_delete)

    p = sub.add_parser("produce", help="produce one record per stdin line")
    p.add_argument("topic")
    p.add_argument("--partition", type=int)
    p.add_argument("--key-delimiter", help="split each line into KEY<delim>VALUE")
    p.add_argument("--linger-ms", type=float, default=5)
    p.add_argument("--compression", choices=["none", "lz4"], default="none")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("consume", help="print records (kcat-like)")
    p.add_argument("topic")
    p.add_argument("--partition", type=int)
    p.add_argument("--from", dest="from_", default="beginning",
                   help="beginning | end | OFFSET | -N (N before the end) | @EPOCH_MS | @ISO-8601")
    p.add_argument("--exit-at-end", action="store_true", help="stop at the end instead of tailing")
    p.add_argument("--count", type=int, help="stop after N records")
    p.add_argument("--format", default="%s\\n",
                   help="kcat tokens: %%t %%p %%o %%k %%s %%T %%h, escapes \\n \\t (default '%%s\\n')")
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="go on past records the broker cannot read (a damaged log), with a warning naming "
                        "them, instead of stopping with an error")
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("offsets", help="earliest/latest offsets per partition")
    p.add_argument("topic")
    p.add_argument("--at", help="also the first offset at/after this time (epoch ms or ISO-8601)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_offsets)
    groups_cmd.add_parser(sub)
    health_cmd.add_parser(sub)
    inspect_cmd.add_parser(sub)
    queue_cmd.add_parser(sub)
    replay_cmd.add_parser(sub)
    timeouts.add_to_commands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _client_security(args)
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
    except (StreamdError, ValueError, OSError) as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return 1
