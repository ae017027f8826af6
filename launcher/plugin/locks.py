"""A lock per key (part of the plugin API, `launcher.plugin`): stores serialise the operations on one image or
volume id with it, so that a create, resize and delete of one id never interleave."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import attrs
import trio


@attrs.define(eq=False)
class _Entry:
    lock: trio.Lock = attrs.Factory(trio.Lock)
    users: int = 0  # tasks holding or awaiting `lock`


class KeyedLocks:
    """`async with locks.hold(key)`: one holder per key at a time. A key's lock exists only while someone holds
    or awaits it, so the table stays as small as the work in flight."""

    def __init__(self) -> None:
        """An empty table: no key is held."""
        self._entries: dict[Hashable, _Entry] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Wait until no other task holds `key`, then hold it until the context exits (also on an exception or
        cancellation). Waiters get the key in the order they asked. Not reentrant."""
        entry = self._entries.setdefault(key, _Entry())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[key]
