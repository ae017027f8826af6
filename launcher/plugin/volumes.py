"""What a virtualizer with a volume store does with a START's `storage` entries (part of the plugin API,
`launcher.plugin`), so that every virtualizer gives them one meaning. The rules are pure functions here; the
virtualizers only carry them out.

An entry names a volume by id; the VM gets it as a virtio disk whose serial is the volume id.

- ``boot: true``: the instance boots from that (existing) volume. The START then has no ``image_uuid`` (it is
  refused `invalid_data` otherwise: one clear rule, no image disk next to a boot volume), so there is no overlay
  and no backing image; the volume is the first disk (``vda``). At most one entry boots. Without an image and
  without a boot entry the START is refused (ciao's rule). The volume outlives the instance unless ``ephemeral``.
- ``boot_index``: OpenStack's block-device boot index, as text: ``"none"`` (or empty, or a negative integer) is
  not bootable; ``0`` is the instance's first disk (its image's overlay, or the boot volume: no other entry may
  say 0); ``1``..``999`` are the other boot devices, in that order (no two entries alike). When the START has a
  boot volume or any entry with an index of 1 or more, every bootable disk gets a per-device boot order
  (libvirt's ``<boot order='N'/>``: the first disk 1, then the indexed entries 2, 3, ... by index), and the
  domain has no ``<os><boot dev=.../>`` (libvirt forbids both together). Otherwise the domain boots as before
  (``<os><boot dev='hd'/>``, the first disk).
- ``local: true``: the launcher makes the volume at START (``size`` GiB; qcow2, raw for swap) unless it exists
  (a START carried on after a crash finds it made). Its size counts against the node's disk in admission
  (`promised_disk_mb`).
- ``ephemeral: true``: the volume is deleted with the instance (DELETE), whoever made it, unless it was detached
  before (DETACH).
- ``swap: true`` (only with ``local: true``): a raw volume the virtualizer formats as Linux swap space on the
  host; its device tag is ``swap`` unless it has one of its own. Not bootable, not a boot volume.
- ``tag``: the volume's device role tag (OpenStack's device tagging: at most 60 characters, no ``/`` or ``,``).
  It reaches the guest in the cloud-init meta-data, ``devices: [{"type": "disk", "bus": "virtio",
  "serial": <volume id>, "tags": [<tag>]}]`` (`devices_metadata`), one element per tagged volume only; the
  serial stays the volume id (a guest sees its first 20 characters: ``/dev/disk/by-id/virtio-<serial>``).
- ``size``: GiB, for ``local`` entries (required there).

The disk order (`disk_plan`): the image's overlay or the boot volume first, then the other volumes in the order of
the instance's current volume ids (by default the START's storage entries; volumes attached later, which have
no entry, are plain data disks after them).

The async functions raise LauncherError as the store does; the virtualizer reports it with its phase's code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attrs

from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.protocol import VolumeCatalog
from launcher.plugin.spec import InstanceSpec, StorageEntry

GIB_MB = 1024
MAX_VOLUMES = 24  # an instance's volumes, from its START and ATTACHes (a VM's virtio disk slots vdb..vdy)
MAX_BOOT_INDEX = 999
MAX_TAG_LEN = 60  # OpenStack's limit on a device tag
SWAP_TAG = "swap"
_INTEGER_RE = re.compile(r"[+-]?[0-9]+")


@attrs.frozen
class StorageProblem:
    """Why a START's storage cannot be honoured: `field` is the key path under ``start`` (``storage[1].boot``,
    ``image_uuid``), `reason` what is wrong."""

    field: str
    reason: str


@attrs.frozen
class PlannedDisk:
    """One disk of the instance, in target order (vda, vdb, ...). `volume_id` "" is the overlay on the image;
    `boot_order` is libvirt's per-device ``<boot order>``, None for no per-device order; `tag` the device role
    tag for the meta-data ("" for none); `swap` a swap volume."""

    volume_id: str = ""
    boot_order: int | None = None
    tag: str = ""
    swap: bool = False

    @property
    def is_overlay(self) -> bool:
        """Whether this disk is the instance's overlay on its image (not a volume)."""
        return not self.volume_id


def boot_index_of(text: str) -> int | None:
    """The boot index of an entry's ``boot_index`` text: None for not bootable ("", "none" in any case, a negative
    integer); ValueError if it is none of these nor an integer."""
    if text.strip().lower() in ("", "none"):
        return None
    if _INTEGER_RE.fullmatch(text.strip()) is None:
        raise ValueError(text)
    value = int(text)
    return value if value >= 0 else None


def boot_volume(spec: InstanceSpec) -> StorageEntry | None:
    """The entry with ``boot: true``, if any (the first: `storage_problem` refuses a second)."""
    return next((entry for entry in spec.storage if entry.boot), None)


def storage_problem(spec: InstanceSpec) -> StorageProblem | None:
    """The first rule of the module docstring the START's storage (with its image_uuid) breaks, or None. The
    payload parser reports it as ``invalid_data`` naming ``start.<field>``. A spec with neither an image nor a
    boot volume passes here (the parser refuses it; the simulation, given one built in code, boots it anyway)."""
    boot_at: int | None = None
    indexed: dict[int, int] = {}  # boot index >= 1 -> the entry's position
    for position, entry in enumerate(spec.storage):
        problem = entry_problem(entry)
        if problem is not None:
            return StorageProblem(f"storage[{position}].{problem.field}", problem.reason)
        if entry.boot:
            if boot_at is not None:
                return StorageProblem(f"storage[{position}].boot", f"only one storage entry may have boot: true "
                                                                   f"(storage[{boot_at}] has it)")
            boot_at = position
        index = boot_index_of(entry.boot_index)
        if index is not None and index >= 1:
            if index in indexed:
                return StorageProblem(f"storage[{position}].boot_index", f"storage[{indexed[index]}] has boot_index "
                                                                         f"{index} too")
            indexed[index] = position
    if spec.image_uuid and boot_at is not None:
        return StorageProblem("image_uuid", f"must be empty when storage[{boot_at}] has boot: true (the instance "
                                            "boots from that volume)")
    return None  # no image and no boot volume: the parser refuses it, a virtualizer that needs a disk too


def entry_problem(entry: StorageEntry) -> StorageProblem | None:
    """What is wrong with one entry on its own (`field` is the entry's key), or None."""
    try:
        index = boot_index_of(entry.boot_index)
    except ValueError:
        return StorageProblem("boot_index", f"must be \"none\" or an integer, got {entry.boot_index[:40]!r}")
    if index is not None and index > MAX_BOOT_INDEX:
        return StorageProblem("boot_index", f"must be at most {MAX_BOOT_INDEX}, got {index}")
    if len(entry.tag) > MAX_TAG_LEN or "/" in entry.tag or "," in entry.tag:
        return StorageProblem("tag", f"at most {MAX_TAG_LEN} characters, without '/' or ',' (OpenStack's device "
                                     f"tags), got {entry.tag[:70]!r}")
    if entry.boot:
        return _boot_entry_problem(entry, index)
    if entry.swap:
        if not entry.local:
            return StorageProblem("local", "a swap volume must be local: true (the launcher makes it raw, of "
                                           "`size` GiB, and formats it as swap)")
        if index is not None:
            return StorageProblem("boot_index", "a swap volume is not bootable (leave it out or say \"none\")")
    if index == 0:
        return StorageProblem("boot_index", "0 is the instance's first disk (its image, or the entry with boot: "
                                            "true); a volume's boot_index starts at 1")
    return None


def _boot_entry_problem(entry: StorageEntry, index: int | None) -> StorageProblem | None:
    if entry.swap:
        return StorageProblem("swap", "a boot volume cannot be swap")
    if entry.local:
        return StorageProblem("local", "a boot volume must exist already (a local volume is made blank)")
    if entry.boot_index and index != 0:
        return StorageProblem("boot_index", f"the boot volume is the first boot device: leave boot_index out or "
                                            f"say 0, got {entry.boot_index[:40]!r}")
    return None


def disk_plan(spec: InstanceSpec, volume_ids: Sequence[str] | None = None) -> tuple[PlannedDisk, ...]:
    """The instance's disks in target order with their boot orders, tags and swap flags (module docstring).

    `volume_ids` are the instance's current volumes (default: its START's storage ids, in order); an id with no
    storage entry is a plain data disk. Assumes `storage_problem(spec)` is None."""
    ids = [entry.id for entry in spec.storage] if volume_ids is None else list(volume_ids)
    entries = {entry.id: entry for entry in spec.storage}
    boot = boot_volume(spec)
    first: list[str] = [""] if spec.image_uuid else ([boot.id] if boot is not None and boot.id in ids else [])
    order = first + [volume_id for volume_id in ids if volume_id not in first]
    indexes = {volume_id: 0 if volume_id in first else _index(entries.get(volume_id)) for volume_id in order}
    boot_orders: dict[str, int] = {}
    if boot is not None or any(index for index in indexes.values()):  # an index of 1 or more
        ranked = sorted((index, position) for position, index in enumerate(indexes.values()) if index is not None)
        boot_orders = {order[position]: rank for rank, (_, position) in enumerate(ranked, start=1)}
    return tuple(_planned(volume_id, entries.get(volume_id), boot_orders.get(volume_id)) for volume_id in order)


def _index(entry: StorageEntry | None) -> int | None:
    return None if entry is None or entry.boot else boot_index_of(entry.boot_index)


def _planned(volume_id: str, entry: StorageEntry | None, boot_order: int | None) -> PlannedDisk:
    if entry is None:
        return PlannedDisk(volume_id, boot_order)
    return PlannedDisk(volume_id, boot_order, entry.tag or (SWAP_TAG if entry.swap else ""), entry.swap)


def uses_boot_orders(plan: Sequence[PlannedDisk]) -> bool:
    """Whether the domain boots by per-device orders (then it must have no ``<os><boot dev>``)."""
    return any(disk.boot_order is not None for disk in plan)


def devices_metadata(plan: Sequence[PlannedDisk]) -> list[dict[str, Any]]:
    """OpenStack's device role tagging for the meta-data's ``devices`` key: one element per tagged volume."""
    return [{"type": "disk", "bus": "virtio", "serial": disk.volume_id, "tags": [disk.tag]}
            for disk in plan if disk.volume_id and disk.tag]


def local_volumes_mb(spec: InstanceSpec) -> int:
    """MiB of the volumes the START makes (`local` entries)."""
    return sum(entry.size * GIB_MB for entry in spec.storage if entry.local)


def promised_disk_mb(spec: InstanceSpec) -> int:
    """The disk admission promises the instance: its overlay's disk_mb (none when it boots from a volume: it has
    no overlay) plus its local volumes."""
    return (spec.disk_mb if spec.image_uuid else 0) + local_volumes_mb(spec)


def volume_format(entry: StorageEntry) -> str:
    """The format of a local volume the launcher makes: raw for swap (mkswap writes the file), else qcow2."""
    return "raw" if entry.swap else "qcow2"


async def check_storage(store: VolumeCatalog | None, spec: InstanceSpec) -> None:
    """LauncherError if the START's storage cannot be honoured: no volume store, or a volume that must exist
    already (every entry but the `local` ones, which `make_local_volumes` makes) and does not. The reason names
    the entry; the virtualizer reports it with its phase's code, before anything is made. (The rules of
    `storage_problem` were checked when the payload was parsed.)"""
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
    """Create the START's `local` volumes (`volume_format`); one that exists already (a START carried on after
    a crash made it) is kept. The ids made."""
    made = []
    for entry in spec.storage:
        if not entry.local:
            continue
        try:
            await store.create(entry.id, entry.size * GIB_MB, volume_format(entry))
        except LauncherError as exc:
            if exc.code != errors.VOLUME_EXISTS:
                raise
            continue
        made.append(entry.id)
    return made


async def remove_ephemeral_volumes(store: VolumeCatalog, spec: InstanceSpec, volumes: Sequence[str]) -> list[str]:
    """Delete the START's `ephemeral` volumes that are still among the instance's `volumes` (one detached since is
    no longer the instance's: it stays); those already gone are skipped. The ids deleted. Other volumes, a boot
    volume too, outlive the instance."""
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
