"""The assignor: every partition to exactly one subscribed member, balanced, sticky."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer_groups.assignment import assign

TOPICS = ["a", "b", "c"]


def _loads(target, members):
    counts = {m: 0 for m in members}
    for owner in target.values():
        counts[owner] += 1
    return counts


def test_equal_subscriptions_split_evenly():
    subs = {f"m{i}": {"a"} for i in range(4)}
    target = assign(subs, {"a": 8}, {})
    assert sorted(target) == [("a", p) for p in range(8)]
    assert set(_loads(target, subs).values()) == {2}


def test_a_new_member_takes_only_what_balance_needs():
    subs = {"m1": {"a"}, "m2": {"a"}}
    before = assign(subs, {"a": 8}, {})
    after = assign({**subs, "m3": {"a"}}, {"a": 8}, before)
    moved = [tp for tp in before if before[tp] != after[tp]]
    assert len(moved) == 2  # 4+4 -> 3+3+2: two partitions move, six stay
    assert all(after[tp] == "m3" for tp in moved)


def test_partitions_of_a_departed_member_spread_over_the_rest():
    subs = {"m1": {"a"}, "m2": {"a"}, "m3": {"a"}}
    before = assign(subs, {"a": 9}, {})
    rest = {m: t for m, t in subs.items() if m != "m2"}
    after = assign(rest, {"a": 9}, {tp: o for tp, o in before.items() if o != "m2"})
    assert all(after[tp] == o for tp, o in before.items() if o != "m2")
    assert sorted(_loads(after, rest).values()) == [4, 5]


def test_topics_nobody_reads_are_left_out():
    target = assign({"m1": {"a"}}, {"a": 2, "b": 3}, {})
    assert set(target) == {("a", 0), ("a", 1)}


@settings(max_examples=150, deadline=None)
@given(
    subs=st.dictionaries(
        st.sampled_from([f"m{i}" for i in range(6)]),
        st.sets(st.sampled_from(TOPICS), min_size=1),
        min_size=1,
    ),
    counts=st.fixed_dictionaries({t: st.integers(0, 7) for t in TOPICS}),
    seed_owners=st.dictionaries(st.tuples(st.sampled_from(TOPICS), st.integers(0, 6)), st.sampled_from(["m0", "m1", "x"])),
)
def test_assignment_is_complete_exclusive_and_balanced(subs, counts, seed_owners):
    target = assign(subs, counts, seed_owners)
    wanted = {(t, p) for t in {t for ts in subs.values() for t in ts} for p in range(counts[t])}
    assert set(target) == wanted  # complete; a dict is exclusive by construction
    assert all(tp[0] in subs[m] for tp, m in target.items())
    loads = _loads(target, subs)
    # balanced: no member could take a partition from one holding 2+ more
    for src, tps in ((m, [tp for tp, o in target.items() if o == m]) for m in subs):
        for dst in subs:
            if loads[src] - loads[dst] >= 2:
                assert not any(tp[0] in subs[dst] for tp in tps), (src, dst)
    # sticky: an owner that is still valid and not overloaded keeps its partitions
    if all(s == subs[next(iter(subs))] for s in subs.values()):
        assert max(loads.values()) - min(loads.values()) <= 1
