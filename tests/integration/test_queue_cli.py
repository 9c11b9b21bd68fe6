"""``streamd queue``: create, stats, seek, redrive (filters, dry run), delete."""

from __future__ import annotations

from streamd.cli.main import main
from streamd.client import Admin, Producer
from streamd.client.queue import QueueReceiver
from tests.conftest import wait_until


def test_queue_commands_and_redrive(server, capsys):
    base = ["--server", server.address]
    with Admin(server.address) as admin, Producer(server.address) as p:
        admin.create_topic("orders", 1)
        for i in range(6):
            p.send("orders", f"order-{i}".encode(), key=b"bad" if i % 3 == 0 else b"good",
                   headers=[("source", b"web")])
        p.flush()
    assert main(base + ["queue", "create", "mailers", "--topic", "orders", "--max-deliveries", "1",
                        "--initial-delay-ms", "0"]) == 0
    capsys.readouterr()
    with QueueReceiver("mailers", "orders", server.address) as r:
        for msg in r.receive(10):
            if msg.key == b"bad":
                msg.nack(reason="template missing")
            else:
                msg.ack()
        r.flush()
        assert wait_until(lambda: sum(p.dead_lettered for p in r.describe().partitions) >= 2)
    assert main(base + ["queue", "stats", "mailers"]) == 0
    out = capsys.readouterr().out
    assert "DEAD-LETTERED" in out and "OLDEST-UNACKED" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("mailers"))
    assert row[:5] == ["mailers", "orders", "0", "6", "6"] and row[8] == "4" and row[10] == "2"

    assert main(base + ["queue", "redrive", "--from", "orders.dlq", "--to", "orders", "--dry-run"]) == 0
    assert "would move 2" in capsys.readouterr().out
    assert main(base + ["queue", "redrive", "--from", "orders.dlq", "--to", "orders", "--reason", "nothing"]) == 0
    assert "moved 0" in capsys.readouterr().out
    assert main(base + ["queue", "redrive", "--from", "orders.dlq", "--to", "orders", "--key", "bad",
                        "--rate", "1000"]) == 0
    assert "moved 2" in capsys.readouterr().out
    assert main(base + ["queue", "redrive", "--from", "orders.dlq", "--to", "orders"]) == 0
    assert "moved 0" in capsys.readouterr().out  # each dead letter moves once
    with QueueReceiver("mailers", "orders", server.address) as r:
        back = r.receive(10)
        assert sorted(m.value for m in back) == [b"order-0", b"order-3"]
        assert all(dict(m.headers) == {"source": b"web"} for m in back)  # dlq headers stripped

    assert main(base + ["queue", "seek", "mailers", "--topic", "orders", "--to-offset", "2"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert main(base + ["queue", "seek", "mailers", "--topic", "orders", "--to-earliest", "--execute"]) == 0
    assert "applied" in capsys.readouterr().out
    assert main(base + ["queue", "list", "--topic", "orders"]) == 0
    assert "mailers" in capsys.readouterr().out
    assert main(base + ["queue", "delete", "mailers", "--topic", "orders"]) == 0
    assert main(base + ["queue", "stats", "mailers"]) == 1


def test_redrive_goes_past_many_records_its_filters_leave(server, capsys):
    from streamd.v1 import streamd_pb2 as pb

    with Admin(server.address) as admin:
        admin.create_topic("x", 1)
        admin.create_topic("x.dlq", 1)
    with Producer(server.address) as p:
        p.send_batch("x.dlq", 0, pb.RecordSet(records=[pb.Record(key=b"a", value=b"%d" % i) for i in range(600)]))
        p.send_batch("x.dlq", 0, pb.RecordSet(records=[pb.Record(key=b"b", value=b"%d" % i) for i in range(100)]))
    base = ["--server", server.address, "queue", "redrive", "--from", "x.dlq", "--to", "x"]
    assert main(base + ["--dry-run"]) == 0
    assert "would move 700" in capsys.readouterr().out
    assert main(base + ["--key", "b"]) == 0
    assert "moved 100 record(s) from x.dlq to x; 600 left" in capsys.readouterr().out
    assert main(base) == 0
    assert "moved 600" in capsys.readouterr().out
    with Admin(server.address) as admin:
        assert [o.log_end_offset for o in admin.list_offsets("x")] == [700]
