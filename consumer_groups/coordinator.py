"""The group coordinator: membership, generations and partition ownership.

State (memory only; committed offsets live in ``OffsetStore``):

- a ``ConsumerGroup`` has members, a generation and a target assignment
  (``consumer_groups.assignment``);
- a ``Member`` owns ``assigned`` partitions and may still hold ``revoking`` ones:
  partitions taken from it that it has not yet acknowledged giving up.

Invariants:

- a partition is in at most one member's ``assigned | revoking`` set (never owned
  twice): a partition leaves ``revoking`` only when its member acknowledges the
  generation that revoked it, is removed, or is disconnected; only then can its new
  owner get it;
- every change of any member's ``assigned`` set bumps the group's generation, and
  every member is told (``Member.changed``);
- ``owned_since[tp]`` is the generation in which the member got ``tp`` (or the
  generation of the last offset-reset fence); a commit naming an older generation
  is stale.

Runs on the event loop, no awaits inside: each method is one atomic step. Time comes
from the injected clock; ``tick()`` enforces session and rebalance timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from streamd.clock import Clock

from .assignment import TopicPartition, assign
from .errors import (
    GroupLimitExceeded,
    GroupNotEmpty,
    InvalidGroupRequest,
    StaleGeneration,
    UnknownMember,
)

log = logging.getLogger("streamd.groups")

GROUP_NAME = re.compile(r"[A-Za-z0-9._:-]{1,249}")
DEFAULT_SESSION_TIMEOUT_MS = 10_000
DEFAULT_REBALANCE_TIMEOUT_MS = 30_000
MIN_TIMEOUT_MS = 200
MAX_TIMEOUT_MS = 30 * 60_000
MAX_TOPICS_PER_MEMBER = 1_000
MAX_INSTANCE_ID_CHARS = 249
#: ``Member.removed`` values that are not failures of the member.
LEFT = "left the group"
STREAM_CLOSED = "stream closed"
#: The member was replaced by a new one with its instance id (do not rejoin).
REPLACED = "replaced by a new member with the same instance id"
SHUTDOWN = "the broker is stopping"


def check_group_name(name: str) -> None:
    if not GROUP_NAME.fullmatch(name or ""):
        raise InvalidGroupRequest(
            "group", f"{name[:300]!r} is not a valid group id ([A-Za-z0-9._:-]{{1,249}})", reason="INVALID_GROUP_NAME"
        )


def _timeout(value: int, default: int, name: str) -> int:
    if value == 0:
        return default
    if not MIN_TIMEOUT_MS <= value <= MAX_TIMEOUT_MS:
        raise InvalidGroupRequest(name, f"must be 0 (default) or {MIN_TIMEOUT_MS}..{MAX_TIMEOUT_MS} ms, not {value}")
    return value


@dataclass(eq=False)
class Member:
    member_id: str
    group: str
    topics: frozenset[str]
    instance_id: str
    client_id: str
    peer: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    last_seen_ms: int
    connected: bool = True
    assigned: set[TopicPartition] = field(default_factory=set)
    revoking: set[TopicPartition] = field(default_factory=set)
    revoke_generation: int = 0
    revoke_deadline_ms: int = 0
    owned_since: dict[TopicPartition, int] = field(default_factory=dict)
    #: Set with the next assignment after an operator reset fenced the generation.
    offsets_reset: bool = False
    #: Why the member was removed; None while it is in the group.
    removed: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def heartbeat_interval_ms(self) -> int:
        return max(50, self.session_timeout_ms // 3)


@dataclass(eq=False)
class ConsumerGroup:
    name: str
    generation: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    target: dict[TopicPartition, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        if not self.members:
            return "empty"
        owned = {tp: m.member_id for m in self.members.values() for tp in m.assigned}
        if any(m.revoking for m in self.members.values()) or owned != self.target:
            return "rebalancing"
        return "stable"

    def topics(self) -> set[str]:
        return {t for m in self.members.values() for t in m.topics}

    def owner(self, tp: TopicPartition) -> Member | None:
        for m in self.members.values():
            if tp in m.assigned or tp in m.revoking:
                return m
        return None


class Coordinator:
    def __init__(
        self,
        *,
        clock: Clock,
        partition_count: Callable[[str], int],
        max_groups: int = 10_000,
        max_members: int = 1_000,
        default_session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        default_rebalance_timeout_ms: int = DEFAULT_REBALANCE_TIMEOUT_MS,
    ) -> None:
        """``partition_count(topic)`` is the topic's partition count, 0 when it is gone."""
        self.clock = clock
        self.partition_count = partition_count
        self.max_groups = max_groups
        self.max_members = max_members
        self.default_session_timeout_ms = default_session_timeout_ms
        self.default_rebalance_timeout_ms = default_rebalance_timeout_ms
        self.groups: dict[str, ConsumerGroup] = {}
        #: When each group lost its last member (for the retention of its offsets).
        self.empty_since_ms: dict[str, int] = {}
        #: Groups whose offsets an operator is resetting (member commits refused).
        self.resetting: set[str] = set()
        #: Rebalances (new target assignments) per group since start-up; kept while the
        #: group is empty, forgotten with its offsets (``forget``).
        self.rebalances: dict[str, int] = {}
        self._ids = itertools.count(1)

    # -- membership -----------------------------------------------------------
    def join(
        self,
        group: str,
        topics: Iterable[str],
        *,
        instance_id: str = "",
        client_id: str = "",
        peer: str = "",
        session_timeout_ms: int = 0,
        rebalance_timeout_ms: int = 0,
    ) -> Member:
        check_group_name(group)
        topics = frozenset(topics)
        if len(instance_id) > MAX_INSTANCE_ID_CHARS:
            raise InvalidGroupRequest("instance_id", f"at most {MAX_INSTANCE_ID_CHARS} characters")
        if not topics:
            raise InvalidGroupRequest("topics", "a member must subscribe to at least one topic")
        if len(topics) > MAX_TOPICS_PER_MEMBER:
            raise GroupLimitExceeded("topics per member", MAX_TOPICS_PER_MEMBER)
        session = _timeout(session_timeout_ms, self.default_session_timeout_ms, "session_timeout_ms")
        rebalance = _timeout(rebalance_timeout_ms, self.default_rebalance_timeout_ms, "rebalance_timeout_ms")
        g = self.groups.get(group)
        if g is None:
            if len(self.groups) >= self.max_groups:
                raise GroupLimitExceeded("groups with members", self.max_groups)
            g = self.groups[group] = ConsumerGroup(group)
            self.empty_since_ms.pop(group, None)
        previous = self._static_member(g, instance_id)
        if previous is None and len(g.members) >= self.max_members:
            raise GroupLimitExceeded("members in a group", self.max_members)
        member = Member(
            member_id=f"{client_id or 'member'}-{next(self._ids)}-{uuid.uuid4().hex[:12]}",
            group=group,
            topics=topics,
            instance_id=instance_id,
            client_id=client_id,
            peer=peer,
            session_timeout_ms=session,
            rebalance_timeout_ms=rebalance,
            last_seen_ms=self.clock.now_ms(),
        )
        g.members[member.member_id] = member
        if previous is not None:
            # Static membership: the new incarnation takes over the old one's partitions
            # under a new member id (fencing the old process's commits); no rebalance
            # unless the subscription changed.
            member.assigned, member.revoking = previous.assigned, previous.revoking
            member.revoke_generation, member.revoke_deadline_ms = previous.revoke_generation, previous.revoke_deadline_ms
            member.owned_since = previous.owned_since
            previous.assigned, previous.revoking, previous.owned_since = set(), set(), {}
            self._drop(g, previous, REPLACED)
            g.target = {tp: (member.member_id if o == previous.member_id else o) for tp, o in g.target.items()}
            if previous.topics == topics:
                member.changed.set()
                log.info("group %s: static member %s rejoined as %s", group, instance_id, member.member_id)
                return member
        log.info("group %s: %s joined (topics %s)", group, member.member_id, ",".join(sorted(topics)))
        self._rebalance(g)
        member.changed.set()
        return member

    def heartbeat(self, member: Member, generation: int) -> None:
        """The member is alive and has applied assignments up to ``generation``."""
        if member.removed:
            raise UnknownMember(member.group, member.member_id)
        member.last_seen_ms = self.clock.now_ms()
        current = self.groups[member.group].generation
        if member.revoking and member.revoke_generation <= generation <= current:
            for tp in member.revoking:
                member.owned_since.pop(tp, None)
            member.revoking.clear()
            self._reconcile(self.groups[member.group])

    def leave(self, member: Member) -> None:
        if not member.removed:
            self._remove(member, LEFT)

    def disconnected(self, member: Member) -> None:
        """The member's stream ended without a LeaveGroup."""
        if member.removed:
            return
        if not member.instance_id:
            self._remove(member, STREAM_CLOSED)
            return
        # A static member keeps its partitions for its session timeout; nothing of its
        # can be in progress without a stream, so revocations need no acknowledgement.
        member.connected = False
        member.last_seen_ms = self.clock.now_ms()
        if member.revoking:
            self._release_revoking(member)
            self._reconcile(self.groups[member.group])

    def tick(self) -> None:
        """Remove members past their session timeout or revocation deadline."""
        now = self.clock.now_ms()
        for g in list(self.groups.values()):
            for m in list(g.members.values()):
                if now - m.last_seen_ms > m.session_timeout_ms:
                    self._remove(m, "session timeout")
                elif m.revoking and now > m.revoke_deadline_ms:
                    self._remove(m, "revocation not acknowledged within the rebalance timeout")

    def shutdown(self) -> None:
        """End every member's stream (the broker is stopping); nothing is rebalanced."""
        for g in self.groups.values():
            for m in g.members.values():
                m.removed = SHUTDOWN
                m.changed.set()
        self.groups.clear()

    def topics_changed(self, topic: str) -> None:
        """A topic was created or deleted: rebalance the groups that read it."""
        for g in list(self.groups.values()):
            if topic in g.topics():
                self._rebalance(g)

    # -- commits and resets -------------------------------------------------------
    def check_commit(self, group: str, member_id: str, generation: int, tps: Iterable[TopicPartition]) -> None:
        """Raise unless ``member_id`` may commit ``tps`` naming ``generation``."""
        check_group_name(group)
        g = self.groups.get(group)
        if not member_id:
            if g is not None and g.members:
                raise GroupNotEmpty(group, len(g.members), "commits need a member id and generation")
            return
        m = g.members.get(member_id) if g is not None else None
        if g is None or m is None:
            raise UnknownMember(group, member_id)
        if group in self.resetting:
            tp = next(iter(tps), ("", -1))
            raise StaleGeneration(group, member_id, generation, *tp, "an operator is resetting the group's offsets")
        for tp in tps:
            since = m.owned_since.get(tp)
            if since is None:
                raise StaleGeneration(group, member_id, generation, *tp, "the member does not own the partition")
            if generation < since:
                raise StaleGeneration(
                    group, member_id, generation, *tp,
                    f"generation {generation} is older than {since}, when the member got the partition",
                )
            if generation > g.generation:
                raise StaleGeneration(group, member_id, generation, *tp, f"the group is at generation {g.generation}")

    def fence(self, group: str) -> int:
        """For an operator reset: until ``notify_reset``, every member commit to the
        group is refused as stale (whatever generation it names, so a rebalance during
        the reset cannot let an old position through). Returns the generation the
        reset fenced (0 for a group without members)."""
        self.resetting.add(group)
        g = self.groups.get(group)
        if g is None or not g.members:
            return 0
        self._fence(g)
        log.info("group %s: offsets being reset, generation fenced at %d", group, g.generation)
        return g.generation

    def notify_reset(self, group: str) -> None:
        """The reset is over (done or abandoned): fence once more, so no commit from
        before it can land, and tell every member to reread its committed offsets."""
        self.resetting.discard(group)
        g = self.groups.get(group)
        if g is None or not g.members:
            return
        self._fence(g)
        for m in g.members.values():
            m.offsets_reset = True
            m.changed.set()

    def _fence(self, g: ConsumerGroup) -> None:
        g.generation += 1
        for m in g.members.values():
            for tp in m.owned_since:
                m.owned_since[tp] = g.generation

    def live_members(self, group: str) -> int:
        g = self.groups.get(group)
        return len(g.members) if g is not None else 0

    # -- internals ----------------------------------------------------------------
    def _static_member(self, g: ConsumerGroup, instance_id: str) -> Member | None:
        if not instance_id:
            return None
        return next((m for m in g.members.values() if m.instance_id == instance_id), None)

    def _remove(self, member: Member, why: str) -> None:
        g = self.groups[member.group]
        self._drop(g, member, why)
        if g.members:
            self._rebalance(g)
        else:
            self.empty_since_ms[g.name] = self.clock.now_ms()
            del self.groups[g.name]

    def _drop(self, g: ConsumerGroup, member: Member, why: str) -> None:
        log.info("group %s: %s removed: %s", g.name, member.member_id, why)
        member.removed = why
        member.assigned, member.revoking, member.owned_since = set(), set(), {}
        del g.members[member.member_id]
        member.changed.set()

    def _release_revoking(self, member: Member) -> None:
        for tp in member.revoking:
            member.owned_since.pop(tp, None)
        member.revoking.clear()

    def forget(self, group: str) -> None:
        """The group's offsets expired: drop what is kept of an empty group."""
        self.empty_since_ms.pop(group, None)
        self.rebalances.pop(group, None)

    def _rebalance(self, g: ConsumerGroup) -> None:
        self.rebalances[g.name] = self.rebalances.get(g.name, 0) + 1
        counts = {t: self.partition_count(t) for t in g.topics()}
        current = {tp: m.member_id for m in g.members.values() for tp in m.assigned | m.revoking}
        g.target = assign({m.member_id: m.topics for m in g.members.values()}, counts, current)
        self._reconcile(g)

    def _reconcile(self, g: ConsumerGroup) -> None:
        """Move ownership toward the target: revoke first, grant what is free."""
        new_generation = g.generation + 1
        changed = False
        now = self.clock.now_ms()
        for m in g.members.values():
            gone = {tp for tp in m.assigned | m.revoking if not self._exists(tp)}
            if gone:  # the topic was deleted: nothing to hand over
                m.assigned -= gone
                m.revoking -= gone
                for tp in gone:
                    m.owned_since.pop(tp, None)
                changed = True
            revoke = {tp for tp in m.assigned if g.target.get(tp) != m.member_id}
            if revoke:
                m.assigned -= revoke
                if m.connected:
                    m.revoking |= revoke
                    m.revoke_generation = new_generation
                    m.revoke_deadline_ms = now + m.rebalance_timeout_ms
                else:
                    for tp in revoke:
                        m.owned_since.pop(tp, None)
                changed = True
        held = {tp for m in g.members.values() for tp in m.assigned | m.revoking}
        for tp, owner_id in g.target.items():
            m = g.members[owner_id]
            if tp in m.revoking:  # given back before it was handed over
                m.revoking.discard(tp)
                m.assigned.add(tp)
                changed = True
            elif tp not in held:
                m.assigned.add(tp)
                m.owned_since[tp] = new_generation
                changed = True
        if changed:
            g.generation = new_generation
            log.info("group %s: rebalanced to generation %d (%d member(s), %d partition(s) assigned)",
                     g.name, new_generation, len(g.members), sum(len(m.assigned) for m in g.members.values()),
                     extra={"event": "rebalance", "group": g.name, "generation": new_generation,
                            "members": len(g.members)})
            for m in g.members.values():
                m.changed.set()

    def _exists(self, tp: TopicPartition) -> bool:
        return tp[1] < self.partition_count(tp[0])
