"""Raw gRPC helpers for integration tests (stubs generated from proto/)."""

from __future__ import annotations

import json

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from streamd.client.records import values_batch
from streamd.v1 import streamd_pb2 as pb
from streamd.v1 import streamd_pb2_grpc as rpc


class Stubs:
    def __init__(self, address: str, *, token: str = "") -> None:
        """``token``: sent as a bearer token on every call."""
        from streamd.client._channel import Security, sync_channel

        self.channel = sync_channel(address, security=Security(token=token)) if token else grpc.insecure_channel(address)
        self.topics = rpc.TopicServiceStub(self.channel)
        self.log = rpc.LogServiceStub(self.channel)
        self.groups = rpc.GroupServiceStub(self.channel)
        self.queues = rpc.QueueServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def create(self, topic: str, partitions: int = 1, **config) -> pb.TopicDescription:
        request = pb.CreateTopicRequest(topic=topic, partition_count=partitions, config=pb.TopicConfig(**config))
        return self.topics.CreateTopic(request).topic

    def produce_values(self, topic: str, partition: int, values: list[bytes], compression: str = "none"):
        batch = values_batch(values, compression)
        request = pb.ProduceRequest(topic=topic, partitions=[pb.PartitionBatches(partition=partition, batches=[batch])])
        return self.log.Produce(request).results[0]

    def fetch(self, topic: str, partition: int, offset: int, **limits) -> pb.FetchResponse:
        return self.log.Fetch(pb.FetchRequest(topic=topic, partition=partition, offset=offset, **limits))


def refused(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, ErrorInfo reason, metadata) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return error_info(caught.value)


def error_info(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, ErrorInfo reason, metadata) of a failed call."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "streamd.io"
            return err.code(), info.reason, dict(info.metadata)
    raise AssertionError(f"no ErrorInfo in {status}")


def auth_toml(principals: dict[str, str], *rules: tuple) -> str:
    """An auth file (README "Security"): ``principals`` name -> token SHA-256, then one
    ``[[allow]]`` per rule ``(principal, operations, topics[, groups])``."""
    out = [f'[[principal]]\nname = "{name}"\ntoken_sha256 = ["{sha}"]\n' for name, sha in principals.items()]
    for principal, operations, topics, *groups in rules:
        out.append(f'[[allow]]\nprincipal = "{principal}"\noperations = {json.dumps(operations)}\n'
                   f'topics = {json.dumps(topics)}\n' + (f"groups = {json.dumps(groups[0])}\n" if groups else ""))
    return "".join(out)


#: The rule of an operator allowed everything.
ADMIN_OF_ALL = ("ops", ["admin"], ["*"], ["*"])
