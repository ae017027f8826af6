"""One libvirt connection shared by every QEMU instance of a launcher, and libvirt's events handed to Trio.

Concurrency (docs/concurrency.md §3): libvirt's blocking API runs in Trio worker threads (`Hypervisor.call`) under a
CapacityLimiter of the hypervisor's own, never the launcher's shared one. Every call is bounded: a call that
does not return within its bound (the caller's deadline, e.g. the actor's phase timeout, or the hypervisor's
`call_timeout_s`, whichever comes first) fails with `Unresponsive` (or the caller's Cancelled), and its thread
is abandoned: a libvirt call cannot be interrupted, so the thread keeps its limiter token until libvirt
answers (libvirt's keepalive ends calls on a dead daemon; a live daemon that never answers, e.g. one stuck
re-probing QEMU, keeps them). Abandoned threads can therefore use up the hypervisor's threads, which makes
later libvirt calls time out too, but they never hold a token that file I/O, the API or the persister need.

libvirt's own event loop (keepalives, lifecycle events, the close callback) runs in the one bare thread the
launcher has, started and joined by `open_hypervisor`. Its callbacks never touch Trio state directly: they
hand the event over with `TrioToken.run_sync_soon`, which does not block the libvirt thread.

Watching a domain: `watch(name)` gives a `DomainWatch` whose `wait(timeout)` returns when a lifecycle event
for that domain arrived (or the connection came back) or after `timeout`. Callers always re-read the state
after a wake-up, so a lost or coalesced event costs at most one `timeout`, never a wrong answer.

Connection loss (libvirtd restarted or killed) is decided by the connection, never by an error code: after a
failed call the connection is asked `isAlive()` (a local check, no round trip), and only a dead connection is
dropped. An error of one domain (QEMU cannot open a disk: VIR_ERR_SYSTEM_ERROR) leaves the connection alone.
Once it is lost, every call fails with `Disconnected`, and a reconnect task retries with backoff. Watches are
woken once the connection is back, so monitors re-read their domain's state; a VM keeps running while libvirtd
is away, and no monitor takes "no answer" (`Disconnected` or `Unresponsive`) for "down".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import attrs
import libvirt
import trio

from launcher.plugin.errors import SetupError

log = logging.getLogger(__name__)
T = TypeVar("T")

RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
KEEPALIVE_INTERVAL_S = 2  # libvirt pings the daemon this often ...
KEEPALIVE_COUNT = 3  # ... and declares it dead after this many unanswered pings
EVENT_THREAD_JOIN_S = 5.0
CLOSE_TIMEOUT_S = 5.0  # closing the connection at shutdown


class Unavailable(Exception):
    """libvirt did not answer this call: see `Disconnected` and `Unresponsive`."""


class Disconnected(Unavailable):
    """libvirt is not reachable right now; the reconnect task is on it."""


class Unresponsive(Unavailable):
    """The call did not return within its bound; its thread was abandoned (module doc)."""


class Unreachable(SetupError):
    """The first connection failed: `launcher serve` reports it as a set-up problem and exits."""


def error_text(exc: BaseException) -> str:
    """What went wrong, for a message: libvirt's own text for a libvirtError (without the Python wrapper's
    decoration), ``str(exc)`` for anything else (an `Unavailable` says it in our words)."""
    if isinstance(exc, libvirt.libvirtError):
        return exc.get_error_message() or str(exc)
    return str(exc)


def or_none(lookup: Callable[[], T], missing: int) -> T | None:
    """`lookup()`, or None where libvirt answers that what it looks up does not exist (error code `missing`, e.g.
    VIR_ERR_NO_DOMAIN); any other libvirtError passes. Blocking, like the lookup."""
    try:
        return lookup()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == missing:
            return None
        raise


@attrs.define(eq=False)
class DomainWatch:
    """Wake-ups for one domain's lifecycle events (see the module doc)."""

    name: str
    _event: trio.Event = attrs.field(factory=trio.Event, init=False)

    def _wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._event.wait()
        self._event = trio.Event()


@attrs.define(eq=False)
class Hypervisor:
    """The shared connection. Create it with `open_hypervisor`."""

    uri: str
    _limiter: trio.CapacityLimiter  # the hypervisor's own threads (module doc)
    _call_timeout_s: float
    _token: trio.lowlevel.TrioToken
    _conn: libvirt.virConnect | None = attrs.field(default=None, init=False)
    _lost: trio.Event = attrs.field(factory=trio.Event, init=False)
    _back: trio.Event = attrs.field(factory=trio.Event, init=False)
    _watches: dict[str, set[DomainWatch]] = attrs.field(factory=dict, init=False)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def call(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        """fn(connection) in a worker thread, bounded by `call_timeout_s` (and by the caller's deadline).

        Disconnected if libvirt is unreachable or the connection died during the call; Unresponsive if it
        did not return in time; any other libvirtError (this call failed, the connection is fine) propagates."""
        conn = self._conn
        if conn is None:
            raise Disconnected(f"not connected to libvirt at {self.uri}")
        failure: libvirt.libvirtError
        with trio.move_on_after(self._call_timeout_s):
            try:
                return await self._in_thread(fn, conn)
            except libvirt.libvirtError as exc:
                failure = exc
            if await self._in_thread(_is_alive, conn):
                raise failure
            self._mark_lost(conn, error_text(failure))
            raise Disconnected(f"lost the connection to libvirt at {self.uri}: {error_text(failure)}") from failure
        raise Unresponsive(f"libvirt at {self.uri} did not answer within {self._call_timeout_s:g} s")

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on one of the hypervisor's threads, abandoned if cancelled (module doc)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)

    async def wait_connected(self) -> None:
        """Return once the connection is up (at once if it is). Cancel it to give up."""
        while self._conn is None:
            await self._back.wait()

    @contextmanager
    def watch(self, name: str) -> Iterator[DomainWatch]:
        watch = DomainWatch(name)
        self._watches.setdefault(name, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._watches[name]
            watchers.discard(watch)
            if not watchers:
                del self._watches[name]

    # -- connection management ---------------------------------------------------------------------------

    def _connect(self) -> libvirt.virConnect:
        """Open and set up a connection (worker thread)."""
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            conn.registerCloseCallback(self._closed_callback, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle_callback, None)
        except libvirt.libvirtError:
            conn.close()
            raise
        return conn

    async def _open(self) -> libvirt.virConnect | None:
        """A new, set-up connection; None if it did not open within `call_timeout_s` (libvirtError passes)."""
        with trio.move_on_after(self._call_timeout_s):
            return await self._in_thread(self._connect)
        return None

    async def connect(self) -> None:
        """First connection; Unreachable with libvirt's reason if it fails."""
        hint = "is libvirtd running? `bash .ci/libvirt-up` starts it"
        try:
            conn = await self._open()
        except libvirt.libvirtError as exc:
            raise Unreachable(f"cannot connect to libvirt at {self.uri}: {error_text(exc)} ({hint})") from exc
        if conn is None:
            raise Unreachable(f"libvirt at {self.uri} did not answer within {self._call_timeout_s:g} s ({hint})")
        self._up(conn)

    def _up(self, conn: libvirt.virConnect) -> None:
        self._conn = conn
        self._lost = trio.Event()
        self._back.set()
        self._back = trio.Event()
        for watchers in self._watches.values():
            for watch in watchers:
                watch._wake()

    def _mark_lost(self, conn: libvirt.virConnect, why: str) -> None:
        if self._conn is conn:
            log.warning("lost the connection to libvirt at %s: %s; reconnecting", self.uri, why)
            self._conn = None
            self._lost.set()

    async def reconnect_forever(self) -> None:
        """Re-open the connection whenever it is lost, with a growing backoff."""
        while True:
            await self._lost.wait()
            delay = RECONNECT_MIN_S
            while self._conn is None:
                await trio.sleep(delay)
                try:
                    conn = await self._open()
                except libvirt.libvirtError as exc:
                    log.debug("reconnecting to %s: %s", self.uri, error_text(exc))
                    conn = None
                if conn is None:
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    continue
                log.warning("reconnected to libvirt at %s", self.uri)
                self._up(conn)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._in_thread(_close_quietly, conn)

    # -- libvirt callbacks: these run in the event-loop thread ------------------------------------------------

    def _closed_callback(self, conn: libvirt.virConnect, reason: int, opaque: object) -> None:
        self._to_trio(self._mark_lost, conn, f"connection closed (reason {reason})")

    def _lifecycle_callback(self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int,
                            opaque: object) -> None:
        self._to_trio(self._deliver, dom.name())

    def _to_trio(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass  # the launcher is exiting; nobody is listening any more

    def _deliver(self, name: str) -> None:
        """Which event it was does not matter: a woken watcher re-reads the domain's state."""
        for watch in self._watches.get(name, ()):
            watch._wake()


def _is_alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _close_quietly(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


# -- libvirt's event loop thread ---------------------------------------------------------------------------

_default_impl_registered = False


def _register_default_impl() -> None:
    """libvirt needs its event implementation registered once per process, before any connection."""
    global _default_impl_registered
    if not _default_impl_registered:
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; the launcher reports them itself.
        libvirt.registerErrorHandler(lambda ctx, err: None, None)
        _default_impl_registered = True


class _EventLoopThread:
    """Runs virEventRunDefaultImpl until stopped. The launcher's only bare thread (docs/concurrency.md §3)."""

    def __init__(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            libvirt.virEventRunDefaultImpl()

    async def stop(self) -> None:
        self._stopping = True
        # A zero timeout wakes the loop's poll() so it sees the flag; it removes itself when it fires.
        libvirt.virEventAddTimeout(0, lambda timer, opaque: libvirt.virEventRemoveTimeout(timer), None)
        await trio.to_thread.run_sync(self._thread.join, EVENT_THREAD_JOIN_S)


@asynccontextmanager
async def open_hypervisor(uri: str, *, threads: int, call_timeout_s: float) -> AsyncIterator[Hypervisor]:
    """Connect to libvirt at `uri` and keep the connection up until the block ends.

    `threads` bounds the worker threads in libvirt calls at once, `call_timeout_s` each call (module doc).
    Raises Unreachable if the first connection fails."""
    _register_default_impl()
    events = _EventLoopThread()
    events.start()
    try:
        hypervisor = Hypervisor(uri, trio.CapacityLimiter(threads), call_timeout_s, trio.lowlevel.current_trio_token())
        await hypervisor.connect()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hypervisor.reconnect_forever)
                yield hypervisor
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await hypervisor.close()
    finally:
        with trio.CancelScope(shield=True):
            await events.stop()
