"""Idempotent producer: kill the broker between append and response, retry, no
duplicates.

The broker (a subprocess started by tests/crash/crash_broker.py, which injects the
hook) SIGKILLs itself right after the N-th produce request was appended (and, for
fsync=always, fsynced) and before answering it (LogService's ``on_durable_append``).
It is restarted on the same address; the producer's retry of the unanswered batch
must be answered with the original offsets, and the log must hold every record once.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from streamd.client import Producer
from streamd.client.records import decode_batches, values_batch
from streamd.v1 import streamd_pb2 as pb

from ..integration.helpers import Stubs
from .crash_broker import command as crash_broker

pytestmark = pytest.mark.slow


def read_all(stubs: Stubs, topic: str, partition: int = 0) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    while True:
        reply = stubs.fetch(topic, partition, offset, max_bytes=1 << 20)
        out += [(r.offset, r.value) for r in decode_batches(reply.batches, topic, partition, offset)]
        if not reply.batches or reply.next_offset >= reply.log_end_offset:
            return out
        offset = reply.next_offset


def idem(values, pid: int, seq: int) -> pb.RecordBatch:
    batch = values_batch(values)
    batch.producer_id, batch.base_sequence = pid, seq
    return batch


def produce(stubs: Stubs, topic: str, batch: pb.RecordBatch) -> pb.PartitionProduceResult:
    request = pb.ProduceRequest(topic=topic, partitions=[pb.PartitionBatches(partition=0, batches=[batch])])
    return stubs.log.Produce(request, timeout=10).results[0]


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_a_batch_appended_before_a_sigkill_is_a_duplicate_when_retried(server_process, tmp_path, same_port, fsync):
    data = tmp_path / "data"
    proc = server_process("--fsync", fsync, data_dir=data, command=crash_broker(3))
    stubs = Stubs(proc.address)
    stubs.create("t", 1)
    pid = stubs.log.InitProducer(pb.InitProducerRequest()).producer_id
    answers = [produce(stubs, "t", idem([b"a%d" % i, b"b%d" % i], pid, 2 * i)) for i in range(2)]
    with pytest.raises(grpc.RpcError) as caught:
        produce(stubs, "t", idem([b"a2", b"b2"], pid, 4))  # appended, then the broker dies
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    stubs.close()
    assert proc.proc.wait(10) == -9
    proc = server_process("--fsync", fsync, data_dir=data)
    stubs = Stubs(proc.address)
    try:
        retry = produce(stubs, "t", idem([b"a2", b"b2"], pid, 4))
        assert retry.duplicate and (retry.base_offset, retry.record_count) == (4, 2)
        assert retry.durable == (fsync == "always")
        for i, answer in enumerate(answers):  # older batches are still remembered too
            again = produce(stubs, "t", idem([b"a%d" % i, b"b%d" % i], pid, 2 * i))
            assert again.duplicate and again.base_offset == answer.base_offset
        assert produce(stubs, "t", idem([b"a3"], pid, 6)).base_offset == 6
        values = [v for _, v in read_all(stubs, "t")]
        assert values == [b"a0", b"b0", b"a1", b"b1", b"a2", b"b2", b"a3"]
    finally:
        stubs.close()
    assert proc.terminate() == 0


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_the_sdk_retries_across_a_sigkill_and_every_record_is_written_once(server_process, tmp_path, same_port,
                                                                           fsync):
    data = tmp_path / "data"
    proc = server_process("--fsync", fsync, data_dir=data, command=crash_broker(7))
    stubs = Stubs(proc.address)
    stubs.create("t", 2)
    stubs.close()
    restarted: list = []

    def restart_when_dead() -> None:
        proc.proc.wait(60)
        restarted.append(server_process("--fsync", fsync, data_dir=data))

    watcher = threading.Thread(target=restart_when_dead)
    watcher.start()
    values = [[b"p%d-%03d" % (p, i) for i in range(150)] for p in (0, 1)]
    with Producer(proc.address, linger_ms=2, batch_max_bytes=200) as producer:  # many small batches
        futures = [producer.send("t", v, partition=p) for i in range(150) for p, v in ((0, values[0][i]),
                                                                                        (1, values[1][i]))]
        producer.flush()
        watcher.join(60)
        assert proc.proc.returncode == -9, "the broker was not killed by the test hook"
        metas = [f.result(30) for f in futures]
    # the request the broker died on was appended and is answered on retry as such
    assert any(m.duplicate for m in metas)
    stubs = Stubs(restarted[0].address)
    try:
        for p in (0, 1):
            stored = read_all(stubs, "t", p)
            assert [v for _, v in stored] == values[p]  # once each, in order
            assert [o for o, _ in stored] == list(range(150))
            mine = {(m.offset, v) for m, v in zip(metas, [v for i in range(150) for v in
                                                          (values[0][i], values[1][i])], strict=False) if m.partition == p}
            assert mine == set(stored)  # every future points at its own record
    finally:
        stubs.close()
    assert restarted[0].terminate() == 0
