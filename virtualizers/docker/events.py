"""The engine's container events, one stream for the whole backend: `EventHub` wakes the monitors it concerns.

An event is only a wake-up: a monitor that wakes re-reads its container (inspect), which is the truth (running,
exit code, OOM-killed). So a lost event costs at most ``docker.poll_s`` (the monitors' backstop), and the stream
needs no replay: whenever it (re)connects, every watch wakes and re-reads.

The stream asks for the events of containers labelled with this data dir only. It ends silently when the engine
stops (or its connection drops): `run` then wakes every watch (their re-read finds no answer, which is not
"down") and connects again with a back-off bounded by ``docker.poll_s``. `run` is a task of the backend's nursery
(`backend.open_backend`), cancelled when the backend closes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from virtualizers.docker.engine import Engine, EngineError, NoAnswer

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.1


@attrs.define(eq=False)
class Watch:
    """One monitor's interest in one container: `wait` returns when an event for it came (or the stream
    reconnected) since the last `wait`, or after `timeout_s`."""

    _woken: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        """Note that something happened (called by the hub)."""
        self._woken.set()

    async def wait(self, timeout_s: float) -> None:
        """Wait for a wake-up noted since the previous wait (returns at once if there was one), at most
        `timeout_s` seconds."""
        with trio.move_on_after(timeout_s):
            await self._woken.wait()
        self._woken = trio.Event()


@attrs.define(eq=False)
class EventHub:
    """The event stream of our containers and the watches waiting on it (module doc)."""

    engine: Engine
    label: str  # "launcher.data-dir=<data dir>": the stream's filter
    max_retry_s: float
    _watches: dict[str, set[Watch]] = attrs.field(factory=dict)  # container name -> its watches
    connected: bool = attrs.field(default=False, init=False)  # whether the stream is open now (for tests, logs)

    @contextmanager
    def watch(self, name: str) -> Iterator[Watch]:
        """A `Watch` on container `name`, while the context is open. Made before the monitor's first read, so
        that no event between that read and its first wait is lost."""
        watch = Watch()
        self._watches.setdefault(name, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watches[name]
            watches.discard(watch)
            if not watches:
                del self._watches[name]

    def _wake(self, name: str | None = None) -> None:
        """Wake the watches of container `name`, or every watch for None."""
        if name is None:
            for watches in self._watches.values():
                for watch in watches:
                    watch.wake()
        else:
            for watch in self._watches.get(name, ()):
                watch.wake()

    async def run(self) -> None:
        """Follow the engine's events until cancelled, connecting again whenever the stream ends (module doc)."""
        retry_s = FIRST_RETRY_S
        while True:
            try:
                async with self.engine.stream("GET", "/events", params={
                        "filters": {"type": ["container"], "label": [self.label]}}) as answer:
                    self.connected = True
                    retry_s = FIRST_RETRY_S
                    self._wake()  # whatever happened while the stream was closed
                    async for event in self.engine.json_lines(answer):
                        self._wake(_container_name(event))
            except (NoAnswer, EngineError) as exc:
                log.debug("docker events: %s", exc)
            finally:
                self.connected = False
            self._wake()
            await trio.sleep(retry_s)
            retry_s = min(retry_s * 2, self.max_retry_s)


def _container_name(event: dict[str, Any]) -> str | None:
    actor = event.get("Actor")
    attributes = actor.get("Attributes") if isinstance(actor, dict) else None
    name = attributes.get("name") if isinstance(attributes, dict) else None
    return name if isinstance(name, str) else None
