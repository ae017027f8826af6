"""The running core, without its transports: the data dir's lock, then the event journal, the per-instance
logs and the instance-file persister (so that everything after them can report), the enabled virtualizers'
backends (config `virtualizers:`, in that order) and their preflights, then the supervisor, which recovers the
instances on disk. `launcher serve` runs the transports over it (`launcher.cli.serve`); in-process tests run it
alone. Leaving it stops everything in the reverse order; VMs
keep running.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import attrs
import trio

from launcher.core.backends import load_backend
from launcher.core.config import Config
from launcher.core.metrics import Metrics
from launcher.core.supervisor import Supervisor
from launcher.durable import datadir
from launcher.durable.events import EventJournal
from launcher.durable.logs import InstanceLogs
from launcher.durable.persist import Persister
from launcher.plugin import files
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import Backend, OpenBackend, VolumeCatalog, volume_catalog


def _lend_volume_store(backends: dict[str, Backend]) -> None:
    """Hand the node's volume store (the first backend's that keeps one, as /v1/volumes serves it) to each backend
    without a store of its own that can use it (`Backend.use_volume_store`, e.g. docker's bind mounts)."""
    store = next(filter(None, map(volume_catalog, backends.values())), None)
    if store is None:
        return
    for backend in backends.values():
        use: Callable[[VolumeCatalog], None] | None = getattr(backend, "use_volume_store", None)
        if use is not None and volume_catalog(backend) is None:
            use(store)


def journal_for(config: Config, limiter: trio.CapacityLimiter) -> EventJournal:
    """The data dir's event journal, as the config sets it up (not yet running)."""
    e = config.events
    return EventJournal(config.data_dir, rotate_bytes=e.rotate_bytes, keep_files=e.keep_files,
                        memory_events=e.memory_events, memory_bytes=e.memory_bytes, limiter=limiter)


@attrs.frozen
class Core:
    """The running launcher without its transports: what `serve` and in-process tests share."""

    config: Config
    limiter: trio.CapacityLimiter
    journal: EventJournal
    logs: InstanceLogs
    supervisor: Supervisor


@asynccontextmanager
async def running_core(config: Config) -> AsyncIterator[Core]:
    """Journal, logs and persister, then the virtualizers' backends and their preflights, then the supervisor
    (which recovers the instances on disk). Leaving the block stops them in the reverse order; VMs keep running."""
    openers = {name: load_backend(name) for name in config.virtualizers}
    files.make_dirs(config.data_dir)
    lock = datadir.lock_data_dir(config.data_dir)
    try:
        async with _core_under_lock(config, openers) as core:
            yield core
    finally:
        os.close(lock)


@asynccontextmanager
async def _core_under_lock(config: Config, openers: dict[str, OpenBackend]) -> AsyncIterator[Core]:
    files.make_dirs(config.instances_dir)
    limiter = trio.CapacityLimiter(config.worker_threads)
    journal = journal_for(config, limiter)
    logs = InstanceLogs(max_bytes=config.log_max_bytes, limiter=limiter)
    persister = Persister(config.data_dir, limiter,
                          on_dropped=lambda detail: journal.emit("wal_record_dropped", detail=detail))
    async with trio.open_nursery() as infrastructure:
        await infrastructure.start(journal.run)
        await infrastructure.start(logs.run)
        await infrastructure.start(persister.run)
        metrics = Metrics()
        async with AsyncExitStack() as opened:
            backends: dict[str, Backend] = {}
            for name, opener in openers.items():
                host = BackendHost(config.data_dir, limiter, journal.emit, logs.write,
                                   observe_step=partial(metrics.virtualizer_step, name))
                backends[name] = await opened.enter_async_context(opener(config.section(name), host))
            for backend in backends.values():
                preflight: Callable[[], Awaitable[None]] | None = getattr(backend, "preflight", None)
                if preflight is not None:
                    await preflight()  # SetupError: `launcher serve` prints it and exits 2
            _lend_volume_store(backends)
            async with trio.open_nursery() as actors:
                supervisor = Supervisor(config, backends, journal, logs, persister, metrics)
                await actors.start(supervisor.run)
                yield Core(config, limiter, journal, logs, supervisor)
                actors.cancel_scope.cancel()
        infrastructure.cancel_scope.cancel()
