"""The SDK's public face: ``streamd.client`` exports every client, value and error that
users (the docs, the tests, the benchmarks, the CLI) take from its submodules, and
each blocking client offers every method of the asyncio client it wraps."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import streamd.client
from streamd.client import Admin, AsyncAdmin, AsyncGroupConsumer, GroupConsumer

ROOT = Path(__file__).resolve().parents[2]
#: Classes of public submodules that are building blocks, not part of the SDK's face.
INTERNAL = {"RecordFields"}  # the lazy record fields ConsumerRecord and Message share
CLIENTS = {"Admin", "AsyncAdmin", "Consumer", "AsyncConsumer", "Producer", "AsyncProducer",
           "GroupConsumer", "AsyncGroupConsumer", "QueueReceiver", "AsyncQueueReceiver"}
IMPORT = re.compile(r"from streamd\.client\.([a-z]\w*) import \(?([\w\s,]+)\)?")


def _public_submodules():
    for info in pkgutil.iter_modules(streamd.client.__path__):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"streamd.client.{info.name}")


def test_all_names_resolve_once_and_in_order():
    names = streamd.client.__all__
    assert names == sorted(set(names))
    for name in names:
        assert getattr(streamd.client, name) is not None, name
    assert CLIENTS <= set(names)


def test_every_class_of_a_public_submodule_is_exported():
    missing = []
    for module in _public_submodules():
        for name, value in vars(module).items():
            if (inspect.isclass(value) and value.__module__ == module.__name__ and not name.startswith("_")
                    and name not in INTERNAL
                    and (name not in streamd.client.__all__ or getattr(streamd.client, name) is not value)):
                missing.append(f"{module.__name__}.{name}")
    assert not missing


def test_classes_users_import_from_submodules_are_exported():
    """Every class the docs, tests, benchmarks or CLI import from a public submodule
    (``from streamd.client.<module> import <Class>``) is in ``__all__``."""
    sources = [*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("tests/**/*.py"),
               *ROOT.glob("bench/**/*.py"), *ROOT.glob("streamd/cli/**/*.py")]
    missing = set()
    for path in sources:
        for module_name, names in IMPORT.findall(path.read_text(errors="replace")):
            module = importlib.import_module(f"streamd.client.{module_name}")
            for name in (n.split(" as ")[0].strip() for n in names.split(",")):
                value = getattr(module, name, None) if name else None
                if inspect.isclass(value) and name not in INTERNAL and name not in streamd.client.__all__:
                    missing.add(f"{path.relative_to(ROOT)}: streamd.client.{module_name}.{name}")
    assert not missing


def _public_methods(cls: type) -> set[str]:
    return {name for name, value in vars(cls).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))}


def test_each_blocking_client_offers_every_method_of_its_async_engine():
    assert _public_methods(AsyncAdmin) <= _public_methods(Admin)
    group_state = {"group", "topics", "member_id", "generation", "assigned", "positions", "processed", "committed"}
    assert _public_methods(AsyncGroupConsumer) | group_state <= _public_methods(GroupConsumer)
    for name in _public_methods(AsyncAdmin):
        assert inspect.iscoroutinefunction(getattr(AsyncAdmin, name)) or isinstance(
            vars(AsyncAdmin)[name], property), name
        assert not inspect.iscoroutinefunction(getattr(Admin, name)), name
