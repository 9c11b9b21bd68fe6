"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader loading proto/) works."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ..conftest import ROOT

NODE_DIR = ROOT / "tests" / "node"


@pytest.mark.skipif(shutil.which("node") is None and not os.environ.get("CI"), reason="node is not installed")
def test_node_client_produces_fetches_subscribes_and_joins_a_group(server):
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    result = subprocess.run(
        ["node", "--test"],
        cwd=NODE_DIR,
        env=dict(os.environ, STREAMD_SERVER=server.address),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
