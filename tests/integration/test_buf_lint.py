"""proto/streamd/v1/streamd.proto is clean under buf lint's DEFAULT rules (proto/buf.yaml)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ..conftest import ROOT

NODE_DIR = ROOT / "tests" / "node"
PROTO_DIR = ROOT / "proto"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"


@pytest.mark.skipif(shutil.which("node") is None and not os.environ.get("CI"), reason="node is not installed")
def test_proto_is_buf_lint_clean():
    if not (NODE_DIR / "node_modules" / "@bufbuild" / "buf").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)

    # Guard against a vacuous pass: the module in proto/buf.yaml must hold the contract.
    files = subprocess.run(
        [str(BUF), "ls-files"], cwd=PROTO_DIR, capture_output=True, text=True, timeout=120
    )
    assert files.returncode == 0, files.stdout + files.stderr
    assert "streamd/v1/streamd.proto" in files.stdout.split(), files.stdout + files.stderr

    result = subprocess.run(
        [str(BUF), "lint"], cwd=PROTO_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
