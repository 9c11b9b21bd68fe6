"""One JoinGroup stream of a group member (asyncio): what the member sends and how
what the broker says reaches the consumer.

Sent: the join, then a heartbeat every ``heartbeat_s`` carrying the generation the
member applied last (``ack``: acknowledging a generation is what lets the broker hand
revoked partitions on), and at the end an optional leave. The broker's first answer
names the heartbeat interval it wants; the sender switches to it at once.

Received: each ``Assignment``, and finally one ``StreamEnded`` (with the error, if the
stream failed), are put on the consumer's ``events`` queue and ``wake`` is set; nothing
else of the consumer is touched here, so the consumer applies assignments when it
chooses (between fetches), never while it hands records out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from streamd.v1 import streamd_pb2 as pb

from .errors import StreamdError


class StreamEnded:
    """The membership stream ended; ``error`` None when it ended cleanly."""

    __slots__ = ("error",)

    def __init__(self, error: StreamdError | None) -> None:
        self.error = error


Event = pb.Assignment | StreamEnded


class Membership:
    def __init__(self, stub: Any, join: pb.MemberJoin, events: asyncio.Queue[Event], wake: asyncio.Event, *,
                 heartbeat_s: float) -> None:
        self.events, self.wake = events, wake
        self.outbox: asyncio.Queue[pb.JoinGroupRequest | None] = asyncio.Queue()
        self.heartbeat_s = heartbeat_s
        self.applied_generation = 0
        self.outbox.put_nowait(pb.JoinGroupRequest(join=join))
        self.call = stub.JoinGroup(self._requests())
        self.task = asyncio.get_running_loop().create_task(self._receive(), name="streamd-group")

    async def _requests(self) -> AsyncIterator[pb.JoinGroupRequest]:
        # One get() outlives the heartbeat waits: cancelling it at a timeout could
        # drop a request put at the same moment.
        getter: asyncio.Future[pb.JoinGroupRequest | None] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(self.outbox.get())
                done, _ = await asyncio.wait({getter}, timeout=self.heartbeat_s)
                if getter in done:
                    item, getter = getter.result(), None
                else:
                    item = self.heartbeat()
                if item is None:
                    return
                yield item
        finally:
            if getter is not None:
                getter.cancel()

    def heartbeat(self) -> pb.JoinGroupRequest:
        return pb.JoinGroupRequest(heartbeat=pb.Heartbeat(generation=self.applied_generation))

    async def _receive(self) -> None:
        error = None
        try:
            async for message in self.call:
                interval = message.assignment.heartbeat_interval_ms / 1000
                if interval and interval != self.heartbeat_s:
                    self.heartbeat_s = interval
                    self.outbox.put_nowait(self.heartbeat())  # wakes the sender to use it
                self.events.put_nowait(message.assignment)
                self.wake.set()
        except grpc.RpcError as err:
            error = StreamdError.from_rpc_error(err)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # The call was cancelled (``end`` gave up waiting), not this task.
            error = StreamdError("CANCELLED", "", "the membership stream was cancelled")
        self.events.put_nowait(StreamEnded(error))
        self.wake.set()

    def ack(self, generation: int) -> None:
        self.applied_generation = generation
        self.outbox.put_nowait(self.heartbeat())

    async def end(self, *, leave: bool, timeout_s: float = 5.0) -> None:
        """Leave (if ``leave``) and end the stream: the broker ends its side at once
        when it answers; after ``timeout_s`` without that the call is cancelled."""
        if leave:
            self.outbox.put_nowait(pb.JoinGroupRequest(leave=pb.LeaveGroup()))
        self.outbox.put_nowait(None)
        await asyncio.wait({self.task}, timeout=timeout_s)
        if not self.task.done():
            self.call.cancel()
            await asyncio.wait({self.task}, timeout=timeout_s)
        if not self.task.done():
            self.task.cancel()
