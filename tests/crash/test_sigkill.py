"""A real broker process SIGKILLed while producers write with fsync=always: every
acknowledged record reads back after restart, and damaged files are recovered."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from streamd.client.records import decode_batches, values_batch
from streamd.v1 import streamd_pb2 as pb

from ..integration.helpers import Stubs

pytestmark = pytest.mark.slow


def _producer(address: str, topic: str, partition: int, acked: list, stop: threading.Event, tag: int) -> None:
    stubs = Stubs(address)
    try:
        for n in range(100_000):
            if stop.is_set():
                return
            values = [b"p%d-%d-%d" % (tag, n, i) for i in range(random.randint(1, 50))]
            request = pb.ProduceRequest(
                topic=topic, partitions=[pb.PartitionBatches(partition=partition, batches=[values_batch(values)])]
            )
            try:
                result = stubs.log.Produce(request, timeout=5).results[0]
            except grpc.RpcError:
                return  # the broker died: this batch was never acknowledged
            assert result.durable
            acked.append((partition, result.base_offset, values))
    finally:
        stubs.close()


def _read_all(stubs: Stubs, topic: str, partition: int) -> dict[int, bytes]:
    out, offset = {}, 0
    for _ in range(100_000):
        reply = stubs.fetch(topic, partition, offset, max_bytes=1 << 20)
        for r in decode_batches(reply.batches, topic, partition, offset):
            out[r.offset] = r.value
        if reply.next_offset >= reply.log_end_offset or not reply.batches:
            return out
        offset = reply.next_offset
    raise AssertionError("read loop did not finish")


@pytest.mark.parametrize("round_", range(3))
def test_acknowledged_records_survive_sigkill(server_process, tmp_path, round_):
    random.seed(round_)
    data = tmp_path / "data"
    # Small segments so the kill also lands around segment rolls.
    proc = server_process("--segment-bytes", "65536", data_dir=data)
    stubs = Stubs(proc.address)
    stubs.create("t", 2)
    stubs.close()
    acked: list = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_producer, args=(proc.address, "t", i % 2, acked, stop, i)) for i in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(random.uniform(0.3, 1.5))
    proc.kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert acked, "no batch was acknowledged before the kill"

    proc = server_process("--segment-bytes", "65536", data_dir=data)
    stubs = Stubs(proc.address)
    try:
        stored = {p: _read_all(stubs, "t", p) for p in (0, 1)}
        for partition, base, values in acked:
            for i, value in enumerate(values):
                assert stored[partition].get(base + i) == value, (partition, base + i)
        for p in (0, 1):  # offsets are dense
            assert sorted(stored[p]) == list(range(len(stored[p])))
    finally:
        stubs.close()
    assert proc.terminate() == 0


def _damage_and_restart(server_process, tmp_path, damage) -> tuple[dict[int, bytes], str]:
    data = tmp_path / "data"
    proc = server_process(data_dir=data)
    stubs = Stubs(proc.address)
    stubs.create("t", 1)
    for n in range(20):
        stubs.produce_values("t", 0, [b"r%d-%d" % (n, i) for i in range(10)])
    stubs.close()
    proc.kill()
    damage(data / "t" / "0")
    proc = server_process(data_dir=data)
    stubs = Stubs(proc.address)
    try:
        stored = _read_all(stubs, "t", 0)
        # the partition accepts writes again, right after the recovered data
        assert stubs.produce_values("t", 0, [b"after"]).base_offset == len(stored)
    finally:
        stubs.close()
    proc.terminate()
    return stored, proc.output()


def _expected(n_batches: int) -> dict[int, bytes]:
    return {n * 10 + i: b"r%d-%d" % (n, i) for n in range(n_batches) for i in range(10)}


def _log_file(partition_dir):
    return sorted(partition_dir.glob("*.log"))[-1]


def _data_end(path) -> int:
    raw = path.read_bytes()
    return len(raw.rstrip(b"\x00"))


def test_torn_tail_is_truncated_at_last_whole_batch(server_process, tmp_path):
    def tear(partition_dir):
        path = _log_file(partition_dir)
        end = _data_end(path)
        with open(path, "r+b") as fh:
            fh.truncate(end - 7)  # cut into the last batch

    stored, output = _damage_and_restart(server_process, tmp_path, tear)
    assert stored == _expected(19)
    assert "truncat" in output.lower()


def test_flipped_byte_in_last_batch_is_cut(server_process, tmp_path):
    def flip(partition_dir):
        path = _log_file(partition_dir)
        end = _data_end(path)
        with open(path, "r+b") as fh:
            fh.seek(end - 3)
            b = fh.read(1)
            fh.seek(end - 3)
            fh.write(bytes([b[0] ^ 0x5A]))

    stored, _ = _damage_and_restart(server_process, tmp_path, flip)
    assert stored == _expected(19)


def test_garbled_and_missing_indexes_are_rebuilt(server_process, tmp_path):
    def garble(partition_dir):
        for index in partition_dir.glob("*.index"):
            index.write_bytes(random.Random(1).randbytes(index.stat().st_size or 64))
        for index in partition_dir.glob("*.timeindex"):
            index.unlink()

    stored, _ = _damage_and_restart(server_process, tmp_path, garble)
    assert stored == _expected(20)
