"""``--timeout SECONDS``: how long any one call of a ``streamd`` command may wait for
the broker (default ``DEFAULT_TIMEOUT_S``, 30 s), before or after the subcommand.

Each client a command makes gets it as its deadline (``timeout_s``; a long-poll adds
its own wait); a producer as its request and delivery timeouts, so ``produce``
gives up on a record after that long. Streaming commands (``consume`` without
``--exit-at-end``) tail for as long as they run, each call bounded. A missed
deadline is an error like any other: one line on stderr, exit 1. ``streamd health``
keeps its own default (5 s) and exit codes.
"""

from __future__ import annotations

import argparse

DEFAULT_TIMEOUT_S = 30.0
HELP = f"seconds any one call may wait for the broker (default {DEFAULT_TIMEOUT_S:g})"


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def add_global(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS", help=HELP)


def add_to_commands(parser: argparse.ArgumentParser) -> None:
    """Accept ``--timeout`` after every subcommand too (SUPPRESS: unset there, the one
    given before the subcommand stays); a command with its own keeps it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                add_to_commands(sub)
            return
    if "--timeout" not in parser._option_string_actions:
        parser.add_argument("--timeout", type=seconds, default=argparse.SUPPRESS, metavar="SECONDS", help=HELP)


def timeout_s(args: argparse.Namespace) -> float:
    value = getattr(args, "timeout", None)
    return DEFAULT_TIMEOUT_S if value is None else value


def client_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for Admin, Consumer, QueueReceiver, ..."""
    return {"timeout_s": timeout_s(args)}


def producer_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for Producer: each attempt, and each record in all, within it."""
    ms = timeout_s(args) * 1000
    return {"request_timeout_ms": ms, "delivery_timeout_ms": ms}
