"""``streamd inspect`` as a user runs it: a subprocess on a stopped broker's data dir."""

from __future__ import annotations

import json
import subprocess
import sys

from segments import PartitionLog
from streamd.client.records import values_batch

from ..conftest import ROOT


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamd", "inspect", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_inspect_subprocess_verifies_a_partition_and_fails_on_a_flipped_byte(tmp_path):
    path = tmp_path / "data" / "events" / "0"
    with PartitionLog.open(path, segment_bytes=200, segment_ms=10**12, index_interval_bytes=64, now_ms=0) as log:
        for i in range(6):
            log.append(values_batch([f"event-{i}".encode()] * 2).SerializeToString(), record_count=2,
                       append_time_ms=1000 + i)
    done = run(str(path), "--verify", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["log_end_offset"] == 12 and doc["errors"] == 0 and len(doc["segments"]) > 1

    first = path / doc["segments"][0]["file"]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    done = run(str(path), "--verify")
    assert done.returncode == 1 and "checksum mismatch" in done.stdout and "CORRUPT" in done.stdout
    done = run(str(tmp_path / "data"))
    assert done.returncode == 1 and done.stderr.startswith("streamd: ") and done.stdout == ""
