"""Channels to a broker, with the limits streamd's messages need, and the shared
behaviour of the blocking clients.

**TLS and tokens** come from the environment, so every client and the CLI get them
the same way: ``STREAMD_TLS_CA`` (PEM file of the CA that signed the broker's
certificate; setting any ``STREAMD_TLS_*`` turns TLS on, with the system's roots when
no CA is given), ``STREAMD_TLS_CERT`` and ``STREAMD_TLS_KEY`` (a client certificate
for mutual TLS), ``STREAMD_TOKEN`` (sent as ``authorization: Bearer <token>``), and
``STREAMD_TLS_SERVER_NAME`` (the name to check the broker's certificate against,
when the address is not it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from streamd.addresses import is_loopback

DEFAULT_SERVER = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def server_address(server: str | None) -> str:
    return server or os.environ.get("STREAMD_SERVER") or DEFAULT_SERVER


@dataclass(frozen=True)
class Security:
    """How a client proves itself and checks the broker (see the module docstring)."""

    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    token: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Security":
        env = os.environ if env is None else env
        ca, cert, key = (env.get(f"STREAMD_TLS_{k}", "") for k in ("CA", "CERT", "KEY"))
        name = env.get("STREAMD_TLS_SERVER_NAME", "")
        return cls(tls=bool(ca or cert or key or name), ca_file=ca, cert_file=cert, key_file=key,
                   server_name=name, token=env.get("STREAMD_TOKEN", ""))

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as fh:
                return fh.read()

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file), private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))

    def options(self, extra: list[tuple[str, object]] | None = None) -> list[tuple[str, object]]:
        name = [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else []
        return OPTIONS + (extra or []) + name


def _credentials(security: Security, address: str) -> grpc.ChannelCredentials | None:
    """Channel credentials, or None for plain text. A token travels as call
    credentials, which gRPC sends only over a protected connection: TLS, or a
    loopback one (local credentials); a token for a plain-text remote broker is
    refused here rather than sent in the clear."""
    if security.tls:
        creds = security.credentials()
    elif security.token:
        if not is_loopback(address):
            raise ValueError(f"a token is sent only over TLS (set STREAMD_TLS_CA) or to a loopback broker, "
                             f"not in plain text to {address}")
        creds = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None
    if security.token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(security.token))
    return creds


def sync_channel(server: str | None = None, *, security: Security | None = None) -> grpc.Channel:
    security = security or Security.from_env()
    address = server_address(server)
    creds = _credentials(security, address)
    if creds is None:
        return grpc.insecure_channel(address, options=security.options())
    return grpc.secure_channel(address, creds, options=security.options())


def aio_channel(server: str | None = None, *, security: Security | None = None,
                extra_options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
    security = security or Security.from_env()
    address = server_address(server)
    creds = _credentials(security, address)
    options = security.options(extra_options)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds, options=options)


class SyncClient:
    """A blocking client over its own channel (or one it is given)."""

    def __init__(self, server: str | None = None, *, channel: grpc.Channel | None = None,
                 security: Security | None = None) -> None:
        """``security``: TLS files and token (default: from ``STREAMD_TLS_*``/``STREAMD_TOKEN``)."""
        from streamd._malloc import tune_malloc
        from streamd.v1 import streamd_pb2_grpc as rpc

        tune_malloc()
        self._own_channel = channel is None
        self._channel = channel or sync_channel(server, security=security)
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
