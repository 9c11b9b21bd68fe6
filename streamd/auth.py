"""Authentication and authorization: who a caller is, and what it may do.

**Principals.** A caller is a principal when it presents a bearer token
(``authorization: Bearer <token>`` in the gRPC metadata) whose SHA-256 is listed for
that principal in the auth file, or, with mutual TLS, when its client certificate's
subject common name is a principal's name (``CN=...``). Tokens are random secrets
(``new_token``: 256 bits), so a plain SHA-256 at rest is enough (as GitHub and
others store API tokens); the file never holds a token itself.

**Permissions** are allow rules (there is no deny): a rule names a principal (or
``*``: any authenticated one), operations and name patterns (``fnmatch``: ``*``,
``?``, ``[...]``) for topics and for groups (consumer and queue groups share the
namespace here). Operations:

- ``produce``: write records to a topic;
- ``consume``: read a topic; join, commit, receive and settle as a group;
- ``describe``: list and describe (implied by every other operation);
- ``admin``: create and delete topics and groups, reset and seek offsets (implies
  all of the above on what it matches).

Each RPC needs its operation on every resource it names: a queue group is named by
(group, topic), so every queue RPC is checked on both.

The auth file (TOML, ``auth_file`` in the broker config)::

    [[principal]]
    name = "orders-api"
    token_sha256 = ["9f86d0...", "..."]    # one or more: rotate by adding, then removing

    [[principal]]
    name = "worker-1"                      # a client certificate with CN=worker-1

    [[allow]]
    principal = "orders-api"
    operations = ["produce"]
    topics = ["orders", "orders.*"]

    [[allow]]
    principal = "*"
    operations = ["describe"]
    topics = ["*"]
    groups = ["*"]

Produce quotas, per principal (``*``: each principal without its own)::

    [[quota]]
    principal = "orders-api"
    produce_bytes_per_s = 10485760

A unary Produce over the principal's rate gets RESOURCE_EXHAUSTED /
``QUOTA_EXCEEDED`` with ``retry_after_ms`` (and a ``google.rpc.RetryInfo``); nothing
of that request is appended. A ProduceStream (the SDK's way) is throttled instead:
its next request waits until the quota allows it. The bucket holds one second of the rate; a request larger than that passes
when the bucket is full and leaves it in debt.

``needs_of(method, request)`` says what each RPC needs, from the request itself
(tests/unit/test_auth.py checks every method of every service is covered).
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamd.errors import StructuredError

OPERATIONS = ("produce", "consume", "describe", "admin")
TOPIC, GROUP = "topic", "group"
ANY = "*"
MEMO_LIMIT = 10_000


class AuthFileError(ValueError):
    """The auth file is malformed (the broker refuses to start with it)."""


class Unauthenticated(StructuredError):
    """No token or client certificate, or one no principal has."""

    reason = "UNAUTHENTICATED"

    def __init__(self, why: str) -> None:
        super().__init__(why)


class QuotaExceeded(StructuredError):
    """The principal produced faster than its quota; retry after ``retry_after_ms``."""

    reason = "QUOTA_EXCEEDED"

    def __init__(self, principal: str, rate: float, retry_after_ms: int) -> None:
        super().__init__(f"{principal!r} is over its produce quota of {rate:.0f} bytes/s; retry in "
                         f"{retry_after_ms} ms", principal=principal, retry_after_ms=retry_after_ms)
        self.retry_after_ms = retry_after_ms


class PermissionDenied(StructuredError):
    """The principal may not do this; nothing was changed."""

    reason = "PERMISSION_DENIED"

    def __init__(self, principal: str, operation: str, kind: str, name: str) -> None:
        super().__init__(f"{principal!r} may not {operation} {kind} {name!r}", principal=principal,
                         operation=operation, resource=f"{kind}:{name}")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh token and its SHA-256 (the line for the auth file)."""
    token = "sdt_" + secrets.token_urlsafe(32)
    return token, token_sha256(token)


@dataclass(frozen=True)
class Rule:
    principal: str
    operations: frozenset[str]
    topics: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def allows(self, principal: str, operation: str, kind: str, name: str) -> bool:
        if self.principal not in (principal, ANY):
            return False
        if not (operation in self.operations or "admin" in self.operations
                or (operation == "describe" and self.operations)):
            return False
        patterns = self.topics if kind == TOPIC else self.groups
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Authority:
    """The auth file, loaded: tokens to principals, and the allow rules."""

    def __init__(self, principals: dict[str, list[str]], rules: list[Rule],
                 quotas: dict[str, float] | None = None) -> None:
        self.principals = set(principals)
        #: principal (or "*") -> produce bytes per second
        self.quotas = quotas or {}
        self._by_hash: dict[str, str] = {}
        for name, hashes in principals.items():
            for h in hashes:
                if self._by_hash.setdefault(h, name) != name:
                    raise AuthFileError(f"one token hash is listed for two principals ({name!r})")
        self.rules = rules
        #: (principal, operation, kind, name) -> allowed: rules never change after
        #: loading, so answers are memoized (the hot path asks the same few questions).
        self._answers: dict[tuple[str, str, str, str], bool] = {}

    @classmethod
    def load(cls, path: Path) -> Authority:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AuthFileError(f"auth file {path}: {exc}") from None
        return cls.parse(raw, source=str(path))

    @classmethod
    def parse(cls, raw: dict, *, source: str = "auth file") -> Authority:
        unknown = set(raw) - {"principal", "allow", "quota"}
        if unknown:
            raise AuthFileError(f"{source}: unknown section(s) {sorted(unknown)}")
        principals: dict[str, list[str]] = {}
        for i, p in enumerate(_tables(raw, "principal", source)):
            _keys(p, {"name", "token_sha256"}, f"{source}: principal #{i + 1}")
            name = p.get("name")
            if not isinstance(name, str) or not name or name == ANY:
                raise AuthFileError(f"{source}: principal #{i + 1} needs a name (not '*')")
            if name in principals:
                raise AuthFileError(f"{source}: principal {name!r} is listed twice")
            hashes = p.get("token_sha256", [])
            hashes = [hashes] if isinstance(hashes, str) else hashes
            if not all(isinstance(h, str) and len(h) == 64 and _is_hex(h) for h in hashes):
                raise AuthFileError(f"{source}: principal {name!r}: token_sha256 must be 64 hex digits each")
            principals[name] = [h.lower() for h in hashes]
        rules = []
        for i, r in enumerate(_tables(raw, "allow", source)):
            where = f"{source}: allow #{i + 1}"
            _keys(r, {"principal", "operations", "topics", "groups"}, where)
            who = r.get("principal")
            if who != ANY and who not in principals:
                raise AuthFileError(f"{where}: principal {who!r} is not defined")
            ops = _strings(r.get("operations"), where, "operations")
            bad = set(ops) - set(OPERATIONS)
            if not ops or bad:
                raise AuthFileError(f"{where}: operations must be some of {', '.join(OPERATIONS)}")
            topics = _strings(r.get("topics", []), where, "topics")
            groups = _strings(r.get("groups", []), where, "groups")
            if not topics and not groups:
                raise AuthFileError(f"{where}: name topics or groups (patterns)")
            rules.append(Rule(who, frozenset(ops), tuple(topics), tuple(groups)))
        quotas: dict[str, float] = {}
        for i, q in enumerate(_tables(raw, "quota", source)):
            where = f"{source}: quota #{i + 1}"
            _keys(q, {"principal", "produce_bytes_per_s"}, where)
            who, rate = q.get("principal"), q.get("produce_bytes_per_s")
            if who != ANY and who not in principals:
                raise AuthFileError(f"{where}: principal {who!r} is not defined")
            if who in quotas:
                raise AuthFileError(f"{where}: a second quota for {who!r}")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
                raise AuthFileError(f"{where}: produce_bytes_per_s must be a positive number")
            quotas[who] = float(rate)
        return cls(principals, rules, quotas)

    def quota(self, principal: str) -> float | None:
        """Produce bytes per second allowed to ``principal``, or None: no limit."""
        return self.quotas.get(principal, self.quotas.get(ANY))

    def principal_for_token(self, token: str) -> str | None:
        """The principal whose token this is, or None. The lookup is by the token's
        SHA-256, so how long it takes says nothing about the token."""
        return self._by_hash.get(token_sha256(token))

    def principal_for_certificate(self, common_name: str) -> str | None:
        return common_name if common_name in self.principals else None

    def allows(self, principal: str, operation: str, kind: str, name: str) -> bool:
        question = (principal, operation, kind, name)
        answer = self._answers.get(question)
        if answer is None:
            if len(self._answers) >= MEMO_LIMIT:  # names come from clients: keep it bounded
                self._answers.clear()
            answer = self._answers[question] = any(rule.allows(*question) for rule in self.rules)
        return answer

    def missing(self, principal: str, needs: Iterable[tuple[str, str, str]]) -> tuple[str, str, str] | None:
        """The first (operation, kind, name) of ``needs`` the principal may not do."""
        for need in needs:
            if not self.allows(principal, *need):
                return need
        return None


# -- what each RPC needs ---------------------------------------------------------------
# (operation, kind, field of the request naming the resource); "*" as the field: any
# name (the RPC is not about one resource; it needs the operation somewhere).
_NEEDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "CreateTopic": (("admin", TOPIC, "topic"),),
    "DeleteTopic": (("admin", TOPIC, "topic"),),
    "ListTopics": (),  # answers are filtered to what the caller may describe
    "DescribeTopic": (("describe", TOPIC, "topic"),),
    "Produce": (("produce", TOPIC, "topic"),),
    "ProduceStream": (("produce", TOPIC, "topic"),),  # checked per message (request.request.topic)
    "InitProducer": (),  # any principal; its batches still need produce on their topics
    "Fetch": (("consume", TOPIC, "topic"),),
    "ListOffsets": (("describe", TOPIC, "topic"),),
    "Subscribe": (("consume", TOPIC, "topic"),),
    "JoinGroup": (("consume", GROUP, "group"), ("consume", TOPIC, "topics")),  # the first message's join
    "CommitOffsets": (("consume", GROUP, "group"), ("consume", TOPIC, "offsets.topic")),
    "FetchOffsets": (("describe", GROUP, "group"), ("describe", TOPIC, "partitions.topic")),
    "DescribeGroup": (("describe", GROUP, "group"),),
    "ListGroups": (),  # filtered
    # Deleting a group drops its offsets on every topic, as a reset of them all would.
    "DeleteGroup": (("admin", GROUP, "group"), ("consume", TOPIC, "@group_topics")),
    # all_topics names no topic: the broker's own answer does (every topic of the group).
    "ResetOffsets": (("admin", GROUP, "group"), ("consume", TOPIC, "partitions.topic"),
                     ("consume", TOPIC, "@group_topics_if_all")),
    # A queue group is named by (group, topic): every queue RPC is checked on both, so
    # a grant on group "mailers" of topic "orders" reaches no "mailers" of another topic.
    # Its dead letters are produced to its dead-letter topic: the creator must be allowed to.
    "CreateQueueGroup": (("admin", GROUP, "group"), ("consume", TOPIC, "topic"),
                         ("produce", TOPIC, "@dead_letter_topic")),
    "DeleteQueueGroup": (("admin", GROUP, "group"), ("consume", TOPIC, "topic")),
    "DescribeQueueGroup": (("describe", GROUP, "group"), ("describe", TOPIC, "topic")),
    "ListQueueGroups": (),  # filtered: each entry needs describe on its group and its topic
    "Receive": (("consume", GROUP, "group"), ("consume", TOPIC, "topic")),
    "ReceiveStream": (("consume", GROUP, "group"), ("consume", TOPIC, "topic")),  # the open message
    "Ack": (("consume", GROUP, "group"), ("consume", TOPIC, "topic")),
    "Nack": (("consume", GROUP, "group"), ("consume", TOPIC, "topic")),
    "Extend": (("consume", GROUP, "group"), ("consume", TOPIC, "topic")),
    "Reject": (("consume", GROUP, "group"), ("consume", TOPIC, "topic")),
    "Settle": (("consume", GROUP, "group"), ("consume", TOPIC, "topic")),
    "SeekQueueGroup": (("admin", GROUP, "group"), ("consume", TOPIC, "topic")),
}


class ProduceQuotas:
    """A token bucket of produce bytes per principal (one second of the rate deep)."""

    def __init__(self, authority: Authority, clock) -> None:
        self.authority = authority
        self.clock = clock  # seconds, monotonic
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, at)
        #: Stream messages held back until their quota allowed them (``Guard``).
        self.throttled = 0

    def charge(self, principal: str, size: int) -> None:
        """Take ``size`` bytes from the principal's bucket, or raise QuotaExceeded."""
        rate = self.authority.quota(principal)
        if rate is None:
            return
        now = self.clock()
        tokens, at = self._buckets.get(principal, (rate, now))
        tokens = min(rate, tokens + (now - at) * rate)
        if tokens <= 0:
            self._buckets[principal] = (tokens, now)
            raise QuotaExceeded(principal, rate, max(1, int(-tokens / rate * 1000) + 1))
        self._buckets[principal] = (tokens - size, now)


def needs_of(method: str, request, derived: dict | None = None) -> list[tuple[str, str, str]]:
    """(operation, kind, name) the RPC ``method`` needs for ``request``; for streams,
    the message that names the resources: ProduceStream each ``request``, JoinGroup
    the ``join``, ReceiveStream the ``open``. ``derived``: resolvers of "@name" fields
    that need the broker's state (request -> names), beside the built-in ones."""
    if method not in _NEEDS:
        raise KeyError(f"no authorization rule for {method}")
    resolvers = _DERIVED | (derived or {})
    out: list[tuple[str, str, str]] = []
    for operation, kind, field in _NEEDS[method]:
        out.extend((operation, kind, name) for name in _names(request, field, resolvers))
    return out


def methods() -> Iterator[str]:
    return iter(_NEEDS)


def _dead_letter_topic(request) -> list[str]:
    """The topic a CreateQueueGroup's dead letters go to (the default: ``<topic>.dlq``)."""
    return [request.config.dead_letter_topic or f"{request.topic}.dlq"]


#: Resources a request names that no one field holds: "@name" in a rule.
_DERIVED = {"@dead_letter_topic": _dead_letter_topic}


def _names(message, path: str, resolvers: dict) -> list[str]:
    """The values at ``path`` (dotted; repeated fields fan out) of a message; "@name":
    what its resolver says (none known: refuse, never pass unchecked)."""
    if path.startswith("@"):
        if path not in resolvers:
            raise KeyError(f"no resolver for {path}: the call cannot be authorised")
        return resolvers[path](message)
    values = [message]
    for part in path.split("."):
        nxt: list[Any] = []
        for v in values:
            got = getattr(v, part)
            nxt.extend(got if isinstance(got, Iterable) and not isinstance(got, (str, bytes)) else [got])
        values = nxt
    return sorted({str(v) for v in values})


def _tables(raw: dict, key: str, source: str) -> list[dict]:
    tables = raw.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise AuthFileError(f"{source}: [[{key}]] must be an array of tables")
    return tables


def _keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise AuthFileError(f"{where}: unknown key(s) {sorted(unknown)}")


def _strings(value, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AuthFileError(f"{where}: {key} must be a list of non-empty strings")
    return value


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
