"""The CLI through main(argv) against a real broker, plus a subprocess smoke test."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from streamd.cli.main import main

from ..conftest import ROOT


def run_cli(capsys, monkeypatch, server, *argv, stdin: str | None = None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    code = main(["--server", server.address, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_session_create_produce_consume(server, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, server, "topics", "create", "orders", "--partitions", "2",
                           "--fsync", "interval", "--retention-ms", "3600000")
    assert code == 0 and "created topic orders" in out
    code, _, err = run_cli(capsys, monkeypatch, server, "produce", "orders", "--key-delimiter", ":",
                           stdin="k1:one\nk2:two\nk1:three\n")
    assert code == 0 and "3 record(s) acknowledged" in err
    code, out, _ = run_cli(capsys, monkeypatch, server, "consume", "orders", "--exit-at-end",
                           "--format", "%k=%s@%p/%o\\n")
    assert code == 0
    lines = out.splitlines()
    assert sorted(line.split("@")[0] for line in lines) == ["k1=one", "k1=three", "k2=two"]
    k1 = [line for line in lines if line.startswith("k1=")]
    assert k1[0].startswith("k1=one") and k1[1].startswith("k1=three")  # key order kept
    code, out, _ = run_cli(capsys, monkeypatch, server, "consume", "orders", "--exit-at-end", "--json", "--count", "1")
    record = json.loads(out)
    assert set(record) == {"topic", "partition", "offset", "timestamp_ms", "key", "value", "headers"}


def test_cli_topics_list_describe_delete_and_offsets(server, capsys, monkeypatch):
    run_cli(capsys, monkeypatch, server, "topics", "create", "t", "--partitions", "3")
    run_cli(capsys, monkeypatch, server, "produce", "t", "--partition", "1", stdin="a\nb\n")
    code, out, _ = run_cli(capsys, monkeypatch, server, "topics", "list")
    assert code == 0 and out.splitlines()[0].split() == ["TOPIC", "PARTITIONS", "RECORDS", "BYTES"]
    assert out.splitlines()[1].split()[:3] == ["t", "3", "2"]
    code, out, _ = run_cli(capsys, monkeypatch, server, "topics", "describe", "t", "--json")
    doc = json.loads(out)
    assert doc["partitions"][1]["log_end_offset"] == "2"
    code, out, _ = run_cli(capsys, monkeypatch, server, "offsets", "t", "--json", "--at", "2000-01-01T00:00:00Z")
    assert [(r["partition"], r["earliest"], r["latest"], r["at"]) for r in json.loads(out)] == [
        (0, 0, 0, 0), (1, 0, 2, 0), (2, 0, 0, 0)]
    code, out, _ = run_cli(capsys, monkeypatch, server, "consume", "t", "--partition", "1", "--from", "1",
                           "--exit-at-end")
    assert out == "b\n"
    code, out, _ = run_cli(capsys, monkeypatch, server, "topics", "delete", "t")
    assert code == 0


def test_cli_errors_exit_1_with_one_line_and_usage_errors_exit_2(server, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, server, "topics", "describe", "missing")
    assert code == 1 and err.count("\n") == 1 and "TOPIC_NOT_FOUND" in err
    with pytest.raises(SystemExit) as exited:
        main(["topics", "create"])
    assert exited.value.code == 2


def test_cli_consume_from_time_and_relative_offsets(server, capsys, monkeypatch):
    run_cli(capsys, monkeypatch, server, "topics", "create", "t")
    run_cli(capsys, monkeypatch, server, "produce", "t", stdin="a\nb\nc\n")
    code, out, _ = run_cli(capsys, monkeypatch, server, "consume", "t", "--from", "-1", "--exit-at-end")
    assert out == "c\n"
    code, out, _ = run_cli(capsys, monkeypatch, server, "consume", "t", "--from", "@0", "--exit-at-end")
    assert out == "a\nb\nc\n"
    code, out, _ = run_cli(capsys, monkeypatch, server, "consume", "t", "--from", "end", "--exit-at-end")
    assert out == ""


def test_cli_subprocess_smoke(server_process, tmp_path):
    proc = server_process()
    cli = [sys.executable, "-m", "streamd", "--server", proc.address]
    subprocess.run(cli + ["topics", "create", "smoke"], check=True, cwd=ROOT, timeout=60)
    subprocess.run(cli + ["produce", "smoke"], input=b"hello\nworld\n", check=True, cwd=ROOT, timeout=60)
    out = subprocess.run(cli + ["consume", "smoke", "--exit-at-end"], capture_output=True, check=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout == b"hello\nworld\n"
    assert proc.terminate() == 0
