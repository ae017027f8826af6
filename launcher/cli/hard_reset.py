"""`launcher hard-reset`: forget every instance of a data dir, and destroy their VMs.

For when the node must start from a clean slate (ciao-launcher had the same command). With the launcher
stopped (the data dir's lock proves it), it opens each enabled virtualizer's backend in turn, lets it destroy
and undefine every VM (or container) it made for this data dir (`Backend.destroy_all`, if the backend has VMs
outside the launcher process), then removes every instance directory and the instance write-ahead log. Backing images,
the event journal (which records a `hard_reset` event), the API token and the node id stay.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from launcher.core.backends import load_backend
from launcher.core.config import Config
from launcher.core.running import journal_for
from launcher.durable import datadir
from launcher.durable.persist import WAL_FILE
from launcher.plugin import files
from launcher.plugin.host import BackendHost


async def hard_reset(config: Config) -> tuple[list[str], list[str]]:
    """Destroy our VMs and remove every instance; (names of the destroyed VMs, uuids of removed instances).

    SetupError (DataDirBusy) if a launcher is running on this data dir, or if the virtualizer cannot be opened."""
    openers = {name: load_backend(name) for name in config.virtualizers}
    config.data_dir.mkdir(parents=True, exist_ok=True)
    lock = datadir.lock_data_dir(config.data_dir)
    try:
        limiter = trio.CapacityLimiter(config.worker_threads)
        journal = journal_for(config, limiter)
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            host = BackendHost(config.data_dir, limiter, journal.emit, log=lambda instance_dir, message: None)
            destroyed: list[str] = []
            for name, opener in openers.items():  # each enabled virtualizer destroys its own, in turn
                async with opener(config.section(name), host) as backend:
                    destroy_all: Callable[[], Awaitable[list[str]]] | None = getattr(backend, "destroy_all", None)
                    destroyed += [] if destroy_all is None else await destroy_all()
            removed = await trio.to_thread.run_sync(_remove_instances, config.data_dir, limiter=limiter)
            journal.emit("hard_reset", destroyed_vms=len(destroyed), removed_instances=len(removed))
            await journal.wait_durable(journal.last_seq)
            nursery.cancel_scope.cancel()
    finally:
        os.close(lock)
    return destroyed, removed


def _remove_instances(data_dir: Path) -> list[str]:
    """Remove the instance dirs and the instance log (blocking); the uuids removed."""
    instances = data_dir / datadir.INSTANCES
    removed = sorted(p.name for p in instances.iterdir()) if instances.is_dir() else []
    # The write-ahead log goes first: replayed later, it would bring instances back.
    (data_dir / WAL_FILE).unlink(missing_ok=True)
    for name in removed:
        shutil.rmtree(instances / name)
    files.fsync_dir(data_dir)
    return removed
