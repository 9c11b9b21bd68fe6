"""The processes of the consumer-group benchmark (``bench.groups``): the parameters,
the per-record reading body, the member and producer processes, and ``_Fleet``,
the parent's handle on them. Every wait is bounded; a child exits on its own when
its pipe to the parent closes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections

from bench.harness import payload

TARGET_MIN_RATIO = 0.80
TARGET_REASSIGN_MS = 1000
WARM_UP_S = 0.3          # for the first Fetch replies to arrive before a clock starts
SETTLE_S = 0.5           # after the group is stable, before a member leaves or dies
STABLE_TIMEOUT_S = 30.0
REASSIGN_TIMEOUT_S = 15.0  # longer than the broker's default 10 s session timeout
CHECK_S = 0.02           # how often a consuming member looks at its pipe


@dataclass(frozen=True)
class Params:
    partitions: int = 8
    records_per_partition: int = 500_000  # 4M records: ~2 s per read at ~2M records/s
    record_bytes: int = 100
    members: int = 4
    repeat: int = 3
    reassign_members: int = 4
    reassign_repeat: int = 5
    auto_commit_interval_ms: int = 1000
    produce_interval_ms: int = 20
    produce_batch: int = 5
    read_timeout_s: float = 60.0
    profile_dir: str = ""  # when set, every throughput member writes a cProfile file here

    @classmethod
    def for_run(cls, quick: bool, **overrides) -> Params:
        base = cls(records_per_partition=2_000, repeat=1, reassign_members=2, reassign_repeat=1,
                   read_timeout_s=20.0) if quick else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------- reading


@dataclass
class Tally:
    """What one reader saw: per-partition high-water marks (next expected offset, all
    readers start at 0), counts, and the wall-clock time of its last record."""

    hw: list[int]
    records: int = 0
    bytes: int = 0
    duplicates: int = 0
    gaps: int = 0
    last_time: float = 0.0


def read_records(records, tally: Tally, target: int, deadline: float) -> None:
    """The per-record body every reader runs, until ``target`` records or ``deadline``."""
    hw = tally.hw
    got = nbytes = dups = gaps = 0
    if target > 0:
        for r in records:
            p, o = r.partition, r.offset
            if o == hw[p]:
                hw[p] = o + 1
            elif o < hw[p]:
                dups += 1
            else:
                gaps += o - hw[p]
                hw[p] = o + 1
            nbytes += len(r.value)
            got += 1
            if got >= target or (got % 10_000 == 0 and time.time() > deadline):
                break
    tally.last_time = time.time()
    tally.records += got
    tally.bytes += nbytes
    tally.duplicates += dups
    tally.gaps += gaps


# --------------------------------------------------------------------------- member processes


class _Reporter:
    """Tells the parent about every assignment change (member id, generation, partitions)."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.last = conn, None

    def report(self, gc) -> None:
        state = (gc.member_id, gc.generation, tuple(sorted(p for _, p in gc.assigned)))
        if state != self.last:
            self.conn.send(("assignment", *state))
            self.last = state


def _await_command(conn: Connection, gc, reporter: _Reporter, deadline: float) -> str:
    """Keep applying assignments (acknowledging revocations) until the parent says something."""
    while time.time() < deadline:
        gc.poll_assignment()
        reporter.report(gc)
        if conn.poll(CHECK_S):
            return conn.recv()[0]
    raise TimeoutError("no command from the benchmark")


def _throughput_member(conn: Connection, index: int, address: str, group: str, topic: str,
                       ends: list[int], params: Params, deadline: float) -> None:
    from streamd.client import GroupConsumer

    gc = None
    try:
        gc = GroupConsumer(group, topic, address, client_id=f"bench-{index}",
                           auto_commit_interval_ms=params.auto_commit_interval_ms)
        reporter = _Reporter(conn)
        gc.wait_for_assignment(STABLE_TIMEOUT_S)
        if _await_command(conn, gc, reporter, deadline) != "start":
            return
        owned = sorted(p for _, p in gc.poll_assignment())
        tally = Tally([0] * len(ends))
        target = sum(ends[p] for p in owned)
        read_deadline = min(deadline, time.time() + params.read_timeout_s)
        records = gc.records(idle_timeout_s=5.0)
        if params.profile_dir:
            _profiled(params.profile_dir, f"{group}-member-{index}", records, tally, target, read_deadline)
        else:
            read_records(records, tally, target, read_deadline)
        records.close()
        conn.send(("done", {**asdict(tally), "partitions": owned, "target": target}))
        if _await_command(conn, gc, reporter, deadline) == "commit":
            gc.commit({(topic, p): tally.hw[p] for p in owned if tally.hw[p]})
            conn.send(("committed",))
            _await_command(conn, gc, reporter, deadline)
    except (EOFError, BrokenPipeError):
        pass  # the benchmark went away
    except Exception as e:
        conn.send(("error", repr(e)))
    finally:
        if gc is not None:
            gc.close()


def _profiled(directory: str, name: str, records, tally: Tally, target: int, deadline: float) -> None:
    import cProfile

    profile = cProfile.Profile()
    profile.runcall(read_records, records, tally, target, deadline)
    profile.dump_stats(os.path.join(directory, f"{name}.prof"))


def _live_member(conn: Connection, index: int, address: str, group: str, topic: str,
                 params: Params, deadline: float) -> None:
    """Consume until told to leave or stop; report the first record of every partition
    as it is assigned (time of the record, time of the assignment)."""
    from streamd.client import GroupConsumer

    fresh: dict[int, float] = {}

    def on_assign(tps) -> None:
        now = time.time()
        fresh.update({p: now for _, p in tps})

    def on_revoke(tps) -> None:
        for _, p in tps:
            fresh.pop(p, None)

    gc = None
    try:
        gc = GroupConsumer(group, topic, address, client_id=f"bench-live-{index}", on_assign=on_assign,
                           on_revoke=on_revoke, auto_commit_interval_ms=params.auto_commit_interval_ms)
        reporter = _Reporter(conn)
        command, check_at = None, 0.0
        while command is None and time.time() < deadline:
            for record in gc.records(idle_timeout_s=CHECK_S):
                if fresh and record.partition in fresh:
                    conn.send(("first", record.partition, time.time(), fresh.pop(record.partition)))
                if time.time() >= check_at:
                    check_at = time.time() + CHECK_S
                    reporter.report(gc)
                    if conn.poll():
                        command = conn.recv()[0]
                        break
            reporter.report(gc)
            if command is None and conn.poll():
                command = conn.recv()[0]
        if command == "leave":
            t_call = time.time()
            gc.close()
            conn.send(("left", t_call, time.time()))
    except (EOFError, BrokenPipeError):
        pass
    except Exception as e:
        conn.send(("error", repr(e)))
    finally:
        if gc is not None:
            gc.close()


def _producer(conn: Connection, address: str, topic: str, params: Params, deadline: float) -> None:
    """Write ``produce_batch`` records to every partition each ``produce_interval_ms``
    (deadline schedule) until told to stop."""
    from streamd.client import AsyncProducer

    async def run() -> None:
        values = [payload(params.record_bytes)] * params.produce_batch
        interval = params.produce_interval_ms / 1000
        async with AsyncProducer(address) as producer:
            pending: list[asyncio.Future] = []
            due = time.monotonic()
            while time.time() < deadline and not conn.poll():
                for p in range(params.partitions):
                    pending.append(await producer.send_batch(topic, p, values))
                for f in [f for f in pending if f.done()]:
                    f.result()  # raise a failed send here
                pending = [f for f in pending if not f.done()]
                due += interval
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            await asyncio.gather(*pending)

    try:
        asyncio.run(run())
    except (EOFError, BrokenPipeError):
        pass


# --------------------------------------------------------------------------- the parent's view


@dataclass
class _Proc:
    proc: multiprocessing.Process
    conn: Connection
    member_id: str = ""
    generation: int = 0
    partitions: tuple[int, ...] = ()
    alive: bool = True


@dataclass
class _Fleet:
    """Member processes (spawned, one pipe each) and what they last reported."""

    ctx: multiprocessing.context.BaseContext
    procs: dict[int, _Proc] = field(default_factory=dict)
    spawned: int = 0

    def spawn(self, target, *args) -> int:
        index = self.spawned
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(child, index, *args), daemon=True,
                                name=f"bench-groups-{index}")
        proc.start()
        child.close()
        self.procs[index] = _Proc(proc, parent)
        self.spawned += 1
        return index

    def live(self) -> dict[int, _Proc]:
        return {i: p for i, p in self.procs.items() if p.alive}

    def pump(self, timeout: float) -> list[tuple[int, tuple]]:
        """Messages that arrived within ``timeout``; assignment reports are applied."""
        by_conn = {p.conn: i for i, p in self.live().items()}
        if not by_conn:
            time.sleep(timeout)
            return []
        out = []
        for conn in wait_connections(list(by_conn), timeout):
            i = by_conn[conn]
            try:
                while conn.poll():
                    msg = conn.recv()
                    if msg[0] == "error":
                        raise RuntimeError(f"member {i}: {msg[1]}")
                    if msg[0] == "assignment":
                        self.procs[i].member_id, self.procs[i].generation, self.procs[i].partitions = msg[1:]
                    else:
                        out.append((i, msg))
            except EOFError:
                self.procs[i].alive = False
        return out

    def send(self, message: tuple, indexes=None) -> None:
        for i in self.live() if indexes is None else indexes:
            self.procs[i].conn.send(message)

    def collect(self, kind: str, count: int, timeout: float) -> dict[int, tuple]:
        got: dict[int, tuple] = {}
        deadline = time.time() + timeout
        while len(got) < count and time.time() < deadline:
            got.update({i: msg for i, msg in self.pump(0.05) if msg[0] == kind})
        if len(got) < count:
            raise TimeoutError(f"{len(got)}/{count} members answered {kind!r} within {timeout:.0f} s")
        return got

    def wait_stable(self, admin, group: str, members: int, partitions: int, timeout: float) -> None:
        """Until the broker says STABLE with ``members`` members and every live member
        reports the group's generation and together they own every partition."""
        from streamd.client import StreamdError
        from streamd.v1 import streamd_pb2 as pb

        deadline, state = time.time() + timeout, "no group yet"
        while time.time() < deadline:
            self.pump(0.05)
            try:
                d = admin.describe_group(group)
            except StreamdError:
                continue
            live = self.live().values()
            owned = sorted(p for m in live for p in m.partitions)
            state = f"state {pb.GroupState.Name(d.state)}, {len(d.members)} members, owned {owned}"
            if (d.state == pb.GROUP_STATE_STABLE and len(d.members) == members == len(live)
                    and all(m.generation == d.generation for m in live) and owned == list(range(partitions))):
                return
        raise TimeoutError(f"group {group} not stable within {timeout:.0f} s: {state}")

    def settle(self, seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            self.pump(min(0.05, max(0.0, end - time.time())))

    def stop(self) -> None:
        for p in self.live().values():
            try:
                p.conn.send(("stop",))
            except OSError:
                pass
        for p in self.procs.values():
            p.proc.join(5)
            if p.proc.is_alive():
                p.proc.kill()
                p.proc.join(5)
            p.conn.close()
