"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader loading proto/) works.

``node --test`` runs every ``tests/node/*.test.js``: client (topics, produce, fetch,
subscribe), group (a consumer-group member) and queue (a queue worker).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from ..conftest import ROOT

NODE_DIR = ROOT / "tests" / "node"


@pytest.mark.skipif(shutil.which("node") is None and not os.environ.get("CI"), reason="node is not installed")
def test_node_client_produces_fetches_subscribes_joins_a_group_and_works_a_queue(server):
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
    # Every file ran (node picks them by its own glob): at least one passing test each.
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.MULTILINE)
    assert passed and int(passed[1]) >= len(list(NODE_DIR.glob("*.test.js"))), result.stdout
