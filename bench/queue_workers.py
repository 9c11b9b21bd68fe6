"""The streamd side of the queue-group benchmark (``bench.queues``): the parameters,
the worker processes (raw ``QueueService`` stubs, no SDK batching in the way) and the
parent's run of one measurement.

A worker process lives for the whole section and takes commands over its pipe::

    ("warm",)       -> ("ready",)            channel connected (ListQueueGroups answered)
    ("run", spec)   -> ("done", result)      one measurement, see ``_run``
    ("stop",) or EOF                         exit

``result`` holds the worker's counts, the wall-clock time (``time.time()``, one
machine) of its last settlement answered, and ``seen``: per partition, a bytearray
with how often each offset was received (capped at 255) for the exactly-once check.

A worker stops when a Receive with ``EMPTY_WAIT_MS`` of long-poll comes back empty:
the backlog is drained and the other workers' leases (30 s) will not expire first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

EMPTY_WAIT_MS = 250
MODES = ("ranges", "ranges_pipelined", "sdk", "batched", "per_record", "per_record_pipelined")


@dataclass(frozen=True)
class Params:
    partitions: int = 4
    records_per_partition: int = 250_000
    record_bytes: int = 100
    workers: int = 4
    max_records: int = 1000               # Receive size of the batched runs
    per_record_total: int = 20_000        # records of the per-record-ack runs
    per_record_max_records: int = 100     # Receive size of the per-record-ack runs
    per_record_sequential_total: int = 4_000  # one Ack awaited at a time: slower, fewer records
    peer_records: int = 0                 # records of the peers' stream; 0: the same total as streamd
    peer_batch: int = 1000                # XREADGROUP COUNT / pull batch
    redelivery_records: int = 200
    redelivery_interval_ms: int = 5       # one record produced every ... (spreads the schedule)
    backoff_ms: int = 200                 # fixed backoff: multiplier 1, no jitter
    expiry_lease_ms: int = 300
    repeat: int = 3
    run_timeout_s: float = 120.0          # bound of one run (receive loops and waits)
    profile_dir: str = ""                 # when set: one extra batched run under py-spy

    @property
    def total(self) -> int:
        return self.partitions * self.records_per_partition

    @classmethod
    def for_run(cls, quick: bool, **overrides) -> Params:
        base = cls(records_per_partition=5_000, per_record_total=2_000, per_record_sequential_total=400,
                   redelivery_records=40, repeat=1, run_timeout_s=30.0) if quick else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------- worker process


@dataclass
class _Tally:
    ends: list[int]
    records: int = 0
    redelivered: int = 0          # delivery_count > 1
    out_of_range: int = 0
    settle_errors: int = 0
    receives: int = 0
    settle_calls: int = 0
    receive_s: float = 0.0        # waiting for Receive answers
    settle_s: float = 0.0         # building settlements and waiting for their answers (pipelined: sending)
    last_ack_time: float = 0.0
    seen: dict[int, bytearray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seen = {p: bytearray(end) for p, end in enumerate(self.ends)}

    def note(self, records) -> None:
        seen = self.seen
        for r in records:
            counts = seen.get(r.partition)
            o = r.offset
            if counts is None or not 0 <= o < len(counts):
                self.out_of_range += 1
            elif counts[o] < 255:
                counts[o] += 1
            if r.delivery_count > 1:
                self.redelivered += 1
        self.records += len(records)

    def note_ranges(self, partitions) -> int:
        """The batched form: count each leased offset (a numpy view per range) and read
        every leased record's value, as a worker would."""
        import numpy as np

        from streamd.client.records import record_runs

        n = 0
        for part in partitions:
            counts = self.seen.get(part.partition)
            view = np.frombuffer(counts, np.uint8) if counts is not None else None
            values = 0
            for r in part.leased:
                first, last = r.first_offset, r.last_offset
                n += last - first + 1
                if r.delivery_count > 1:
                    self.redelivered += last - first + 1
                if view is None or not 0 <= first <= last < len(view):
                    self.out_of_range += last - first + 1
                else:
                    window = view[first:last + 1]
                    window += window < 255
            for _, _, _, records in record_runs(part.batches, [(r.first_offset, r.last_offset, None) for r in part.leased]):
                for rec in records:
                    values += len(rec.value)
        self.records += n
        return n

    def answered(self, _future=None) -> None:
        self.last_ack_time = time.time()  # also a grpc done-callback: a plain store


def _streamd_worker(conn: Connection, index: int, address: str, deadline: float) -> None:
    import grpc

    from streamd.client._channel import sync_channel
    from streamd.v1 import streamd_pb2 as pb
    from streamd.v1 import streamd_pb2_grpc as rpc

    channel = sync_channel(address)
    stub = rpc.QueueServiceStub(channel)

    def run(spec: dict) -> dict:
        tally = _run(stub, pb, grpc, spec, address)
        return {k: v for k, v in vars(tally).items() if k != "ends"}

    try:
        serve_commands(conn, deadline, lambda: stub.ListQueueGroups(pb.ListQueueGroupsRequest()), run)
    finally:
        channel.close()


def serve_commands(conn: Connection, deadline: float, warm, run) -> None:
    """The worker side of the protocol: ("warm",) -> ("ready",), ("run", spec) -> ("done", result)."""
    try:
        while time.time() < deadline:
            if not conn.poll(0.05):
                continue
            command = conn.recv()
            if command[0] == "warm":
                warm()
                conn.send(("ready",))
            elif command[0] == "run":
                conn.send(("done", run(command[1])))
            else:
                return
    except (EOFError, BrokenPipeError):
        pass
    except Exception as e:
        try:
            conn.send(("error", repr(e)))
        except OSError:
            pass


def _run(stub, pb, grpc, spec: dict, address: str) -> _Tally:
    """Receive until the queue group is drained, settling as ``spec["mode"]`` says."""
    group, topic, mode = spec["group"], spec["topic"], spec["mode"]
    tally = _Tally(spec["ends"])
    receive = pb.ReceiveRequest(group=group, topic=topic, max_records=spec["max_records"],
                                max_wait_ms=EMPTY_WAIT_MS, worker_id=spec["worker_id"])
    deadline = time.time() + spec["seconds"]
    if mode in ("ranges", "ranges_pipelined"):
        return _run_ranges(stub, pb, spec, tally, receive, deadline)
    if mode == "sdk":
        return _run_sdk(address, spec, tally, deadline)
    while time.time() < deadline:
        t = time.perf_counter()
        records = stub.Receive(receive).records
        tally.receive_s += time.perf_counter() - t
        tally.receives += 1
        if not records:
            break
        tally.note(records)
        t = time.perf_counter()
        if mode == "batched":
            tally.settle_calls += 1
            _count_settle_errors(tally, stub.Settle(_settle_request(pb, group, topic, records)))
            tally.answered()
        else:
            _ack_each(stub, pb, grpc, group, topic, records, tally, pipelined=mode == "per_record_pipelined")
        tally.settle_s += time.perf_counter() - t
    return tally


def _run_sdk(address: str, spec: dict, tally: _Tally, deadline: float) -> _Tally:
    """The SDK's way: ``QueueReceiver.receive`` (batched form) and ``ack()`` per
    message (sent in the background as ranges), every value read; the clock stops
    at the final ``flush()``."""
    from streamd.client.queue import QueueReceiver

    with QueueReceiver(spec["group"], spec["topic"], address, max_records=spec["max_records"],
                       max_wait_ms=EMPTY_WAIT_MS, worker_id=spec["worker_id"]) as receiver:
        while time.time() < deadline:
            t = time.perf_counter()
            messages = receiver.receive()
            tally.receive_s += time.perf_counter() - t
            tally.receives += 1
            if not messages:
                break
            tally.note(messages)
            size = 0
            for m in messages:
                size += len(m.value)
                m.ack()
        t = time.perf_counter()
        receiver.flush()
        tally.settle_s += time.perf_counter() - t
        tally.answered()
    return tally


def _run_ranges(stub, pb, spec: dict, tally: _Tally, receive, deadline: float) -> _Tally:
    """Batched receive (stored batches + leased ranges), every leased range acked as a
    range in one Settle: awaited (``ranges``) or pipelined with the next Receive."""
    receive.batched = True
    pipelined = spec["mode"] == "ranges_pipelined"
    pending = None
    ack = pb.SETTLE_ACTION_ACK
    while time.time() < deadline:
        t = time.perf_counter()
        partitions = stub.Receive(receive).partitions
        tally.receive_s += time.perf_counter() - t
        tally.receives += 1
        if pending is not None:
            _count_settle_errors(tally, pending.result())
            pending = None
        if not partitions:
            break
        tally.note_ranges(partitions)
        t = time.perf_counter()
        request = pb.SettleRequest(group=spec["group"], topic=spec["topic"])
        add = request.ranges.add
        for part in partitions:
            for r in part.leased:
                add(partition=part.partition, first_offset=r.first_offset, last_offset=r.last_offset,
                    lease_id=r.lease_id, action=ack)
        tally.settle_calls += 1
        if pipelined:
            pending = stub.Settle.future(request)
            pending.add_done_callback(tally.answered)
        else:
            _count_settle_errors(tally, stub.Settle(request))
            tally.answered()
        tally.settle_s += time.perf_counter() - t
    if pending is not None:
        _count_settle_errors(tally, pending.result())
    return tally


def _settle_request(pb, group: str, topic: str, records):
    request = pb.SettleRequest(group=group, topic=topic)
    add, ack = request.settlements.add, pb.SETTLE_ACTION_ACK
    for r in records:
        lease = add(action=ack).lease
        lease.partition, lease.offset, lease.lease_id = r.partition, r.offset, r.lease_id
    return request


def _count_settle_errors(tally: _Tally, response) -> None:
    tally.settle_errors += sum(1 for r in response.results if r.HasField("error"))


def _ack_each(stub, pb, grpc, group: str, topic: str, records, tally: _Tally, *, pipelined: bool) -> None:
    """One Ack RPC per record: awaited one at a time, or all of the batch in flight at once."""
    requests = [pb.AckRequest(group=group, topic=topic,
                              lease=pb.LeaseRef(partition=r.partition, offset=r.offset, lease_id=r.lease_id))
                for r in records]
    tally.settle_calls += len(requests)
    if pipelined:
        futures = [stub.Ack.future(request) for request in requests]
        for f in futures:
            try:
                f.result()
            except grpc.RpcError:
                tally.settle_errors += 1
        tally.answered()
        return
    for request in requests:
        try:
            stub.Ack(request)
        except grpc.RpcError:
            tally.settle_errors += 1
        tally.answered()


# --------------------------------------------------------------------------- the parent's run


def check_exactly_once(done: list[dict], ends: list[int]) -> dict:
    """Sum every worker's per-offset counts: each offset must have been received once."""
    import numpy as np

    duplicates = missing = 0
    for p, end in enumerate(ends):
        counts = np.zeros(end, dtype=np.int64)
        for d in done:
            counts += np.frombuffer(d["seen"][p], dtype=np.uint8)
        missing += int(np.count_nonzero(counts == 0))
        duplicates += int((counts[counts > 1] - 1).sum())
    return {"duplicates": duplicates, "missing": missing,
            "out_of_range": sum(d["out_of_range"] for d in done)}


def group_state(stub, pb, group: str, topic: str) -> dict:
    """What the broker says after a run (DescribeQueueGroup)."""
    d = stub.DescribeQueueGroup(pb.DescribeQueueGroupRequest(group=group, topic=topic)).group
    parts = d.partitions
    return {
        "acked": sum(p.acked for p in parts),
        "drained": all(p.start_offset == p.log_end_offset for p in parts),
        "in_flight": sum(p.in_flight for p in parts),
        "waiting": sum(p.waiting for p in parts),
        "backlog": sum(p.backlog for p in parts),
        "redelivered": sum(p.redelivered for p in parts),
    }


def streamd_run(fleet, stub, pb, topic: str, ends: list[int], mode: str, group: str, max_records: int,
                params: Params, on_start=None) -> dict:
    """One measurement: a fresh queue group (default config: 30 s leases, 10,000 in flight
    per partition) drained by every worker of ``fleet``. Clock: from just before the start
    signal to the last settlement answered (``time.time()``, one machine)."""
    stub.CreateQueueGroup(pb.CreateQueueGroupRequest(group=group, topic=topic, config=pb.QueueGroupConfig()))
    spec = {"group": group, "topic": topic, "mode": mode, "ends": ends, "max_records": max_records,
            "seconds": params.run_timeout_s}
    try:
        if on_start is not None:
            on_start()
        t0 = time.time()
        for i in fleet.live():
            fleet.send(("run", {**spec, "worker_id": f"bench-{i}"}), [i])
        done = [msg[1] for msg in fleet.collect("done", params.workers, params.run_timeout_s + 30).values()]
        state = group_state(stub, pb, group, topic)
    finally:
        stub.DeleteQueueGroup(pb.DeleteQueueGroupRequest(group=group, topic=topic))
    total = sum(ends)
    records = sum(d["records"] for d in done)
    seconds = max(max(d["last_ack_time"] for d in done) - t0, 1e-9)
    once = check_exactly_once(done, ends)
    return {
        "records": records, "seconds": round(seconds, 4), "records_per_s": round(records / seconds, 1),
        "receives": sum(d["receives"] for d in done),
        "settle_calls": sum(d["settle_calls"] for d in done),
        "records_per_receive": round(records / max(1, sum(d["receives"] for d in done)), 1),
        "client_receive_wait_s": round(sum(d["receive_s"] for d in done), 3),
        "client_settle_wait_s": round(sum(d["settle_s"] for d in done), 3),
        "largest_worker_share": round(max(d["records"] for d in done) / max(1, records), 3),
        "correct": (records == total and once["duplicates"] == 0 and once["missing"] == 0
                    and not any(d["settle_errors"] for d in done) and state["acked"] == total
                    and state["drained"] and not state["in_flight"] and not state["waiting"]),
        "check": {"records_total": total, **once, "settle_errors": sum(d["settle_errors"] for d in done),
                  "redelivered_seen": sum(d["redelivered"] for d in done), "broker": state},
    }
