"""Channels to a broker, with the limits streamd's messages need, and the shared
behaviour of the blocking clients."""

from __future__ import annotations

import os

import grpc

DEFAULT_SERVER = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def server_address(server: str | None) -> str:
    return server or os.environ.get("STREAMD_SERVER") or DEFAULT_SERVER


def sync_channel(server: str | None = None) -> grpc.Channel:
    return grpc.insecure_channel(server_address(server), options=OPTIONS)


def aio_channel(server: str | None = None) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(server_address(server), options=OPTIONS)


class SyncClient:
    """A blocking client over its own channel (or one it is given)."""

    def __init__(self, server: str | None = None, *, channel: grpc.Channel | None = None) -> None:
        from streamd._malloc import tune_malloc
        from streamd.v1 import streamd_pb2_grpc as rpc

        tune_malloc()
        self._own_channel = channel is None
        self._channel = channel or sync_channel(server)
        self._topics = rpc.TopicServiceStub(self._channel)
        self._log = rpc.LogServiceStub(self._channel)
        self._groups = rpc.GroupServiceStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def _call(self, method, request):
        from .errors import StreamdError

        try:
            return method(request)
        except grpc.RpcError as err:
            raise StreamdError.from_rpc_error(err) from None
