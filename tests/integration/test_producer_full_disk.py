"""An idempotent producer against a broker whose disk fills up, for real: the data
directory is on a small tmpfs, ballast eats the free space, a Producer keeps sending
until the broker cannot store more, then the space comes back.

What must hold: a batch the broker refuses (RESOURCE_EXHAUSTED / DISK_FULL) fails
alone, and no refusal cascades into OUT_OF_ORDER_SEQUENCE / UNKNOWN_PRODUCER for the
batches behind it; an answer that does not say whether the batch was stored
(INTERNAL, as a short write answered before the broker's fix) is retried, not
failed; the sends after the space returns all succeed; and what reads back is
exactly what was acknowledged, in order, each once.
"""

from __future__ import annotations

import collections

import pytest

from streamd.client import Admin, Consumer, ProduceError, Producer

from ..conftest import wait_until
from ..fs import fill, free_bytes

RECORD = 10_000


def stored(address: str, topic: str, partition: int) -> list[tuple[int, bytes]]:
    with Consumer(address) as consumer:
        consumer.assign(topic, [partition])
        return [(r.offset, r.value) for r in consumer.records(exit_at_end=True)]


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_a_full_disk_fails_only_the_refused_batches_and_the_rest_is_stored_once(small_fs, make_server, kind):
    # small_fs first: its filesystem is unmounted after make_server stopped the broker.
    root = small_fs(32 << 20, kind=kind)
    server = make_server(data_dir=root / "data")
    with Admin(server.address) as admin:
        admin.create_topic("t", 2, segment_bytes=64 << 10)
    ballast = fill(root, leave_bytes=3 << 20)
    sent: list[tuple[int, bytes, object]] = []
    with Producer(server.address, linger_ms=1, delivery_timeout_ms=60_000, retry_backoff_ms=20) as producer:
        for i in range(600):  # ~6 MB: twice the room left
            value = b"%06d" % i + b"x" * RECORD
            sent.append((i % 2, value, producer.send("t", value, partition=i % 2)))
        # Full: the broker stored what it could, and refuses (or, before its fix,
        # answers INTERNAL to, which the producer retries) what does not fit.
        wait_until(lambda: free_bytes(root) < 2 * RECORD, timeout=30)
        wait_until(lambda: any(f.done() and f.exception() for _, _, f in sent), timeout=10)
        ballast.release()
        producer.flush()
        after = [(i % 2, b"after-%d" % i) for i in range(40)]
        later = [(p, v, producer.send("t", v, partition=p)) for p, v in after]
        producer.flush()
    failures = collections.Counter()
    for _, _, f in sent:
        exc = f.exception()
        if exc is not None:
            assert isinstance(exc, ProduceError), exc
            failures[(exc.code, exc.reason)] += 1
    assert set(failures) <= {("RESOURCE_EXHAUSTED", "DISK_FULL")}, failures
    assert all(f.exception() is None for _, _, f in later)
    for p in (0, 1):
        acked = [(f.result().offset, v) for q, v, f in sent + later if q == p and f.exception() is None]
        assert stored(server.address, "t", p) == acked  # each once, in order, nothing else
