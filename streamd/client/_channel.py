"""Channels to a broker, with the limits streamd's messages need."""

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
