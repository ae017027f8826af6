"""What a virtualizer with a volume store does with a START's `storage` entries (part of the plugin API,
`launcher.plugin`), so that every virtualizer gives them one meaning:

- an entry names a volume by id; the VM gets it as a data disk, in the entries' order;
- ``local: true``: the launcher makes the volume at START (blank qcow2 of ``size`` GiB) unless it exists (a START
  carried on after a crash finds it made);
- ``ephemeral: true``: the volume is deleted with the instance (DELETE), whoever made it;
- ``boot`` and ``swap`` entries are refused (`storage_problem`) until they are supported.

The functions raise LauncherError as the store does; the virtualizer reports it with its phase's code.
"""

from __future__ import annotations

from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.protocol import VolumeCatalog
from launcher.plugin.spec import InstanceSpec, StorageEntry

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


def existing_entries(spec: InstanceSpec) -> list[tuple[int, StorageEntry]]:
    """(index, entry) of the volumes that must exist before the instance's disks are made (not `local`)."""
    return [(index, entry) for index, entry in enumerate(spec.storage) if not entry.local]


async def make_local_volumes(store: VolumeCatalog, spec: InstanceSpec) -> list[str]:
    """Create the START's `local` volumes that do not exist yet; the ids made."""
    made = []
    for entry in spec.storage:
        if not entry.local:
            continue
        try:
            await store.get(entry.id)
        except LauncherError as exc:
            if exc.code != errors.NOT_FOUND:
                raise
            await store.create(entry.id, entry.size * GIB_MB, "qcow2")
            made.append(entry.id)
    return made


async def remove_ephemeral_volumes(store: VolumeCatalog, spec: InstanceSpec) -> list[str]:
    """Delete the START's `ephemeral` volumes (those already gone are skipped); the ids deleted."""
    removed = []
    for entry in spec.storage:
        if not entry.ephemeral:
            continue
        try:
            await store.delete(entry.id)
        except LauncherError as exc:
            if exc.code != errors.NOT_FOUND:
                raise
            continue
        removed.append(entry.id)
    return removed
