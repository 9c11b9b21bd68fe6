"""Group coordinator: revocation before reassignment, generations, timeouts, static
membership, commit fencing. Driven by a fake clock; no server, no sleeps."""

from __future__ import annotations

import copy

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consumer_groups.coordinator import Coordinator
from consumer_groups.errors import GroupNotEmpty, InvalidGroupRequest, StaleGeneration, UnknownMember
from streamd.testing import FakeClock

COUNTS = {"a": 6, "b": 2}


def make(counts=None, **kw) -> tuple[Coordinator, FakeClock]:
    counts = dict(COUNTS if counts is None else counts)
    clock = FakeClock()
    return Coordinator(clock=clock, partition_count=lambda t: counts.get(t, 0), **kw), clock


def owners(c: Coordinator, group: str = "g") -> dict:
    out: dict = {}
    for m in c.groups[group].members.values():
        for tp in m.assigned | m.revoking:
            assert tp not in out, f"{tp} owned twice"
            out[tp] = m.member_id
    return out


def ack(c: Coordinator, *members) -> None:
    for m in members:
        c.heartbeat(m, c.groups[m.group].generation)


def test_first_member_gets_every_partition_at_once():
    c, _ = make()
    m = c.join("g", ["a"])
    assert m.assigned == {("a", p) for p in range(6)} and c.groups["g"].generation == 1
    assert m.changed.is_set()


def test_partitions_move_only_after_the_old_owner_acknowledges():
    c, _ = make()
    m1 = c.join("g", ["a"])
    m2 = c.join("g", ["a"])
    gen = c.groups["g"].generation
    assert len(m1.assigned) == 3 and len(m1.revoking) == 3 and not m2.assigned
    assert c.groups["g"].state == "rebalancing"
    c.heartbeat(m1, gen - 1)  # an older generation does not release anything
    assert not m2.assigned
    ack(c, m1)
    assert len(m2.assigned) == 3 and not m1.revoking and c.groups["g"].generation == gen + 1
    assert c.groups["g"].state == "stable"
    assert set(owners(c)) == {("a", p) for p in range(6)}


def test_clean_leave_hands_partitions_over_immediately():
    c, _ = make()
    m1, m2 = c.join("g", ["a"]), c.join("g", ["a"])
    ack(c, m1)
    c.leave(m1)
    assert m1.removed == "left the group"
    assert m2.assigned == {("a", p) for p in range(6)}


def test_session_timeout_removes_a_silent_member():
    c, clock = make()
    m1 = c.join("g", ["a"], session_timeout_ms=1000)
    m2 = c.join("g", ["a"], session_timeout_ms=5000)
    ack(c, m1)
    clock.advance(800)
    c.heartbeat(m2, c.groups["g"].generation)
    c.tick()
    assert m1.removed is None
    clock.advance(300)
    c.tick()
    assert m1.removed == "session timeout" and len(m2.assigned) == 6


def test_unacknowledged_revocation_fences_the_member_after_the_rebalance_timeout():
    c, clock = make()
    m1 = c.join("g", ["a"], rebalance_timeout_ms=500, session_timeout_ms=10_000)
    m2 = c.join("g", ["a"])
    clock.advance(400)
    c.heartbeat(m1, 0)  # alive, but never applies the revocation
    c.tick()
    assert m1.removed is None
    clock.advance(200)
    c.tick()
    assert m1.removed and "rebalance timeout" in m1.removed
    assert len(m2.assigned) == 6


def test_static_member_returning_within_the_session_timeout_keeps_its_partitions():
    c, clock = make()
    s = c.join("g", ["a"], instance_id="worker-1", session_timeout_ms=2000)
    d = c.join("g", ["a"])
    ack(c, s)
    generation, mine = c.groups["g"].generation, set(s.assigned)
    c.disconnected(s)
    assert s.removed is None and not s.connected and d.assigned.isdisjoint(mine)
    clock.advance(1500)
    c.heartbeat(d, generation)
    c.tick()
    back = c.join("g", ["a"], instance_id="worker-1")
    assert back.assigned == mine and c.groups["g"].generation == generation  # no rebalance
    assert s.removed and back.member_id != s.member_id
    with pytest.raises(UnknownMember):  # the old incarnation is fenced
        c.check_commit("g", s.member_id, generation, [next(iter(mine))])


def test_static_member_gone_past_its_session_timeout_loses_its_partitions():
    c, clock = make()
    s = c.join("g", ["a"], instance_id="worker-1", session_timeout_ms=1000)
    d = c.join("g", ["a"], session_timeout_ms=10_000)
    ack(c, s)
    c.disconnected(s)
    clock.advance(1100)
    c.tick()
    assert s.removed == "session timeout" and len(d.assigned) == 6


def test_dynamic_member_whose_stream_closes_is_removed_at_once():
    c, _ = make()
    m1, m2 = c.join("g", ["a"]), c.join("g", ["a"])
    ack(c, m1)
    c.disconnected(m2)
    assert m2.removed and len(m1.assigned) == 6


def test_commit_checks_ownership_and_generation():
    c, _ = make()
    m1 = c.join("g", ["a"])
    g1 = c.groups["g"].generation
    c.check_commit("g", m1.member_id, g1, [("a", 0)])
    m2 = c.join("g", ["a"])
    # while revoking, the old owner may still commit its progress
    revoking = next(iter(m1.revoking))
    c.check_commit("g", m1.member_id, g1, [revoking])
    ack(c, m1)
    with pytest.raises(StaleGeneration):
        c.check_commit("g", m1.member_id, g1, [revoking])  # moved away
    new_gen = c.groups["g"].generation
    with pytest.raises(StaleGeneration):  # m2 got it in new_gen; an older one is stale
        c.check_commit("g", m2.member_id, new_gen - 1, [revoking])
    c.check_commit("g", m2.member_id, new_gen, [revoking])
    with pytest.raises(UnknownMember):
        c.check_commit("g", "nobody", new_gen, [revoking])
    with pytest.raises(GroupNotEmpty):
        c.check_commit("g", "", 0, [revoking])
    c.check_commit("other", "", 0, [("a", 0)])  # no members: tools may commit


def test_a_reset_refuses_member_commits_until_it_is_over_then_fences_again():
    c, _ = make()
    m = c.join("g", ["a"])
    g1 = c.groups["g"].generation
    g2 = c.fence("g")
    assert g2 == g1 + 1 and not m.offsets_reset
    c.join("g", ["a"])  # a rebalance during the reset moves the generation on ...
    latest = c.groups["g"].generation
    with pytest.raises(StaleGeneration):  # ... but nothing is accepted until it ends
        c.check_commit("g", m.member_id, latest, [("a", 0)])
    m.changed.clear()
    c.notify_reset("g")
    assert m.offsets_reset and m.changed.is_set()
    with pytest.raises(StaleGeneration):  # positions from before the reset stay refused
        c.check_commit("g", m.member_id, latest, [("a", 0)])
    c.check_commit("g", m.member_id, c.groups["g"].generation, [("a", 0)])
    assert c.fence("nobody") == 0
    c.notify_reset("nobody")
    assert not c.resetting


def test_deleted_topic_partitions_are_dropped_and_new_ones_assigned():
    counts = {"a": 2, "b": 2}
    c = Coordinator(clock=FakeClock(), partition_count=lambda t: counts.get(t, 0))
    m = c.join("g", ["a", "b"])
    del counts["b"]
    c.topics_changed("b")
    assert m.assigned == {("a", 0), ("a", 1)}
    counts["b"] = 3
    c.topics_changed("b")
    assert len(m.assigned) == 5


def test_join_validates_its_input():
    c, _ = make()
    with pytest.raises(InvalidGroupRequest):
        c.join("../x", ["a"])
    with pytest.raises(InvalidGroupRequest):
        c.join("g", [])
    with pytest.raises(InvalidGroupRequest):
        c.join("g", ["a"], session_timeout_ms=5)


class GroupMachine(RuleBasedStateMachine):
    """Random joins, leaves, disconnects, acks and clock ticks: a partition is never
    owned twice, and once every member has acknowledged, ownership equals the target
    and covers every partition."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.clock = make({"a": 5, "b": 3})
        self.members: list = []

    def live(self):
        return [m for m in self.members if m.removed is None]

    @rule(topics=st.sampled_from([["a"], ["b"], ["a", "b"]]), static=st.booleans())
    def join(self, topics, static):
        if len(self.live()) < 6:
            iid = f"i{len(self.members) % 3}" if static else ""
            self.members.append(self.c.join("g", topics, instance_id=iid, session_timeout_ms=1000))

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 10))
    def ack(self, i):
        m = self.live()[i % len(self.live())]
        if m.connected:
            self.c.heartbeat(m, self.c.groups["g"].generation)

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 10))
    def leave(self, i):
        self.c.leave(self.live()[i % len(self.live())])

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 10))
    def disconnect(self, i):
        self.c.disconnected(self.live()[i % len(self.live())])

    @rule(ms=st.integers(0, 1500))
    def tick(self, ms):
        self.clock.advance(ms)
        self.c.tick()

    @invariant()
    def never_owned_twice(self):
        if "g" in self.c.groups:
            owners(self.c)

    @invariant()
    def settles_when_everyone_acknowledges(self):
        c = copy.deepcopy(self.c)  # settle a copy, so revocations stay pending in the run
        g = c.groups.get("g")
        if g is None:
            return
        for _ in range(3):
            for m in list(g.members.values()):
                if m.connected and m.removed is None:
                    c.heartbeat(m, g.generation)
        owned = owners(c)
        topics = g.topics()
        wanted = {(t, p) for t in topics for p in range({"a": 5, "b": 3}[t])}
        assert set(owned) == wanted and owned == g.target


TestGroupMachine = GroupMachine.TestCase
TestGroupMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
