"""Channels to a broker, with the limits streamd's messages need, and the shared
behaviour of the blocking clients.

**TLS and tokens** come from the environment, so every client and the CLI get them
the same way: ``STREAMD_TLS_CA`` (PEM file of the CA that signed the broker's
certificate; setting any ``STREAMD_TLS_*`` turns TLS on, with the system's roots when
no CA is given), ``STREAMD_TLS_CERT`` and ``STREAMD_TLS_KEY`` (a client certificate
for mutual TLS), ``STREAMD_TOKEN`` (sent as ``authorization: Bearer <token>``), and
``STREAMD_TLS_SERVER_NAME`` (the name to check the broker's certificate against,
when the address is not it).

**Deadlines** (``Calls``, the one place that sets them): every unary call a client
makes gets one, ``timeout_s`` seconds (default ``DEFAULT_TIMEOUT_S``, 30 s; a
client's ``timeout_s=`` sets its default, a call's ``timeout_s=`` overrides it), plus
the time the call asks the broker to wait (a long-poll Fetch's or Receive's
``max_wait_ms``). A call without an answer in time fails with a ``StreamdError``
``DEADLINE_EXCEEDED`` / ``TIMED_OUT`` whose message names the method, the server and
the deadline. Streams (Subscribe, JoinGroup, ProduceStream) have no overall
deadline: they live as long as the reader wants; the producer bounds each request
on its stream by ``request_timeout_ms`` (``_sender``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
import grpc.aio

from streamd.addresses import is_loopback

if TYPE_CHECKING:
    from .errors import StreamdError

S = TypeVar("S")

DEFAULT_SERVER = "127.0.0.1:50051"
#: Seconds a unary call may take beyond what it asks the broker to wait.
DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
OPTIONS: list[tuple[str, object]] = [
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
    def from_env(cls, env: Mapping[str, str] | None = None) -> Security:
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

    def options(self, extra: Sequence[tuple[str, object]] | None = None) -> list[tuple[str, object]]:
        name: list[tuple[str, object]] = (
            [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else [])
        return [*OPTIONS, *(extra or []), *name]


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
                extra_options: Sequence[tuple[str, object]] | None = None) -> grpc.aio.Channel:
    security = security or Security.from_env()
    address = server_address(server)
    creds = _credentials(security, address)
    options = security.options(extra_options)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds, options=options)


def check_timeout(timeout_s: float, what: str = "timeout_s") -> float:
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"{what} must be a positive number of seconds, not {timeout_s!r}")
    return float(timeout_s)


def stub(cls: type[S], channel: grpc.Channel | grpc.aio.Channel) -> S:
    """A generated service stub on ``channel`` (``streamd_pb2_grpc`` has no type
    stubs: its methods are ``Any``, so callers annotate the replies they read)."""
    return cls(channel)  # type: ignore[call-arg]


def _method_name(method: object) -> str:
    """``ListTopics`` for the stub method of ``/streamd.v1.TopicService/ListTopics``."""
    raw = getattr(method, "_method", b"")
    name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")
    return name.rsplit("/", 1)[-1]


class Calls:
    """The deadline of a client's unary calls and what a missed one raises (see the
    module docstring). ``server`` names the broker in error messages."""

    __slots__ = ("server", "timeout_s")

    def __init__(self, server: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.server = server
        self.timeout_s = check_timeout(timeout_s)

    def deadline(self, timeout_s: float | None = None, wait_s: float = 0.0) -> float:
        """Seconds for one call: ``timeout_s`` (else the default) plus ``wait_s``, the
        time the call itself asks the broker to wait."""
        base = self.timeout_s if timeout_s is None else check_timeout(timeout_s)
        return base + max(wait_s, 0.0)

    def error(self, err: grpc.RpcError, deadline: float | None, method: object = None) -> StreamdError:
        """The StreamdError for a failed call; a missed deadline says so in one line."""
        from .errors import StreamdError

        code = err.code() if hasattr(err, "code") else None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
            name = _method_name(method)
            return StreamdError("DEADLINE_EXCEEDED", "TIMED_OUT",
                                f"no answer{' to ' + name if name else ''} from {self.server} within {deadline:g} s")
        return StreamdError.from_rpc_error(err)

    def call(self, method: Any, request: Any, *, timeout_s: float | None = None, wait_s: float = 0.0,
             **kwargs: Any) -> Any:
        """A blocking unary call with a deadline; StreamdError on failure."""
        deadline = self.deadline(timeout_s, wait_s)
        try:
            return method(request, timeout=deadline, **kwargs)
        except grpc.RpcError as err:
            raise self.error(err, deadline, method) from None

    def future(self, method: Any, request: Any, *, timeout_s: float | None = None,
               wait_s: float = 0.0) -> grpc.Future[Any]:
        """A blocking stub's call as a future, with its deadline (``result`` raises
        grpc.RpcError: pass it to ``error``)."""
        future: grpc.Future[Any] = method.future(request, timeout=self.deadline(timeout_s, wait_s))
        return future

    async def acall(self, method: Any, request: Any, *, timeout_s: float | None = None, wait_s: float = 0.0,
                    **kwargs: Any) -> Any:
        """An asyncio unary call with a deadline; StreamdError on failure."""
        deadline = self.deadline(timeout_s, wait_s)
        try:
            return await method(request, timeout=deadline, **kwargs)
        except grpc.RpcError as err:
            raise self.error(err, deadline, method) from None


def server_label(server: str | None, channel: object) -> str:
    """How error messages name the broker: its address (or, for a channel given by
    the caller, whatever address was passed along with it)."""
    if channel is None:
        return server_address(server)
    return server or "the broker"


class AsyncClient:
    """An asyncio client over its own ``grpc.aio`` channel (or one it is given): the
    per-call deadlines (``Calls``), ``async with``, ``timeout_s`` and ``close()``
    closing the channel it made. The asyncio clients build on it; one with more to
    end in ``close()`` ends that, then awaits ``_close_channel()``."""

    def __init__(self, server: str | None, *, channel: grpc.aio.Channel | None, security: Security | None,
                 timeout_s: float, extra_options: Sequence[tuple[str, object]] | None = None) -> None:
        from streamd._malloc import tune_malloc

        tune_malloc()
        self._calls = Calls(server_label(server, channel), timeout_s)
        self._own_channel = channel is None
        self._channel = channel or aio_channel(server, security=security, extra_options=extra_options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._close_channel()

    async def _close_channel(self) -> None:
        if self._own_channel:
            await self._channel.close()

    @property
    def timeout_s(self) -> float:
        """The default deadline of this client's calls, in seconds."""
        return self._calls.timeout_s


class SyncClient:
    """A blocking client over its own channel (or one it is given)."""

    def __init__(self, server: str | None = None, *, channel: grpc.Channel | None = None,
                 security: Security | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """``security``: TLS files and token (default: from ``STREAMD_TLS_*``/``STREAMD_TOKEN``).
        ``timeout_s``: the default deadline of each call (see the module docstring)."""
        from streamd._malloc import tune_malloc
        from streamd.v1 import streamd_pb2_grpc as rpc

        tune_malloc()
        self._calls = Calls(server_label(server, channel), timeout_s)
        self._own_channel = channel is None
        self._channel = channel or sync_channel(server, security=security)
        self._topics = stub(rpc.TopicServiceStub, self._channel)
        self._log = stub(rpc.LogServiceStub, self._channel)
        self._groups = stub(rpc.GroupServiceStub, self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    @property
    def timeout_s(self) -> float:
        """The default deadline of this client's calls, in seconds."""
        return self._calls.timeout_s

    def _call(self, method: Any, request: Any, *, timeout_s: float | None = None, wait_s: float = 0.0) -> Any:
        return self._calls.call(method, request, timeout_s=timeout_s, wait_s=wait_s)
