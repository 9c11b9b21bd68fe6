"""Authentication and authorization at the door of every RPC (``streamd.auth``).

``Guard`` finds the caller's principal (a bearer token in the ``authorization``
metadata, else the common name of a verified client certificate), checks what the
method needs against the allow rules before the servicer runs, and filters the
answers of the List methods (and the topics named in a group's answers) to what the
caller may describe. Streams are checked
per message that names resources: each ProduceStream request, JoinGroup's ``join``,
ReceiveStream's ``open``. A unary Produce over its quota is refused
(RESOURCE_EXHAUSTED, with when to retry); a ProduceStream over it is throttled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import grpc

from streamd.auth import (
    GROUP,
    TOPIC,
    Authority,
    PermissionDenied,
    ProduceQuotas,
    QuotaExceeded,
    Unauthenticated,
    needs_of,
)

#: Streams: the field of each message that names the resources to check.
STREAM_PARTS = {"ProduceStream": "request", "JoinGroup": "join", "ReceiveStream": "open"}
#: Methods whose request bytes count against the principal's produce quota.
PRODUCING = ("Produce", "ProduceStream")
#: Answers filtered to what may be described: (repeated field, ((kind, name field), ...));
#: an entry stays only if the caller may describe every resource it names.
LISTS = {
    "ListTopics": ("topics", ((TOPIC, "name"),)),
    "ListGroups": ("groups", ((GROUP, "group"),)),
    "ListQueueGroups": ("groups", ((GROUP, "group"), (TOPIC, "topic"))),
    # Offsets of every topic of a group (an empty request): only the topics it may see.
    "FetchOffsets": ("offsets", ((TOPIC, "topic"),)),
}

#: Answers about a group that name its topics: each place is (repeated field, how an
#: entry names its topic); entries of topics the caller may not describe are dropped,
#: as FetchOffsets drops them (the group itself the caller may describe).
SCRUBBED: dict[str, Callable[[Any], list[tuple[Any, str | None]]]] = {
    "ListGroups": lambda r: [(g.topics, None) for g in r.groups],
    "DescribeGroup": lambda r: [(r.group.partitions, "topic")] + [
        place for m in r.group.members
        for place in ((m.assignment, "topic"), (m.revoking, "topic"), (m.topics, None))],
}


def _keep(entries, may, topic_of: str | None) -> None:
    for i in reversed(range(len(entries))):
        if not may(entries[i] if topic_of is None else getattr(entries[i], topic_of)):
            del entries[i]


class Guard:
    def __init__(self, authority: Authority, clock=time.monotonic) -> None:
        self.authority = authority
        self.quotas = ProduceQuotas(authority, clock)
        #: "@name" resolvers that need the broker's state (``streamd.auth.needs_of``),
        #: set by the server once its services exist.
        self.derived: dict = {}

    def principal(self, context: grpc.aio.ServicerContext) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                # grpc hands over bytes only for keys ending in "-bin"; this one is text.
                scheme, _, token = cast(str, value).partition(" ")
                if scheme.lower() != "bearer" or not token:
                    raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
                principal = self.authority.principal_for_token(token.strip())
                if principal is None:
                    raise Unauthenticated("unknown token")
                return principal
        for name in (context.auth_context() or {}).get("x509_common_name", []):
            principal = self.authority.principal_for_certificate(name.decode(errors="replace"))
            if principal is not None:
                return principal
        raise Unauthenticated("a bearer token or a client certificate of a known principal is needed")

    def check(self, principal: str, method: str, message, size: int = 0) -> None:
        """Raise unless ``principal`` may call ``method`` with ``message`` (``size``:
        its bytes, charged to the produce quota of producing methods)."""
        missing = self.authority.missing(principal, needs_of(method, message, self.derived))
        if missing is not None:
            raise PermissionDenied(principal, *missing)
        if method in PRODUCING:
            self.quotas.charge(principal, size)

    def check_stream_message(self, principal: str, method: str, message, size: int = 0) -> None:
        part = STREAM_PARTS.get(method)
        if part is not None and message.HasField(part):
            self.check(principal, method, getattr(message, part), size)

    async def admit_stream_message(self, principal: str, method: str, message, size: int = 0) -> None:
        """``check_stream_message``, except that a stream over its produce quota is
        throttled rather than refused: the message waits until the quota allows it
        (as Kafka throttles a producer), and since the stream reads nothing meanwhile,
        the producer's in-flight window fills and it slows down."""
        while True:
            try:
                self.check_stream_message(principal, method, message, size)
                return
            except QuotaExceeded as exc:
                self.quotas.throttled += 1
                await asyncio.sleep(exc.retry_after_ms / 1000)

    def filter(self, principal: str, method: str, response) -> None:
        if isinstance(response, bytes):
            return
        scrub = SCRUBBED.get(method)
        if scrub is not None:
            def may(topic: str) -> bool:
                return self.authority.allows(principal, "describe", TOPIC, topic)

            for entries, topic_of in scrub(response):
                _keep(entries, may, topic_of)
        listed = LISTS.get(method)
        if listed is None:
            return
        field, resources = listed
        entries = getattr(response, field)
        allows = self.authority.allows
        for i in reversed(range(len(entries))):
            entry = entries[i]
            if not all(allows(principal, "describe", kind, getattr(entry, name)) for kind, name in resources):
                del entries[i]
