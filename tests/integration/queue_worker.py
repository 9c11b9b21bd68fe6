"""A queue worker process for the order-processing scenario: sends one "email" per
order (a record on the emails topic, keyed and idempotency-keyed by the order id).
Flaky orders fail their first two deliveries; malformed ones always fail; the order
named by HOLD makes this worker announce it and hang (to be SIGKILLed mid-task)."""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc

from streamd.client.queue import QueueReceiver
from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc


def main(address: str, name: str, hold: str) -> None:
    out = sys.stdout
    channel = grpc.insecure_channel(address)
    log = rpc.LogServiceStub(channel)

    def emit(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def handle(msg) -> None:
        order = json.loads(msg.value)
        emit({"worker": name, "order": order["id"], "delivery": msg.delivery_count})
        if order.get("malformed"):
            raise ValueError("malformed order")
        if order.get("flaky") and msg.delivery_count <= 2:
            raise ConnectionError("email service unavailable")
        # The side effect, deduplicated by the order id (the emails topic has a window).
        email = pb.Record(key=order["id"].encode(), value=f"email for {order['id']}".encode(),
                          idempotency_key=order["id"])
        log.Produce(pb.ProduceRequest(topic="emails", records=[email]), timeout=10)
        if order["id"] == hold and msg.delivery_count == 1:
            emit({"holding": order["id"]})  # crash after the side effect, before the ack
            time.sleep(3600)
        emit({"done": order["id"]})

    receiver = QueueReceiver("fulfilment", "orders", address, max_wait_ms=200, max_records=5)
    stop = threading.Event()
    try:
        receiver.process(handle, workers=1, stop=stop)
    finally:
        receiver.close()
        channel.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
