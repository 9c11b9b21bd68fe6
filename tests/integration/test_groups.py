"""GroupService over the wire: membership protocol with raw stubs (what a client in
any language does), commit checks, lag, deletes, resets on live groups, static members."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import pytest

from streamd.cli.main import main
from streamd.client import Admin, GroupConsumer, Producer
from streamd.testing import FakeClock
from streamd.v1 import streamd_pb2 as pb
from tests.conftest import wait_until

from .helpers import Stubs, error_info


class RawMember:
    """A member speaking the proto directly: a request queue and a response queue."""

    def __init__(self, stubs: Stubs, group: str, topics: list[str], **join) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(pb.JoinGroupRequest(join=pb.MemberJoin(group=group, topics=topics, **join)))
        self.responses: queue.Queue = queue.Queue()
        self.call = stubs.groups.JoinGroup(iter(self.requests.get, None))
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        try:
            for message in self.call:
                self.responses.put(message.assignment)
        except grpc.RpcError as err:
            self.responses.put(err)

    def next(self, timeout: float = 10) -> pb.Assignment:
        item = self.responses.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.responses.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def ack(self, generation: int) -> None:
        self.requests.put(pb.JoinGroupRequest(heartbeat=pb.Heartbeat(generation=generation)))

    def leave(self) -> None:
        self.requests.put(pb.JoinGroupRequest(leave=pb.LeaveGroup()))
        self.requests.put(None)
        self.thread.join(10)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.thread.join(10)


def parts(a: pb.Assignment) -> set[tuple[str, int]]:
    return {(tp.topic, p) for tp in a.partitions for p in tp.partitions}


def commit(stubs: Stubs, group: str, member: str, generation: int, offsets: dict) -> None:
    stubs.groups.CommitOffsets(
        pb.CommitOffsetsRequest(
            group=group, member_id=member, generation=generation,
            offsets=[pb.OffsetCommit(topic=t, partition=p, offset=o) for (t, p), o in offsets.items()],
        )
    )


def test_raw_protocol_revokes_before_reassigning(stubs):
    stubs.create("t", 4)
    m1 = RawMember(stubs, "g", ["t"], client_id="one")
    a1 = m1.next()
    assert parts(a1) == {("t", p) for p in range(4)} and a1.generation == 1 and a1.heartbeat_interval_ms > 0
    m2 = RawMember(stubs, "g", ["t"])
    revoke = m1.next()
    assert len(parts(revoke)) == 2 and revoke.generation == 2
    first = m2.next()
    assert parts(first) == set()  # nothing until m1 gives them up
    # m1 may still commit its progress on the partitions being revoked
    commit(stubs, "g", a1.member_id, 1, {("t", p): 0 for p in range(4)})
    assert m2.nothing_within(0.3)
    m1.ack(revoke.generation)
    given = m2.next()
    assert parts(given) == {("t", p) for p in range(4)} - parts(revoke) and given.generation == 3
    # the old generation can no longer commit the moved partitions
    moved = next(iter(parts(given)))
    with pytest.raises(grpc.RpcError) as err:
        commit(stubs, "g", a1.member_id, 1, {moved: 0})
    assert error_info(err.value)[:2] == (grpc.StatusCode.ABORTED, "STALE_GENERATION")
    commit(stubs, "g", given.member_id, given.generation, {moved: 0})
    assert parts(m1.next()) == parts(revoke)  # every member hears of every generation
    m2.leave()
    assert parts(m1.next()) == {("t", p) for p in range(4)}
    m1.close()


@pytest.mark.parametrize(
    "request_fields, code, reason",
    [
        ({"member_id": "nobody", "generation": 1}, grpc.StatusCode.ABORTED, "UNKNOWN_MEMBER"),
        ({"offset": 99}, grpc.StatusCode.OUT_OF_RANGE, "OFFSET_OUT_OF_RANGE"),
        ({"offset": -1}, grpc.StatusCode.INVALID_ARGUMENT, "NEGATIVE_OFFSET"),
        ({"topic": "nope"}, grpc.StatusCode.NOT_FOUND, "TOPIC_NOT_FOUND"),
        ({"partition": 7}, grpc.StatusCode.NOT_FOUND, "PARTITION_NOT_FOUND"),
        ({"group": "../x"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_GROUP_NAME"),
        ({"metadata": "x" * 5000}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
)
def test_bad_commits_get_a_clear_status(stubs, request_fields, code, reason):
    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"a", b"b"])
    fields = {"group": "g", "member_id": "", "generation": 0, "topic": "t", "partition": 0, "offset": 1, "metadata": ""}
    fields.update(request_fields)
    offset = pb.OffsetCommit(topic=fields.pop("topic"), partition=fields.pop("partition"),
                             offset=fields.pop("offset"), metadata=fields.pop("metadata"))
    if fields["member_id"]:
        RawMember(stubs, "g", ["t"]).next()
    with pytest.raises(grpc.RpcError) as err:
        stubs.groups.CommitOffsets(pb.CommitOffsetsRequest(offsets=[offset], **fields))
    assert error_info(err.value)[:2] == (code, reason)
    commit(stubs, "h", "", 0, {("t", 0): 2})  # the server keeps serving


def test_bad_joins_end_the_stream_with_a_clear_status(stubs):
    stubs.create("t", 1)
    cases = [
        (pb.JoinGroupRequest(join=pb.MemberJoin(group="g", topics=["missing"])), "TOPIC_NOT_FOUND"),
        (pb.JoinGroupRequest(join=pb.MemberJoin(group="", topics=["t"])), "INVALID_GROUP_NAME"),
        (pb.JoinGroupRequest(join=pb.MemberJoin(group="g", topics=[])), "INVALID_ARGUMENT"),
        (pb.JoinGroupRequest(join=pb.MemberJoin(group="g", topics=["t"], session_timeout_ms=1)), "INVALID_ARGUMENT"),
        (pb.JoinGroupRequest(heartbeat=pb.Heartbeat(generation=1)), "INVALID_ARGUMENT"),
    ]
    for first, reason in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(stubs.groups.JoinGroup(iter([first])))
        assert error_info(err.value)[1] == reason
    malformed = stubs.channel.stream_stream("/streamd.v1.GroupService/JoinGroup")
    with pytest.raises(grpc.RpcError) as err:
        list(malformed(iter([b"\xff\xff\xff"])))
    assert error_info(err.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


def test_describe_reports_lag_in_records_and_time(make_server):
    clock = FakeClock()
    server = make_server(clock=clock)
    stubs = Stubs(server.address)
    try:
        stubs.create("t", 2)
        stubs.produce_values("t", 0, [b"x"] * 10)
        clock.advance(5_000)
        stubs.produce_values("t", 0, [b"y"] * 5)
        commit(stubs, "g", "", 0, {("t", 0): 4})
        clock.advance(2_000)
        d = stubs.groups.DescribeGroup(pb.DescribeGroupRequest(group="g")).group
        assert d.state == pb.GROUP_STATE_EMPTY
        p0, p1 = d.partitions
        assert (p0.committed_offset, p0.log_end_offset, p0.lag, p0.lag_ms) == (4, 15, 11, 7_000)
        assert (p1.committed_offset, p1.lag, p1.lag_ms) == (-1, 0, 0)
        commit(stubs, "g", "", 0, {("t", 0): 12})  # inside the second batch, appended 2 s ago
        p0 = stubs.groups.DescribeGroup(pb.DescribeGroupRequest(group="g")).group.partitions[0]
        assert (p0.lag, p0.lag_ms) == (3, 2_000)
        with pytest.raises(grpc.RpcError) as err:
            stubs.groups.DescribeGroup(pb.DescribeGroupRequest(group="nobody"))
        assert error_info(err.value)[:2] == (grpc.StatusCode.NOT_FOUND, "GROUP_NOT_FOUND")
    finally:
        stubs.close()


def test_deleting_a_topic_removes_its_offsets_and_groups_need_no_members_to_delete(stubs):
    stubs.create("t", 1)
    stubs.create("u", 1)
    stubs.produce_values("t", 0, [b"a"])
    stubs.produce_values("u", 0, [b"a"])
    commit(stubs, "g", "", 0, {("t", 0): 1, ("u", 0): 1})
    stubs.topics.DeleteTopic(pb.DeleteTopicRequest(topic="t"))
    offsets = stubs.groups.FetchOffsets(pb.FetchOffsetsRequest(group="g")).offsets
    assert [(o.topic, o.offset) for o in offsets] == [("u", 1)]
    member = RawMember(stubs, "g", ["u"])
    member.next()
    with pytest.raises(grpc.RpcError) as err:
        stubs.groups.DeleteGroup(pb.DeleteGroupRequest(group="g"))
    assert error_info(err.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "GROUP_NOT_EMPTY")
    member.leave()
    wait_until(lambda: not stubs.groups.ListGroups(pb.ListGroupsRequest()).groups[0].member_count)
    stubs.groups.DeleteGroup(pb.DeleteGroupRequest(group="g"))
    assert not stubs.groups.ListGroups(pb.ListGroupsRequest()).groups


def test_committed_offsets_survive_a_restart(make_server, tmp_path):
    first = make_server()
    with Admin(first.address) as admin:
        admin.create_topic("t", 2)
        with Producer(first.address) as p:
            for i in range(10):
                p.send("t", b"v", partition=i % 2)
        admin.commit_offsets("g", {("t", 0): 3, ("t", 1): 5}, metadata="m")
    first.stop()
    second = make_server()
    with Admin(second.address) as admin:
        got = {(o.topic, o.partition): (o.offset, o.metadata) for o in admin.fetch_offsets("g")}
    assert got == {("t", 0): (3, "m"), ("t", 1): (5, "m")}


def _consume(consumer: GroupConsumer, n: int, timeout_s: float = 10) -> list:
    out = []
    for record in consumer.records(idle_timeout_s=timeout_s):
        out.append(record)
        if len(out) >= n:
            break
    return out


def test_reset_on_a_live_group_moves_its_members(server):
    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("t", 2)
        for i in range(20):
            p.send("t", str(i).encode(), partition=i % 2)
        p.flush()
        c = GroupConsumer("g", "t", server.address, auto_commit_interval_ms=None)
        try:
            assert len(_consume(c, 20)) == 20
            c.commit()
            plan = admin.reset_offsets("g", partitions={"t": []}, position=pb.OFFSET_SPEC_EARLIEST)
            assert [(e.old_offset, e.new_offset) for e in plan.plan] == [(10, 0), (10, 0)] and not plan.executed
            assert {o.offset for o in admin.fetch_offsets("g")} == {10}  # a plan changes nothing
            done = admin.reset_offsets("g", partitions={"t": [1]}, execute=True, shift_by=-4)
            assert done.executed and done.generation > c.generation
            again = _consume(c, 4)
            assert sorted((r.partition, r.offset) for r in again) == [(1, 6), (1, 7), (1, 8), (1, 9)]
            c.commit()
            undo = admin.reset_offsets("g", execute=True, undo=True)
            assert [(e.partition, e.new_offset) for e in undo.plan] == [(1, 10)]
            clamped = admin.reset_offsets("g", partitions={"t": [0]}, offset=500)
            assert clamped.plan[0].clamped and clamped.plan[0].new_offset == 10
        finally:
            c.close()


def test_static_member_rejoins_without_a_rebalance(server):
    with Admin(server.address) as admin:
        admin.create_topic("t", 4)
    a = GroupConsumer("g", "t", server.address, instance_id="a", session_timeout_ms=5000)
    b = GroupConsumer("g", "t", server.address, instance_id="b", session_timeout_ms=5000)
    try:
        # Poll both each time: a revocation is applied (and acknowledged) only by polling.
        assert wait_until(lambda: [len(a.poll_assignment()), len(b.poll_assignment())] == [2, 2])
        mine, generation = set(a.assigned), a.generation
        a.close()  # static: keeps its partitions for the session timeout
        with Admin(server.address) as admin:
            d = admin.describe_group("g")
            assert [m.connected for m in d.members if m.instance_id == "a"] == [False]
        a = GroupConsumer("g", "t", server.address, instance_id="a", session_timeout_ms=5000)
        assert a.wait_for_assignment() == mine and a.generation == generation
        assert b.poll_assignment() and b.generation == generation
    finally:
        a.close(leave=True)
        b.close(leave=True)


def test_cli_lists_describes_resets_and_deletes_groups(server, capsys):
    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("t", 2)
        for i in range(6):
            p.send("t", b"v", partition=i % 2)
        p.flush()
        admin.commit_offsets("g", {("t", 0): 1, ("t", 1): 3})
    base = ["--server", server.address, "groups"]
    assert main(base + ["list"]) == 0
    assert "g" in capsys.readouterr().out
    assert main(base + ["describe", "g"]) == 0
    out = capsys.readouterr().out
    assert "CURRENT-OFFSET" in out and "LAG-TIME" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("g ") and " t " in line)
    assert row[:6] == ["g", "t", "0", "1", "3", "2"]
    assert main(base + ["reset-offsets", "g", "--topic", "t:0", "--to-latest"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "2" in out
    assert main(base + ["reset-offsets", "g", "--all-topics", "--by-duration", "PT1H", "--execute"]) == 0
    assert "applied to 2" in capsys.readouterr().out
    assert main(base + ["reset-offsets", "g", "--topic", "t", "--to-offset", "99"]) == 0
    captured = capsys.readouterr()
    assert "clamped" in captured.out and "clamped" in captured.err
    assert main(base + ["reset-offsets", "g", "--topic", "t", "--by-duration", "1 hour"]) == 1
    assert main(base + ["delete", "g"]) == 0
    assert main(base + ["describe", "g"]) == 1
    assert "GROUP_NOT_FOUND" in capsys.readouterr().err


def test_a_second_process_with_the_same_instance_id_fences_the_first(stubs):
    stubs.create("t", 2)
    old = RawMember(stubs, "g", ["t"], instance_id="worker-1")
    first = old.next()
    new = RawMember(stubs, "g", ["t"], instance_id="worker-1")
    taken = new.next()
    assert parts(taken) == parts(first) and taken.generation == first.generation
    with pytest.raises(grpc.RpcError) as err:
        old.next()
    assert error_info(err.value)[:2] == (grpc.StatusCode.ABORTED, "INSTANCE_FENCED")
    new.leave()


def test_member_streams_end_with_unavailable_when_the_broker_stops(make_server):
    server = make_server(shutdown_grace_s=60)
    stubs = Stubs(server.address)
    try:
        stubs.create("t", 1)
        member = RawMember(stubs, "g", ["t"])
        member.next()
        server.stop()
        with pytest.raises(grpc.RpcError) as err:
            member.next()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stubs.close()


def test_close_commits_what_was_processed_and_never_moves_a_commit_back(server):
    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("t", 1)
        p.send_batch("t", 0, [str(i).encode() for i in range(10)])  # one batch
        c = GroupConsumer("g", "t", server.address)
        try:
            got = _consume(c, 4)  # leave the loop holding offset 3, inside the batch
        finally:
            c.close()
        assert got[-1].offset == 3
        assert [o.offset for o in admin.fetch_offsets("g")] == [3]  # offset 3 is read again
        c = GroupConsumer("g", "t", server.address)
        try:
            assert _consume(c, 1)[0].offset == 3
            c.commit({("t", 0): 10})  # explicit, ahead of what the loop has counted
        finally:
            c.close()
        assert [o.offset for o in admin.fetch_offsets("g")] == [10]


def test_at_most_once_commits_a_fetched_batch_before_handing_out_its_records(server):
    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("t", 1)
        p.send_batch("t", 0, [str(i).encode() for i in range(10)])
        c = GroupConsumer("g", "t", server.address, delivery="at-most-once")
        try:
            first = _consume(c, 1)[0]
            assert first.offset == 0
            # committed before the record was processed: a crash now skips the batch
            assert [o.offset for o in admin.fetch_offsets("g")] == [10]
        finally:
            c.close()


def test_auto_commit_advances_the_committed_offset_while_reading(server):
    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("t", 1)
        p.send_batch("t", 0, [b"a", b"b", b"c"])
        c = GroupConsumer("g", "t", server.address, auto_commit_interval_ms=1)
        try:
            got = []
            for record in c.records(idle_timeout_s=5):
                got.append(record)
                if len(got) == 3:
                    p.send_batch("t", 0, [b"d"])  # asking for the next record processes "c"
                elif len(got) == 4:
                    break
            assert wait_until(lambda: [o.offset for o in admin.fetch_offsets("g")] == [3], timeout=5)
        finally:
            c.close()


def test_a_reset_the_client_gives_up_on_still_finishes_and_tells_the_members(server, stubs, monkeypatch):
    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"x"] * 10)
    member = RawMember(stubs, "g", ["t"])
    first = member.next()
    commit(stubs, "g", first.member_id, first.generation, {("t", 0): 8})
    store = server.server.store
    real = store.save_undo

    async def slow_save_undo(*args, **kwargs):
        await asyncio.sleep(0.5)
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "save_undo", slow_save_undo)
    request = pb.ResetOffsetsRequest(group="g", all_topics=True, position=pb.OFFSET_SPEC_EARLIEST, execute=True)
    with pytest.raises(grpc.RpcError) as err:
        stubs.groups.ResetOffsets(request, timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    told = member.next()
    assert told.offsets_reset and told.generation > first.generation
    assert [o.offset for o in stubs.groups.FetchOffsets(pb.FetchOffsetsRequest(group="g")).offsets] == [0]
    commit(stubs, "g", told.member_id, told.generation, {("t", 0): 3})  # the new generation commits again
    member.close()


def test_reset_targets_clamp_and_negative_offsets_are_refused(stubs):
    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"x"] * 30)
    commit(stubs, "g", "", 0, {("t", 0): 30})
    plan = stubs.groups.ResetOffsets(pb.ResetOffsetsRequest(group="g", all_topics=True, shift_by=-50, execute=True))
    assert (plan.plan[0].new_offset, plan.plan[0].clamped) == (0, True)
    assert [o.offset for o in stubs.groups.FetchOffsets(pb.FetchOffsetsRequest(group="g")).offsets] == [0]
    with pytest.raises(grpc.RpcError) as err:
        stubs.groups.ResetOffsets(pb.ResetOffsetsRequest(group="g", all_topics=True, offset=-7))
    assert error_info(err.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "NEGATIVE_OFFSET")


def test_leaving_the_loop_inside_a_reply_skips_nothing(server):
    import itertools

    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("t", 1)
        for b in range(3):
            p.send_batch("t", 0, [str(b * 10 + i).encode() for i in range(10)])
        p.flush()
        c = GroupConsumer("g", "t", server.address, auto_commit_interval_ms=None)
        try:
            first = [r.offset for r in itertools.islice(c.records(idle_timeout_s=5), 5)]
            rest = [r.offset for r in itertools.islice(c.records(idle_timeout_s=5), 26)]
            assert first + rest[1:] == list(range(30)) and rest[0] == 4  # the record in hand comes again
        finally:
            c.close()


def test_a_failed_offset_store_answers_unavailable_and_keeps_the_topic(server, stubs, monkeypatch):
    from consumer_groups.journal import Journal

    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"x"])
    journal = server.server.store._journal
    journal._failed = OSError(5, "injected")

    def still_failing(self, snapshot):
        raise OSError(5, "still failing")

    monkeypatch.setattr(Journal, "_rewrite", still_failing)  # the rewrite after the failure fails too
    with pytest.raises(grpc.RpcError) as err:
        commit(stubs, "g", "", 0, {("t", 0): 1})
    assert error_info(err.value)[:2] == (grpc.StatusCode.UNAVAILABLE, "STORAGE_FAILED")
    with pytest.raises(grpc.RpcError) as err:
        stubs.topics.DeleteTopic(pb.DeleteTopicRequest(topic="t"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [t.name for t in stubs.topics.ListTopics(pb.ListTopicsRequest()).topics] == ["t"]
    assert stubs.produce_values("t", 0, [b"y"]).base_offset == 1  # the rest keeps serving
    monkeypatch.undo()  # the disk works again: so does the store, without a restart
    commit(stubs, "g", "", 0, {("t", 0): 1})
    assert journal._failed is None


def test_offsets_of_a_topic_deleted_behind_the_journal_are_purged_at_start(make_server, tmp_path):
    first = make_server()
    with Admin(first.address) as admin:
        admin.create_topic("t", 1)
        admin.create_topic("u", 1)
        with Producer(first.address) as p:
            p.send("t", b"a", partition=0)
            p.send("u", b"a", partition=0)
        admin.commit_offsets("g", {("t", 0): 1, ("u", 0): 1})
    first.stop()
    import shutil

    shutil.rmtree(tmp_path / "data" / "t")  # as if a crash hit between the delete and the journal
    second = make_server()
    with Admin(second.address) as admin:
        assert [(o.topic, o.offset) for o in admin.fetch_offsets("g")] == [("u", 1)]


def test_fetch_offsets_waits_for_commits_still_being_written(server, stubs, monkeypatch):
    import consumer_groups.journal as journal

    stubs.create("t", 1)
    stubs.produce_values("t", 0, [b"x"] * 100)
    real_append = journal._append

    def slow_append(*args):
        time.sleep(0.4)
        real_append(*args)

    monkeypatch.setattr(journal, "_append", slow_append)
    writer = threading.Thread(target=commit, args=(stubs, "g", "", 0, {("t", 0): 80}))
    writer.start()
    time.sleep(0.1)  # the commit is accepted, its fsync still running
    offsets = stubs.groups.FetchOffsets(pb.FetchOffsetsRequest(group="g")).offsets
    writer.join(10)
    assert [o.offset for o in offsets] == [80]


def test_close_from_another_thread_ends_the_reading_loop_cleanly(server):
    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("t", 2)
        for i in range(10):
            p.send("t", b"v", partition=i % 2)
        p.flush()
        c = GroupConsumer("g", "t", server.address)
        seen, errors = [], []

        def read() -> None:
            try:
                for record in c.records():
                    seen.append(record.offset)
            except Exception as exc:  # the test fails on any
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        assert wait_until(lambda: len(seen) == 10)
        c.close()
        reader.join(10)
        assert not reader.is_alive() and not errors
        assert sorted(o.offset for o in admin.fetch_offsets("g")) == [5, 5]


def test_a_transient_commit_failure_does_not_stop_reading(server):
    from streamd.client import StreamdError

    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("t", 1)
        p.send_batch("t", 0, [b"a", b"b", b"c"])
        c = GroupConsumer("g", "t", server.address, auto_commit_interval_ms=1)
        real_call, failures = c._call, []

        def flaky(method, request):
            if isinstance(request, pb.CommitOffsetsRequest) and not failures:
                failures.append(request)
                raise StreamdError("UNAVAILABLE", "BROKER_UNAVAILABLE", "injected")
            return real_call(method, request)

        c._call = flaky
        try:
            got = []
            for record in c.records(idle_timeout_s=5):
                got.append(record.offset)
                if len(got) == 3:
                    p.send_batch("t", 0, [b"d"])  # read after the failed automatic commit
                elif len(got) == 4:
                    break
            assert got == [0, 1, 2, 3] and failures
        finally:
            c.close()


def test_a_short_session_timeout_survives_a_slow_start(server):
    with Admin(server.address) as admin:
        admin.create_topic("t", 1)
        c = GroupConsumer("g", "t", server.address, session_timeout_ms=500)
        try:
            member = c.wait_for_assignment() and c.member_id
            time.sleep(1.5)  # the reading thread is busy elsewhere; heartbeats go on
            assert c.poll_assignment() == {("t", 0)} and c.member_id == member
            assert [m.member_id for m in admin.describe_group("g").members] == [member]
        finally:
            c.close()
