"""Generated stubs are committed; they must match what proto/ generates now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    "streamd/v1/streamd_pb2.py",
    "streamd/v1/streamd_pb2.pyi",
    "streamd/v1/streamd_pb2_grpc.py",
    "streamd/wire_pb2.py",
    "streamd/wire_pb2.pyi",
]


def test_committed_stubs_match_the_protos(tmp_path):
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    (tmp_path / "streamd").mkdir()
    shutil.copy(ROOT / "streamd" / "wire.proto", tmp_path / "streamd" / "wire.proto")
    protoc = [sys.executable, "-m", "grpc_tools.protoc"]
    subprocess.run(
        protoc + ["-Iproto", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.", "proto/streamd/v1/streamd.proto"],
        cwd=tmp_path, check=True,
    )
    subprocess.run(protoc + ["-I.", "--python_out=.", "--pyi_out=.", "streamd/wire.proto"], cwd=tmp_path, check=True)
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), f"{name} is stale: run `make proto`"
