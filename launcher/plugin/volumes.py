"""What a virtualizer with a volume store does with a START's `storage` entries (part of the plugin API,
`launcher.plugin`), so that every virtualizer gives them one meaning:

- an entry names a volume by id; the VM gets it as a data disk, in the entries' order;
- ``local: true``: the launcher makes the volume at START (blank qcow2 of ``size`` GiB) unless it exists (a START
  carried on after a crash finds it made);
- ``ephemeral: true``: the volume is deleted with the instance (DELETE), whoever made it, unless it was detached
  before (DETACH);
- ``boot`` and ``swap`` entries are refused (`storage_problem`) until they are supported.

The functions raise LauncherError as the store does; the virtualizer reports it with its phase's code.
"""

from __future__ import annotations

from collections.abc import Sequence

from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.protocol import VolumeCatalog
from launcher.plugin.spec import InstanceSpec

GIB_MB = 1024


def storage_problem(spec: InstanceSpec) -> str | None:
    """Why the START's storage entries cannot be honoured yet, or None: boot and swap entries are refused
    rather than ignored."""
    for index, entry in enumerate(spec.storage):
        kinds = [kind for kind in ("boot", "swap") if getattr(entry, kind)]
        if kinds:
            return (f"storage[{index}] ({entry.id}): {'/'.join(kinds)} volumes are not supported yet; existing, "
                    "local and ephemeral volumes are")
    return None


async def check_storage(store: VolumeCatalog | None, spec: InstanceSpec) -> None:
    """LauncherError if the START's storage cannot be honoured: `storage_problem`, no volume store, or a volume
    that must exist already (every entry but the `local` ones, which `make_local_volumes` makes) and does not.
    The reason names the entry; the virtualizer reports it with its phase's code, before anything is made."""
    problem = storage_problem(spec)
    if problem is not None:
        raise LauncherError(errors.NOT_SUPPORTED, problem)
    if not spec.storage:
        return
    if store is None:
        raise LauncherError(errors.NOT_SUPPORTED, "the virtualizer's volume store is not open")
    for index, entry in enumerate(spec.storage):
        if entry.local:
            continue
        try:
            await store.get(entry.id)
        except LauncherError as exc:
            raise LauncherError(exc.code, f"storage[{index}]: volume {entry.id}: {exc.reason}") from exc


async def make_local_volumes(store: VolumeCatalog, spec: InstanceSpec) -> list[str]:
    """Create the START's `local` volumes; one that exists already (a START carried on after a crash made it)
    is kept. The ids made."""
    made = []
    for entry in spec.storage:
        if not entry.local:
            continue
        try:
            await store.create(entry.id, entry.size * GIB_MB, "qcow2")
        except LauncherError as exc:
            if exc.code != errors.VOLUME_EXISTS:
                raise
            continue
        made.append(entry.id)
    return made


async def remove_ephemeral_volumes(store: VolumeCatalog, spec: InstanceSpec, volumes: Sequence[str]) -> list[str]:
    """Delete the START's `ephemeral` volumes that are still among the instance's `volumes` (one detached since is
    no longer the instance's: it stays); those already gone are skipped. The ids deleted."""
    removed = []
    for entry in spec.storage:
        if not entry.ephemeral or entry.id not in volumes:
            continue
        try:
            await store.delete(entry.id)
        except LauncherError as exc:
            if exc.code != errors.NOT_FOUND:
                raise
            continue
        removed.append(entry.id)
    return removed
