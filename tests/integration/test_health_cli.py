"""``streamd health``: exit 0 SERVING, 1 NOT_SERVING or an unknown service, 2 unreachable."""

from __future__ import annotations

import subprocess
import sys

from grpc_health.v1 import health_pb2

from streamd.cli.main import main

from ..conftest import ROOT, free_port


def test_health_of_a_serving_broker_exits_0(server, capsys):
    assert main(["health", "--server", server.address]) == 0
    assert capsys.readouterr().out == f"SERVING {server.address}\n"
    assert main(["--server", server.address, "health", "--service", "streamd.v1.QueueService"]) == 0
    assert capsys.readouterr().out == f"SERVING {server.address} streamd.v1.QueueService\n"


def test_health_of_a_broker_not_serving_exits_1(server, capsys):
    async def not_serving():
        await server.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    server.call(not_serving)
    assert main(["health", "--server", server.address, "--timeout", "10"]) == 1
    assert capsys.readouterr().out.startswith("NOT_SERVING ")
    assert main(["health", "--server", server.address, "--service", "no.such.Service"]) == 1
    assert capsys.readouterr().out.startswith("SERVICE_UNKNOWN 'no.such.Service'")


def test_health_with_nothing_listening_exits_2(capsys, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("STREAMD_SERVER", address)
    assert main(["health", "--timeout", "5"]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"UNREACHABLE {address}: ") and out.count("\n") == 1


def test_health_as_a_command_for_container_probes(server):
    result = subprocess.run([sys.executable, "-m", "streamd", "health", "--server", server.address],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"SERVING {server.address}\n")
