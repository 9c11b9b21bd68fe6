"""``streamd health``: a gRPC health-check client for container and Kubernetes probes.

It asks the broker's ``grpc.health.v1.Health/Check`` (the whole server by default,
or one service with ``--service streamd.v1.LogService``) and prints one line.

Exit codes: 0 SERVING; 1 anything else the broker answers (NOT_SERVING while it
stops, UNKNOWN, or an unknown service name); 2 no answer (nothing listening, or no
reply within ``--timeout`` seconds).
"""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamd.client._channel import server_address, sync_channel

SERVING, NOT_SERVING, UNREACHABLE = 0, 1, 2
DEFAULT_TIMEOUT_S = 5.0


def check(server: str | None, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, str]:
    """(exit code, the line to print)."""
    address = server_address(server)
    channel = sync_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        # types-grpcio-health-checking declares HealthStub without its methods (set in __init__).
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return NOT_SERVING, f"SERVICE_UNKNOWN {service!r} on {address}"
        return UNREACHABLE, f"UNREACHABLE {address}: {exc.code().name} {exc.details() or ''}".rstrip()
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    what = f"{address} {service}".rstrip()
    return (SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING), f"{status} {what}"


def cmd_health(args: argparse.Namespace) -> int:
    timeout = DEFAULT_TIMEOUT_S if getattr(args, "timeout", None) is None else args.timeout
    if not timeout > 0:
        raise ValueError("--timeout must be positive")
    code, line = check(args.server, args.service, timeout)
    print(line)
    return code


def add_parser(sub) -> None:
    """Register ``health`` on the ``streamd`` subparsers."""
    p = sub.add_parser("health", help="gRPC health check: exit 0 SERVING, 1 not serving, 2 unreachable")
    # SUPPRESS: an unset --server here keeps the one given before the subcommand.
    p.add_argument("--server", default=argparse.SUPPRESS,
                   help="broker address (default $STREAMD_SERVER or 127.0.0.1:50051)")
    p.add_argument("--service", default="", help="a service name, e.g. streamd.v1.LogService (default: the server)")
    # SUPPRESS: unset here, a global --timeout (given before the subcommand) applies.
    p.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="S",
                   help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(func=cmd_health)
