"""Registering servicers with grpc.aio, with our own (de)serialization.

grpcio's generated ``add_*_to_server`` helpers decode requests before our code runs
(a malformed request then gets UNKNOWN or INTERNAL from grpcio) and always encode
responses with protobuf. We register each method ourselves instead:

- requests arrive as bytes and are parsed here; a DecodeError becomes
  INVALID_ARGUMENT / MALFORMED_REQUEST;
- a method may parse its request as a server-side view (``streamd.wire``) that keeps
  record batches as bytes;
- a handler may return ``bytes`` that already are the serialized response (Fetch and
  Subscribe return stored frames without re-encoding them);
- every exception goes through ``streamd.service.errors``, the one status table;
- an ``Admission`` admits every RPC while the broker serves and none once it stops
  (UNAVAILABLE / ``BROKER_UNAVAILABLE``), and counts those in flight so a graceful
  stop can wait for them. Health checks and reflection are not ours and stay open.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from streamd.broker.errors import BrokerUnavailable

from .errors import MalformedRequest, rich_status


class Admission:
    """The gate every streamd RPC passes: open while serving, shut once stopping.

    Not thread-safe: used on the server's event loop only.
    """

    def __init__(self) -> None:
        self.accepting = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if not self.accepting:
            raise BrokerUnavailable("stopping")
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def close(self) -> None:
        """Refuse every RPC from now on; those in flight go on."""
        self.accepting = False

    async def idle(self) -> None:
        """Return once no RPC is in flight."""
        await self._idle.wait()


OPEN = Admission()  # for servicers registered without a gate of their own


def _serialize(response: Message | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _parser(message_cls: type[Message]) -> Callable[[bytes], Message]:
    def parse(raw: bytes) -> Message:
        try:
            return message_cls.FromString(raw)
        except DecodeError:
            raise MalformedRequest(message_cls.DESCRIPTOR.full_name) from None

    return parse


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    await context.abort_with_status(rich_status(exc))


def _unary(impl, parse, gate: Admission, name: str, guard):
    async def handler(raw: bytes, context: grpc.aio.ServicerContext):
        entered = False
        try:
            gate.enter()
            entered = True
            request = parse(raw)
            if guard is None:
                return await impl(request, context)
            principal = guard.principal(context)
            guard.check(principal, name, request, len(raw))
            response = await impl(request, context)
            guard.filter(principal, name, response)
            return response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the one place errors become statuses
            await _abort(context, exc)
        finally:
            if entered:
                gate.leave()

    return handler


def _server_stream(impl, parse, gate: Admission, name: str, guard):
    async def handler(raw: bytes, context: grpc.aio.ServicerContext):
        entered = False
        try:
            gate.enter()
            entered = True
            request = parse(raw)
            if guard is not None:
                guard.check(guard.principal(context), name, request)
            async for response in impl(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        finally:
            if entered:
                gate.leave()

    return handler


def _bidi_stream_writer(impl, parse, gate: Admission, name: str, guard):
    """For a coroutine ``impl(read, context)`` that answers with ``context.write``;
    ``read()`` returns the next parsed request, or None at the end of the stream."""

    async def handler(request_iterator, context: grpc.aio.ServicerContext):
        principal = None

        async def read():
            raw = await context.read()
            if raw is grpc.aio.EOF:
                return None
            message = parse(raw)
            if guard is not None:
                await guard.admit_stream_message(principal, name, message, len(raw))
            return message

        entered = False
        try:
            gate.enter()
            entered = True
            if guard is not None:
                principal = guard.principal(context)
            await impl(read, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        finally:
            if entered:
                gate.leave()

    return handler


def generic_handler(
    service: ServiceDescriptor,
    servicer: Any,
    request_types: dict[str, type[Message]] | None = None,
    *,
    admission: Admission = OPEN,
    guard=None,
    rpc_metrics=None,
) -> grpc.GenericRpcHandler:
    """A handler for every method of ``service`` implemented by ``servicer``.

    ``request_types`` overrides the message a method's request is parsed as;
    ``admission`` is the gate each call passes; ``guard``
    (``streamd.service.guard.Guard``) authenticates and authorizes each call;
    ``rpc_metrics`` (``streamd.metrics.rpc_metrics.RpcMetrics``) counts them.
    """
    request_types = request_types or {}
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name)
        message_cls = request_types.get(method.name) or _message_class(method.input_type)
        parse = _parser(message_cls)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _bidi_stream_writer(impl, parse, admission, method.name, guard), response_serializer=_serialize
            )
        elif method.server_streaming:
            assert inspect.isasyncgenfunction(impl), method.name
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(impl, parse, admission, method.name, guard), response_serializer=_serialize
            )
        elif method.client_streaming:
            raise NotImplementedError(f"client streaming {method.full_name}")
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(impl, parse, admission, method.name, guard), response_serializer=_serialize
            )
    if rpc_metrics is not None:
        handlers = {name: rpc_metrics.wrap(f"/{service.full_name}/{name}", h) for name, h in handlers.items()}
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _message_class(descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)
