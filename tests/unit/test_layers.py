"""Who may import whom: every module of ``streamd/``, ``segments/`` and
``consumer_groups/`` is parsed with ``ast`` (no import runs), placed in its room,
and every import it makes (at the top, in a function, anywhere) must point to its
own room or one the graph below allows; and no two modules may import each other,
directly or round a circle (a circle dodged with a function-level import is still
one). Imports under ``if TYPE_CHECKING:`` never run, so they count for the rooms
but not for circles.

The graph, top to bottom (a room may import those on its right)::

    cli              server, client, broker (DataDirLocked), segments (offline inspect), shared
    server           service, metrics, broker, consumer_groups, segments, client, shared
    service          metrics, broker, consumer_groups, segments, shared
    metrics          broker, consumer_groups, segments, shared
    broker           segments, shared
    consumer_groups  segments, shared
    client           shared
    segments         (nothing of the project)

``shared`` is the bottom both the broker and the SDK stand on: the generated wire
types, the record codec, errors' root, clock, partitioner, addresses, logs, auth.
The broker never imports the SDK, metrics never imports the servicers, and queue
groups reach the broker only through the face they declare
(``consumer_groups.queue.host``).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("segments", "consumer_groups", "streamd")

#: The bottom: modules (or packages, with everything under them) any room may use.
SHARED = (
    "streamd", "streamd.errors", "streamd.clock", "streamd.codec", "streamd.v1", "streamd.wire_pb2",
    "streamd.partitioner", "streamd.addresses", "streamd.logs", "streamd._malloc", "streamd.auth",
)
#: Room -> the module prefixes it holds (a module belongs to its longest match).
ROOMS = {
    "shared": SHARED,
    "segments": ("segments",),
    "consumer_groups": ("consumer_groups",),
    "broker": ("streamd.broker",),
    "metrics": ("streamd.metrics",),
    "service": ("streamd.service",),
    "client": ("streamd.client",),
    # The one place that wires config, broker, services and metrics.
    "server": ("streamd.server", "streamd.config", "streamd.testing"),
    # `streamd serve` starts the server and `streamd inspect` reads segment files offline.
    "cli": ("streamd.cli", "streamd.__main__"),
}
#: Room -> the other rooms it may import.
ALLOWED = {
    "shared": set(),
    "segments": set(),
    "consumer_groups": {"segments", "shared"},
    "broker": {"segments", "shared"},
    "metrics": {"broker", "consumer_groups", "segments", "shared"},
    "service": {"metrics", "broker", "consumer_groups", "segments", "shared"},
    "client": {"shared"},
    "server": {"service", "metrics", "broker", "consumer_groups", "segments", "client", "shared"},
    "cli": {"server", "client", "broker", "segments", "shared"},
}


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's ``__init__``) for every module."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def imports(name: str, path: Path, is_package: bool, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs at import or call time) for every import of the
    module that names one of ``known``: top-level or not, absolute or relative."""
    tree = ast.parse(path.read_text(), str(path))
    static = _type_checking_only(tree)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module.
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [module, *subs]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.append((target, node.lineno, id(node) not in static))
    return found


def room(module: str) -> str | None:
    best, best_len = None, -1
    for r, prefixes in ROOMS.items():
        for p in prefixes:
            hit = module == p or (p != "streamd" and module.startswith(p + "."))
            if hit and len(p) > best_len:
                best, best_len = r, len(p)
    return best


def graph(root: Path) -> tuple[dict[str, tuple[Path, bool]], dict[str, list[tuple[str, int, bool]]]]:
    mods = modules(root)
    known = set(mods)
    return mods, {m: imports(m, p, pkg, known) for m, (p, pkg) in mods.items()}


def upward_arrows(root: Path) -> list[str]:
    mods, edges = graph(root)
    bad = []
    for m, targets in edges.items():
        here = room(m)
        if here is None:
            bad.append(f"{m}: in no room (add it to ROOMS in tests/unit/test_layers.py)")
            continue
        for target, line, _ in targets:
            there = room(target)
            if there != here and there not in ALLOWED[here]:
                bad.append(f"{mods[m][0].relative_to(root)}:{line}: {m} ({here}) imports {target} ({there})")
    return sorted(bad)


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), over
    the imports that run."""
    _, edges = graph(root)
    succ = {m: sorted({t for t, _, runs in ts if runs}) for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return sorted(out)


def test_every_import_points_down_the_layer_graph():
    assert upward_arrows(ROOT) == []


def test_no_module_import_circle():
    assert cycles(ROOT) == []


def test_the_broker_imports_neither_the_sdk_nor_the_servicers():
    _, edges = graph(ROOT)
    for m, targets in edges.items():
        if room(m) in ("broker", "consumer_groups", "segments", "metrics"):
            assert not [t for t, _, _ in targets if room(t) in ("client", "service", "cli", "server")], m


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


def test_walker_sees_function_level_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        "streamd/broker/a.py": """
            def f():
                from streamd.client import records  # upward, hidden in a function
        """,
        "streamd/client/__init__.py": "",
        "streamd/client/records.py": "from . import helper\n",
        "streamd/client/helper.py": """
            def g():
                from .records import x  # a circle, dodged at call time
        """,
    })
    assert upward_arrows(root) == [
        "streamd/broker/a.py:3: streamd.broker.a (broker) imports streamd.client.records (client)"
    ]
    assert cycles(root) == [["streamd.client.helper", "streamd.client.records"]]


def test_walker_ignores_type_checking_imports_for_circles_only(tmp_path):
    root = _tree(tmp_path, {
        "consumer_groups/a.py": "from . import b\n",
        "consumer_groups/b.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from . import a
                from streamd.service import glue
        """,
        "streamd/service/__init__.py": "",
        "streamd/service/glue.py": "",
    })
    assert cycles(root) == []
    assert upward_arrows(root) == [
        "consumer_groups/b.py:5: consumer_groups.b (consumer_groups) imports streamd.service.glue (service)"
    ]
