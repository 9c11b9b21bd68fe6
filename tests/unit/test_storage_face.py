"""The storage face: above ``segments/`` nothing reaches into a partition's
``PartitionLog`` (``part.log``) or imports storage internals; ``Partition``
(streamd/broker/partition.py) is the one face. An AST walk over streamd/ and
consumer_groups/, so a regression fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABOVE_STORAGE = ("streamd", "consumer_groups")
#: The one module that holds a Partition's PartitionLog.
FACE = Path("streamd/broker/partition.py")
#: Storage internals: the frame format, segments, indexes, recovery.
INTERNALS = {"segments.batch", "segments.segment", "segments.index", "segments.recovery"}
LOG_ATTRIBUTES = {"log", "_log"}


def _sources() -> list[Path]:
    files = [p for top in ABOVE_STORAGE for p in sorted((ROOT / top).rglob("*.py"))]
    return [p for p in files if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import, ``from segments import batch`` as segments.batch."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def _log_reaches(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, source) of every ``<expr>.log`` and every ``<expr>._log`` but a class's
    own ``self._log`` (the SDK's loggers): what a Partition's PartitionLog would be
    reached by. A module-level ``log`` logger is a Name, not an attribute."""
    return [(node.lineno, ast.unparse(node)) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in LOG_ATTRIBUTES
            and not (node.attr == "_log" and isinstance(node.value, ast.Name) and node.value.id == "self")]


def test_walk_sees_the_code():
    files = {p.relative_to(ROOT) for p in _sources()}
    assert FACE in files and Path("streamd/broker/broker.py") in files and len(files) > 40


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_above_storage_imports_its_internals(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [(line, module) for line, module in _imports(tree)
           if any(module == m or module.startswith(m + ".") for m in INTERNALS)]
    assert not bad, f"{path.relative_to(ROOT)} imports storage internals (use segments' public names): {bad}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_but_partition_reaches_into_a_partition_log(path):
    if path.relative_to(ROOT) == FACE:
        return
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = _log_reaches(tree)
    assert not bad, f"{path.relative_to(ROOT)} reaches a PartitionLog past Partition: {bad}"


def test_the_walk_catches_what_it_forbids():
    tree = ast.parse("from segments.batch import iter_headers\nimport segments.index\n"
                     "from segments import recovery\nx = part.log.log_start_offset\ny = p._log\nz = self._log\n")
    assert [m for _, m in _imports(tree) if any(m == i or m.startswith(i + ".") for i in INTERNALS)] == [
        "segments.batch", "segments.batch.iter_headers", "segments.index", "segments.recovery"]
    assert sorted(src for _, src in _log_reaches(tree)) == ["p._log", "part.log"]
