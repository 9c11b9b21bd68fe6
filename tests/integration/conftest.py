"""Fixtures shared by the gRPC tests."""

from __future__ import annotations

import pytest

from .helpers import Stubs


@pytest.fixture
def stubs(server):
    """Raw stubs on the test's server (a module may override it, e.g. for a restartable server)."""
    s = Stubs(server.address)
    try:
        yield s
    finally:
        s.close()
