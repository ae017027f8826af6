"""nats-py, which runs on asyncio, beside the launcher's Trio: an asyncio event loop in a thread of its own.

Why a thread and not trio-asyncio: nats-py is developed and tested on a stock asyncio loop, and this keeps it on
one; trio-asyncio (beta, hooked into asyncio's internals) was no faster in the spike of issue 20 (its natural
pattern, iterating a subscription, was 5× slower under load). The cost is one long-lived thread, the only thread
of the launcher that is not a worker for a blocking call (docs/concurrency.md).

The two sides meet only here, and never block each other:
- Trio → asyncio: `AsyncioThread.call` schedules a coroutine on the loop (`run_coroutine_threadsafe`) and waits on
  a `trio.Event` that the coroutine's done-callback sets through the Trio token. Cancelling the Trio caller
  cancels the coroutine; its exception is raised in the caller.
- asyncio → Trio: callbacks on the loop hand work to Trio with `TrioToken.run_sync_soon` (`to_trio`), e.g. a
  message pushed into a bounded Trio channel (`Inbox`), never waiting for room.
`open_asyncio_thread` starts the loop and, on leaving, stops it and joins the thread (bounded), so no callback
reaches Trio after the block.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Generic, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")
JOIN_TIMEOUT_S = 5.0  # how long leaving `open_asyncio_thread` waits for the loop's thread to end


class AsyncioThread:
    """An asyncio event loop running in a thread of its own (module doc)."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        """A loop not running yet; `token` is the Trio run's, for `to_trio`."""
        self.token = token
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="nats-asyncio", daemon=True)
        self._submitted: set[asyncio.Task[Any]] = set()  # `submit`'s, until they end (the loop holds tasks weakly)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """`await fn(*args, **kwargs)` on the loop, from Trio: its result, or its exception raised here.
        Cancelling the caller cancels it."""
        done = trio.Event()
        future = asyncio.run_coroutine_threadsafe(_awaited(fn, args, kwargs), self.loop)
        future.add_done_callback(lambda _: self.token.run_sync_soon(done.set))
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()

    def submit(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start `await fn(*args)` on the loop without waiting for it, from any thread; its failure is logged.
        For what its sender need not wait for (a reply, a bid: nats-py's publish only buffers the message), so
        that Trio pays no round trip through the loop's thread. The loop cancels what is left when it stops."""
        self.loop.call_soon_threadsafe(self._start, fn, args)

    def _start(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        task = self.loop.create_task(_awaited(fn, args, {}))
        self._submitted.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._submitted.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("fleet: %s", task.exception())

    def run_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the plain function `fn(*args)` on the loop soon, from any thread; never waits."""
        self.loop.call_soon_threadsafe(fn, *args)

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the loop: run the plain function `fn(*args)` in Trio's thread soon; never waits."""
        self.token.run_sync_soon(fn, *args)


async def _awaited(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    return await fn(*args, **kwargs)


@asynccontextmanager
async def open_asyncio_thread() -> AsyncIterator[AsyncioThread]:
    """A running `AsyncioThread` for the block; on leaving, its loop is stopped (its tasks cancelled) and its
    thread joined, within JOIN_TIMEOUT_S."""
    bridge = AsyncioThread(trio.lowlevel.current_trio_token())
    bridge.thread.start()
    try:
        yield bridge
    finally:
        bridge.loop.call_soon_threadsafe(bridge.loop.stop)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(bridge.thread.join, JOIN_TIMEOUT_S)
        if bridge.thread.is_alive():
            log.warning("the NATS client's asyncio thread did not end within %g s", JOIN_TIMEOUT_S)


class Inbox(Generic[T]):
    """Items that asyncio callbacks hand to Trio: a bounded Trio channel, filled with `put` from the loop's
    thread; an item that finds it full is dropped and counted (`dropped`), never waited for (a NATS request
    then times out at its sender)."""

    def __init__(self, bridge: AsyncioThread, size: int) -> None:
        """An empty inbox of `size` items; Trio reads it with `receive`."""
        self._bridge = bridge
        self._send, self.receive = trio.open_memory_channel[T](size)
        self.dropped = 0

    def put(self, item: T) -> None:
        """From the loop's thread: hand `item` to Trio."""
        self._bridge.to_trio(self._push, item)

    def _push(self, item: T) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1
        except trio.ClosedResourceError:
            pass  # Trio's side is gone: the fleet is shutting down


class Link:
    """The connection to NATS dropping and coming back, as nats-py's callbacks tell (through `to_trio`): a request
    in flight when it drops gets no answer (nats-py would let it wait for its timeout), and work paused after a
    failure may resume as soon as it is back. Used from Trio's thread only."""

    def __init__(self) -> None:
        self._back = trio.Event()  # set when the connection comes back, then replaced by a new one
        self._scopes: set[trio.CancelScope] = set()

    def dropped(self) -> None:
        """The connection dropped: cancel every `cancelled_on_drop` block."""
        for scope in self._scopes:
            scope.cancel()

    def came_back(self) -> None:
        """The connection is back: wake every `wait_back`."""
        self._back.set()
        self._back = trio.Event()

    async def wait_back(self) -> None:
        """Until the connection next comes back."""
        await self._back.wait()

    @contextmanager
    def cancelled_on_drop(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that the connection dropping cancels (see its `cancelled_caught` after the block)."""
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)
