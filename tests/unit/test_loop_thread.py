"""``LoopThread``, the event-loop thread every blocking client runs its asyncio engine
on: results and errors come back to the caller, work handed to the caller
(``on_caller``) runs on the caller's thread and may use the client again, and a
closed (or self-calling) loop refuses work instead of hanging."""

from __future__ import annotations

import asyncio
import threading

import pytest

from streamd.client._loop import LoopThread, caller_waiting, on_caller


@pytest.fixture
def loop_thread():
    lt = LoopThread("test-loop")
    try:
        yield lt
    finally:
        lt.close()


def test_run_returns_the_result_and_raises_the_error(loop_thread):
    async def ok() -> int:
        await asyncio.sleep(0)
        return 7

    async def fails() -> None:
        raise KeyError("x")

    assert loop_thread.run(ok()) == 7
    with pytest.raises(KeyError):
        loop_thread.run(fails())


def test_work_handed_to_the_caller_runs_on_its_thread_and_may_call_the_loop_again(loop_thread):
    caller = threading.get_ident()
    seen = []

    async def inner() -> str:
        return "inner"

    def on_my_thread() -> str:
        seen.append(threading.get_ident())
        return loop_thread.run(inner())  # nested: the outer operation waits meanwhile

    async def operation() -> str:
        assert caller_waiting()
        return await on_caller(on_my_thread)

    assert loop_thread.run(operation()) == "inner"
    assert seen == [caller]


def test_an_error_raised_on_the_caller_reaches_the_operation(loop_thread):
    def boom() -> None:
        raise ValueError("on the caller")

    async def operation() -> str:
        try:
            await on_caller(boom)
        except ValueError as err:
            return str(err)
        return "no error"

    assert loop_thread.run(operation()) == "on the caller"


def test_without_a_waiting_caller_the_work_runs_on_the_loop(loop_thread):
    threads = []

    async def operation() -> None:
        assert not caller_waiting()
        await on_caller(lambda: threads.append(threading.get_ident()))

    loop_thread.submit(operation()).result(10)
    assert threads and threads[0] != threading.get_ident()


def test_a_closed_loop_and_the_loop_itself_are_refused(loop_thread):
    async def from_the_loop() -> None:
        with pytest.raises(RuntimeError, match="its own event-loop thread"):
            loop_thread.run(asyncio.sleep(0))

    loop_thread.submit(from_the_loop()).result(10)

    async def forever() -> None:
        await asyncio.Event().wait()

    loop_thread.submit(forever())  # cancelled by close()
    loop_thread.close()
    assert loop_thread.closed
    with pytest.raises(RuntimeError, match="closed"):
        loop_thread.run(asyncio.sleep(0))


def test_an_interrupt_on_the_caller_cancels_the_operation_and_waits_for_it(loop_thread):
    """A KeyboardInterrupt raised on the caller's thread (by work handed to it, or
    by Ctrl-C) reaches the caller, not the loop (asyncio would stop the loop thread
    with it, and the caller would wait for ever); the operation is cancelled, and
    ``run`` returns only once its clean-up ran, so the client can be called again."""
    cleaned: list[str] = []
    raised: list[BaseException] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    async def operation() -> None:
        try:
            await on_caller(interrupt)
        finally:
            await asyncio.sleep(0.2)  # a clean-up that takes a while
            cleaned.append("done")

    def caller() -> None:
        try:
            loop_thread.run(operation())
        except BaseException as exc:  # noqa: BLE001 - looked at below
            raised.append(exc)

    thread = threading.Thread(target=caller, daemon=True)  # bounded: a hang fails the join
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "run() still waiting"
    assert [type(e) for e in raised] == [KeyboardInterrupt]
    assert cleaned == ["done"]
    assert not loop_thread.closed

    async def again() -> str:
        return "ok"

    assert loop_thread.run(again()) == "ok"
