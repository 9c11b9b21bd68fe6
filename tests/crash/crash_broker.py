"""A broker for crash tests: ``streamd serve`` with a test hook injected.

    python -m tests.crash.crash_broker --crash-after-append N [streamd serve flags...]

builds the broker as ``streamd serve`` does (the same flags, defaults and config
loading) and serves it with ``ServerHooks(on_durable_append=...)`` that SIGKILLs this
process once the N-th produce request has been appended and made as durable as its
topic promises, before it is answered: the crash window an idempotent producer's
retry must survive (tests/crash/test_idempotent_crash.py). The hook is passed in, so
production code reads no environment variable for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from streamd import logs
from streamd.cli.main import SERVE_FLAGS, build_parser
from streamd.config import BrokerConfig
from streamd.server import Server, ServerHooks


def command(crash_after_append: int) -> list[str]:
    """The argv that starts this launcher (``ServerProcess(command=...)``)."""
    return [sys.executable, "-m", "tests.crash.crash_broker", "--crash-after-append", str(crash_after_append)]


def kill_at(n: int) -> Callable[[], None]:
    """A hook that SIGKILLs this process on its ``n``-th call."""
    remaining = [n]

    def appended() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    return appended


def main(argv: Sequence[str] | None = None) -> None:
    ours = argparse.ArgumentParser(prog="crash_broker")
    ours.add_argument("--crash-after-append", type=int, required=True, metavar="N")
    known, rest = ours.parse_known_args(argv)
    args = build_parser().parse_args(["serve", *rest])
    flags = {name: getattr(args, name) for name in SERVE_FLAGS}
    if flags["data_dir"] is not None:
        flags["data_dir"] = Path(flags["data_dir"])
    config = BrokerConfig.load(flags=flags, file=None)
    logs.configure(level=config.log_level, log_format=config.log_format)
    hooks = ServerHooks(on_durable_append=kill_at(known.crash_after_append))
    asyncio.run(Server(config, hooks=hooks).serve_forever())


if __name__ == "__main__":
    main()
