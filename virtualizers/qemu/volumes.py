"""The volume store of the QEMU virtualizer: data and boot disks as volumes of a libvirt storage pool.

`VolumeStore` implements `launcher.plugin.protocol.VolumeCatalog` (the backend's `volumes`; that protocol holds the
contract). `QemuBackend.open_volumes`, which the preflight of `launcher serve` calls, creates and opens it
(`launcher hard-reset`, which must work even where the pool cannot, does not).

The pool (`qemu.volumes.pool`):

- ``""`` (the default): the launcher's own ``dir`` pool at ``<data_dir>/volumes``, named `own_pool_name`
  (``launcher-<first 10 hex digits of sha256(absolute data dir)>``), set up by `VolumeStore.open`
  (`pool_calls.ensure_dir_pool`). Its directory is 0710, owned by the launcher's user with QEMU's group
  (libvirt's DAC label, as for the instance dirs), so that QEMU may enter it but not list it; 0700 when QEMU
  runs as root or libvirt is remote.
- any other name: a pool the operator defined (RBD, LVM, NFS, iSCSI, ...) and started. The store only creates
  and deletes volumes named ``<volume id>.<fmt>`` in it (and sees ``<volume id>`` too, for the duplicate check).
  Such pools are not tested here. Blank volumes go through libvirt alone; a copy-on-write child is a qcow2
  file (a file-based pool: dir, fs, netfs); a full copy needs volumes with a local path (``qemu-img convert``
  writes into it), which RBD volumes are not; RBD and LVM volumes are raw.

Volumes are created with mode 0600, owned by the launcher's user: with ``dynamic_ownership`` (libvirt's default,
and Debian's) libvirt hands a disk to QEMU's user when a domain starts using it and gives it back when the domain
stops, as for the instances' overlays. A copy-on-write volume's backing file is the image store's file, which
QEMU's group may read. What libvirt does not keep is in the volume's record (volume_records.py, the commit
marker); a failed or cancelled create deletes what it made. `format_swap` makes a raw volume swap space
(swap.py).

Every libvirt call is a bounded `Hypervisor.call` of a `pool_calls` function; ``qemu-img`` and ``mkswap`` run
under their bounds (`launcher.plugin.tools.run_tool`); file work runs in worker threads under the launcher's
shared limiter. Operations on one volume id are serialised by a lock of that id, so that two concurrent creates
of one id cannot both pass the duplicate check.
"""

from __future__ import annotations

import builtins
import datetime
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import libvirt
import trio

from launcher.plugin import errors
from launcher.plugin.errors import LauncherError, SetupError
from launcher.plugin.files import fsync_dir, fsync_file
from launcher.plugin.locks import KeyedLocks
from launcher.plugin.protocol import MAX_VOLUME_MB, VOLUME_FORMATS, VolumeCatalog, VolumeInfo, is_valid_volume_id
from launcher.plugin.tools import ToolError
from virtualizers.qemu import pool_calls, preflight, qemu_img, swap, volume_records
from virtualizers.qemu.hypervisor import Hypervisor, Unavailable, error_text
from virtualizers.qemu.image_errors import ImageError, ImageNotFound
from virtualizers.qemu.images import ImageInfo, ImageStore
from virtualizers.qemu.pool_calls import Described
from virtualizers.qemu.volume_records import RECORDS_DIR, VolumeRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

VOLUMES_DIR = "volumes"  # the own pool's directory, under the data dir
VOLUME_MODE = 0o600
POOL_DIR_MODE = 0o700  # plus group search for QEMU's group (module doc)
CLONES = ("cow", "copy")
COPY_TIMEOUT_S = 3600.0  # bound on one full copy (qemu-img convert)
MIB = 1 << 20
_FULL_MARKERS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))  # in libvirt's and qemu-img's messages


def own_pool_name(data_dir: Path) -> str:
    """The name of the launcher's own pool for `data_dir` (module doc)."""
    return "launcher-" + hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:10]


class VolumeStore:
    """The volumes of one launcher in one libvirt storage pool (module doc). Call `open` first; every method
    must be called from the Trio thread. Failures raise LauncherError (codes of `VolumeCatalog`)."""

    def __init__(self, hypervisor: Hypervisor, images: ImageStore, *, data_dir: Path, pool: str,
                 limiter: trio.CapacityLimiter, copy_timeout_s: float = COPY_TIMEOUT_S) -> None:
        self._hypervisor = hypervisor
        self._images = images
        self._limiter = limiter
        self._copy_timeout_s = copy_timeout_s
        self.own_pool = not pool
        self.pool_name = pool or own_pool_name(data_dir)  # the libvirt pool
        self.pool_path = (data_dir / VOLUMES_DIR).absolute()  # the own pool's directory (unused otherwise)
        self._records_dir = data_dir / RECORDS_DIR
        self._records: dict[str, VolumeRecord] = {}
        self._locks = KeyedLocks()  # one operation per id at a time
        self._owner = (os.getuid(), os.getgid())  # of new volumes and of the own pool's directory

    # -- start-up ----------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Set the pool up (own pool) or find it (the operator's), load the records and clear what an
        interrupted create or delete left (volume_records.py). SetupError with what to do if that fails."""
        try:
            if self.own_pool:
                await self._open_own_pool()
            else:
                await self._call(partial(pool_calls.find_pool, name=self.pool_name))
            names = set(await self._call(partial(pool_calls.volume_names, pool=self.pool_name)))
            self._records, broken = await self._run(volume_records.load_records, self._records_dir)
            await self._clear_leftovers(names, broken)
        except (Unavailable, libvirt.libvirtError) as exc:
            raise SetupError(f"qemu.volumes: cannot open the storage pool {self.pool_name!r}: {error_text(exc)}") \
                from exc
        except OSError as exc:
            raise SetupError(f"qemu.volumes: cannot set up {self.pool_path if self.own_pool else 'the pool'} or "
                             f"the volume records in {self._records_dir}: {exc}") from exc
        except LauncherError as exc:
            raise SetupError(f"qemu.volumes: {exc.reason}") from exc
        log.info("volume store: pool %s%s, %d volumes", self.pool_name,
                 f" at {self.pool_path}" if self.own_pool else " (the operator's)", len(self._records))

    async def _open_own_pool(self) -> None:
        user = await self._qemu_user()
        uid, gid = self._owner
        mode = POOL_DIR_MODE
        if user is not None:
            gid, mode = user.gid, POOL_DIR_MODE | stat.S_IXGRP
        xml = pool_calls.pool_xml(self.pool_name, self.pool_path, mode, uid, gid)
        local = preflight.is_local(self._hypervisor.uri)  # else the pool's directory is on libvirt's host
        await self._call(partial(pool_calls.ensure_dir_pool, name=self.pool_name, path=self.pool_path, xml=xml,
                                 local=local))
        if local:
            await self._run(_set_dir_mode, self.pool_path, uid, gid, mode)  # an adopted pool's dir too

    async def _qemu_user(self) -> preflight.QemuUser | None:
        """Whom QEMU runs as (libvirt's DAC label), None if nobody to share the pool dir with."""
        if not preflight.is_local(self._hypervisor.uri):
            return None
        user = preflight.qemu_user(await self._call(lambda conn: conn.getCapabilities()))
        return None if user is None or user.uid == 0 else user

    async def _clear_leftovers(self, names: set[str], broken: set[str]) -> None:
        """Forget records whose volume is gone; rebuild a broken record from its volume (what libvirt does not
        keep is then unknown); delete a volume of the own pool that has no record (an interrupted create)."""
        for volume_id, record in sorted(self._records.items()):
            if record.name not in names:
                log.warning("volume store: volume %s is gone from pool %s; forgetting it", volume_id, self.pool_name)
                del self._records[volume_id]
                await self._run(volume_records.remove_record, self._records_dir, volume_id)
        committed = {record.name for record in self._records.values()}
        for name in sorted(names - committed):
            found = volume_records.id_of(name)
            if found is not None and found in broken and found not in self._records:
                log.warning("volume store: rebuilding the broken record of volume %s", found)
                rebuilt = await self._rebuilt_record(found, name)
                await self._write_record(rebuilt)
                self._records[found] = rebuilt
            elif found is not None and self.own_pool:  # the operator's pool may hold others' volumes
                log.warning("volume store: deleting volume %s of pool %s, left by an interrupted create", name,
                            self.pool_name)
                await self._call(partial(pool_calls.delete_volume, pool=self.pool_name, name=name))
        for volume_id in sorted(broken - self._records.keys()):
            log.warning("volume store: removing the broken record of volume %s, which is gone", volume_id)
            await self._run(volume_records.remove_record, self._records_dir, volume_id)

    async def _rebuilt_record(self, volume_id: str, name: str) -> VolumeRecord:
        """A record from what libvirt knows: a copy-on-write child of an image of the store is known by its
        backing file; a full copy is indistinguishable from a blank volume."""
        record = VolumeRecord(volume_id, name, name.rpartition(".")[2])
        described = await self._call(partial(pool_calls.describe_one, pool=self.pool_name, name=name))
        if described is not None and described.backing:
            image = self._images.get(Path(described.backing).stem)
            if image is not None and str(image.path.absolute()) == described.backing:
                record = attrs.evolve(record, source_image=image.id, clone="cow")
        return record

    # -- VolumeCatalog -----------------------------------------------------------------------------------

    async def list(self) -> builtins.list[VolumeInfo]:
        """Every volume of this store, by id."""
        try:
            found = await self._call(partial(pool_calls.describe_all, pool=self.pool_name))
        except (Unavailable, libvirt.libvirtError) as exc:
            raise _failure(exc, f"cannot list the volumes of pool {self.pool_name}") from exc
        by_name = {described.name: described for described in found}
        return [self._info(record, by_name[record.name])
                for _, record in sorted(self._records.items()) if record.name in by_name]

    async def get(self, volume_id: str) -> VolumeInfo:
        """The volume, or LauncherError not_found."""
        _check_id(volume_id)
        record = self._record(volume_id)
        return self._info(record, await self._describe(record))

    async def create(self, volume_id: str, size_mb: int, fmt: str, *, source_image: str = "",
                     clone: str = "cow") -> VolumeInfo:
        """A new volume ``<volume_id>.<fmt>`` of `size_mb` MiB (`VolumeCatalog.create`).

        Blank: capacity `size_mb` MiB, nothing allocated. From the image `source_image` of the image store
        (imported first if needed, as for a START): `clone="cow"` is a qcow2 volume whose backing file is the
        image (`fmt` raw is invalid_data), `clone="copy"` a full copy converted to `fmt`. A `size_mb` of 0 with
        an image is the image's virtual size rounded up to whole MiB; a size below the image's is invalid_data.
        Nothing is left behind on failure or cancellation."""
        _check_id(volume_id)
        _check_request(size_mb, fmt, source_image, clone)
        async with self._locks.hold(volume_id):
            await self._check_free(volume_id)
            image = await self._source(source_image) if source_image else None
            capacity = size_mb * MIB
            if image is not None:
                image_mb = _mb(image.virtual_size)
                if size_mb == 0:
                    capacity = image_mb * MIB
                elif capacity < image.virtual_size:
                    raise LauncherError(errors.INVALID_DATA, f"size_mb {size_mb} is smaller than image "
                                                             f"{image.id} ({image_mb} MiB)")
            cow = image is not None and clone == "cow"
            record = VolumeRecord(volume_id, f"{volume_id}.{fmt}", fmt, image.id if image else "",
                                  clone if image else "",
                                  datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
            owner = (VOLUME_MODE, *self._owner) if self.own_pool else None
            xml = pool_calls.volume_xml(record.name, fmt, capacity, owner=owner,
                                        backing=(image.path, image.format) if image is not None and cow else None)
            what = f"cannot create volume {record.name} in pool {self.pool_name}"
            try:
                await self._call(partial(pool_calls.create_volume, pool=self.pool_name, xml=xml))
            except libvirt.libvirtError as exc:
                raise _failure(exc, what) from exc  # libvirt refused: it made nothing
            except BaseException as exc:  # cancelled or unanswered: the abandoned call may still make it
                with trio.CancelScope(shield=True):
                    await self._forget(record)
                if isinstance(exc, Unavailable):
                    raise _failure(exc, what) from exc
                raise
            try:
                if image is not None and not cow:
                    await self._copy(image, record)
                await self._make_durable(record, new=True)
                await self._write_record(record)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._forget(record)
                raise
            self._records[volume_id] = record
            log.info("volume %s created: %d MiB %s%s", volume_id, capacity // MIB, fmt,
                     f", {clone} of image {image.id}" if image else "")
            try:
                return self._info(record, await self._describe(record))
            except LauncherError as exc:  # it is made and committed: say so, with what is known
                log.warning("volume store: cannot read the new volume %s: %s", volume_id, exc.reason)
                return self._info(record, Described(record.name, capacity, 0, fmt, ""))

    async def delete(self, volume_id: str) -> None:
        """Delete the volume (not_found if there is none): libvirt's volume, then its record."""
        _check_id(volume_id)
        async with self._locks.hold(volume_id):
            record = self._record(volume_id)
            try:
                await self._call(partial(pool_calls.delete_volume, pool=self.pool_name, name=record.name))
            except (Unavailable, libvirt.libvirtError) as exc:
                raise _failure(exc, f"cannot delete volume {record.name} of pool {self.pool_name}") from exc
            del self._records[volume_id]
            try:
                await self._run(volume_records.remove_record, self._records_dir, volume_id)
            except OSError as exc:  # the volume is gone; open() removes the record later
                log.warning("volume store: cannot remove the record of volume %s: %s", volume_id, exc)
            log.info("volume %s deleted", volume_id)

    async def resize(self, volume_id: str, size_mb: int) -> VolumeInfo:
        """Grow the volume to `size_mb` MiB; the same size is a no-op, a smaller one invalid_data."""
        _check_id(volume_id)
        if not 0 < size_mb <= MAX_VOLUME_MB:
            raise LauncherError(errors.INVALID_DATA, f"size_mb must be 1..{MAX_VOLUME_MB}, got {size_mb}")
        async with self._locks.hold(volume_id):
            record = self._record(volume_id)
            described = await self._describe(record)
            if size_mb * MIB < described.capacity:
                raise LauncherError(errors.INVALID_DATA, f"volume {volume_id} has {_mb(described.capacity)} MiB: "
                                                         f"shrinking it to {size_mb} would cut its file system")
            if size_mb * MIB > described.capacity:
                try:
                    await self._call(partial(pool_calls.resize_volume, pool=self.pool_name, name=record.name,
                                             capacity=size_mb * MIB))
                except (Unavailable, libvirt.libvirtError) as exc:
                    raise _failure(exc, f"cannot resize volume {record.name} to {size_mb} MiB") from exc
                await self._make_durable(record)
                log.info("volume %s resized to %d MiB", volume_id, size_mb)
            return self._info(record, await self._describe(record))

    async def format_swap(self, volume_id: str) -> bool:
        """Make the raw volume Linux swap space (swap.py); True if it ran mkswap, False if the volume was swap
        space already. not_found, invalid_data (not raw, or holding other data) or volume_failure otherwise."""
        _check_id(volume_id)
        async with self._locks.hold(volume_id):
            record = self._record(volume_id)
            described = await self._describe(record)
            if (described.format or record.format) != "raw":
                raise LauncherError(errors.INVALID_DATA, f"volume {volume_id} is {described.format or record.format}"
                                                         ", a swap volume must be raw")
            content = await self._run(swap.swap_content, described.path)
            if content is None:
                raise LauncherError(errors.VOLUME_FAILURE, f"pool {self.pool_name}: swap volumes must be files (a "
                                                           f"dir, fs or netfs pool), not {described.path!r}")
            if content == "swap":
                return False
            if content != "blank":
                raise LauncherError(errors.INVALID_DATA, f"volume {volume_id} holds data that is not swap space; "
                                                         "it is not overwritten")
            try:
                await swap.mkswap(described.path)
            except ToolError as exc:
                raise LauncherError(errors.VOLUME_FAILURE, str(exc)) from exc
            log.info("volume %s formatted as swap", volume_id)
            return True

    # -- helpers -----------------------------------------------------------------------------------------

    def _record(self, volume_id: str) -> VolumeRecord:
        record = self._records.get(volume_id)
        if record is None:
            raise LauncherError(errors.NOT_FOUND, f"no volume {volume_id}")
        return record

    async def _describe(self, record: VolumeRecord) -> Described:
        try:
            described = await self._call(partial(pool_calls.describe_one, pool=self.pool_name, name=record.name))
        except (Unavailable, libvirt.libvirtError) as exc:
            raise _failure(exc, f"cannot read volume {record.name} of pool {self.pool_name}") from exc
        if described is None:
            raise LauncherError(errors.NOT_FOUND, f"no volume {record.id}: {record.name} is gone from pool "
                                                  f"{self.pool_name}")
        return described

    def _info(self, record: VolumeRecord, described: Described) -> VolumeInfo:
        return VolumeInfo(id=record.id, size_mb=_mb(described.capacity), allocation_mb=_mb(described.allocation),
                          format=described.format or record.format, source_image=record.source_image,
                          clone=record.clone, path=described.path)

    async def _check_free(self, volume_id: str) -> None:
        if volume_id in self._records:
            raise LauncherError(errors.VOLUME_EXISTS, f"volume {volume_id} exists")
        try:
            taken = await self._call(partial(pool_calls.existing_name, pool=self.pool_name,
                                             names=volume_records.names_of(volume_id)))
        except (Unavailable, libvirt.libvirtError) as exc:
            raise _failure(exc, f"cannot look into pool {self.pool_name}") from exc
        if taken:
            raise LauncherError(errors.VOLUME_EXISTS, f"pool {self.pool_name} already has a volume {taken}")

    async def _source(self, image_id: str) -> ImageInfo:
        try:
            return await self._images.ensure(image_id)
        except ImageNotFound as exc:
            raise LauncherError(errors.INVALID_DATA, f"source image {image_id}: {exc.reason}") from exc
        except ImageError as exc:
            code = errors.INVALID_DATA if exc.reason.startswith("invalid image id") else errors.VOLUME_FAILURE
            raise LauncherError(code, f"source image {image_id}: {exc.reason}") from exc

    async def _copy(self, image: ImageInfo, record: VolumeRecord) -> None:
        """Fill the new volume with the image, converted to its format (qemu-img convert into its path)."""
        described = await self._describe(record)
        if not described.path.startswith("/"):
            raise LauncherError(errors.VOLUME_FAILURE, f"pool {self.pool_name}: a full copy needs volumes with a "
                                                       f"local path, not {described.path!r} (use clone: cow)")
        try:
            await qemu_img.convert(image.path, image.format, described.path, record.format,
                                   timeout_s=self._copy_timeout_s)
        except ToolError as exc:
            code = errors.STORAGE_FULL if _says_full(exc.stderr) else errors.VOLUME_FAILURE
            raise LauncherError(code, f"copying image {image.id} into volume {record.id} failed: {exc}") from exc

    async def _make_durable(self, record: VolumeRecord, new: bool = False) -> None:
        """fsync the own pool's file of the volume (and, if `new`, the pool's directory, for its name): libvirt
        syncs neither when it creates or resizes a volume, nor does ``qemu-img convert`` (its default cache
        mode is unsafe), so a power loss after the record was written would lose the volume, its size or its
        content. The operator's pools are left to their own durability."""
        if not self.own_pool or not preflight.is_local(self._hypervisor.uri):
            return
        try:
            await self._run(fsync_file, self.pool_path / record.name)
            if new:
                await self._run(fsync_dir, self.pool_path)
        except OSError as exc:
            raise errors.write_failure(exc, f"volume {record.id}", errors.VOLUME_FAILURE) from exc

    async def _write_record(self, record: VolumeRecord) -> None:
        try:
            await self._run(volume_records.write_record, self._records_dir, record)
        except OSError as exc:
            raise errors.write_failure(exc, f"the record of volume {record.id}", errors.VOLUME_FAILURE) from exc

    async def _forget(self, record: VolumeRecord) -> None:
        """Undo a create: delete the volume and its record, logging (not raising) what fails."""
        try:
            await self._call(partial(pool_calls.delete_volume, pool=self.pool_name, name=record.name))
        except (Unavailable, libvirt.libvirtError) as exc:
            log.warning("volume store: cannot delete the half-made volume %s: %s", record.name, error_text(exc))
        try:
            await self._run(volume_records.remove_record, self._records_dir, record.id)
        except OSError as exc:
            log.warning("volume store: cannot remove the record of volume %s: %s", record.id, exc)

    async def _call(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        return await self._hypervisor.call(fn)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)


if TYPE_CHECKING:
    def _is_a_volume_catalog(store: VolumeStore) -> VolumeCatalog:
        return store  # mypy checks that VolumeStore has the protocol's methods and signatures


# -- checks ----------------------------------------------------------------------------------------------


def _check_id(volume_id: str) -> None:
    if not is_valid_volume_id(volume_id):
        raise LauncherError(errors.INVALID_DATA, f"invalid volume id {volume_id!r}")


def _check_request(size_mb: int, fmt: str, source_image: str, clone: str) -> None:
    if fmt not in VOLUME_FORMATS:
        raise LauncherError(errors.INVALID_DATA, f"format must be one of {', '.join(VOLUME_FORMATS)}, got {fmt!r}")
    if not 0 <= size_mb <= MAX_VOLUME_MB or (size_mb == 0 and not source_image):
        lowest = 0 if source_image else 1
        raise LauncherError(errors.INVALID_DATA, f"size_mb must be {lowest}..{MAX_VOLUME_MB}, got {size_mb}")
    if source_image:
        if clone not in CLONES:
            raise LauncherError(errors.INVALID_DATA, f"clone must be one of {', '.join(CLONES)}, got {clone!r}")
        if clone == "cow" and fmt != "qcow2":
            raise LauncherError(errors.INVALID_DATA, "a copy-on-write clone of an image is a qcow2 volume, "
                                                     f"not {fmt} (use clone: copy for a {fmt} volume)")


def _mb(size: int) -> int:
    """`size` bytes in MiB, rounded up."""
    return -(-size // MIB)


def _failure(exc: Exception, what: str) -> LauncherError:
    """A libvirt failure as a LauncherError: volume_exists, storage_full (ENOSPC, EDQUOT) or volume_failure,
    with libvirt's message."""
    message = error_text(exc)
    if isinstance(exc, libvirt.libvirtError) and exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
        return LauncherError(errors.VOLUME_EXISTS, f"{what}: {message}")
    if _says_full(message):
        return LauncherError(errors.STORAGE_FULL, f"node storage full: {what}: {message}")
    return LauncherError(errors.VOLUME_FAILURE, f"{what}: {message}")


def _says_full(message: str) -> bool:
    """Whether a tool's or libvirt's `message` says the file system is full (ENOSPC) or a quota is (EDQUOT)."""
    return any(marker in message for marker in _FULL_MARKERS)


def _set_dir_mode(path: Path, uid: int, gid: int, mode: int) -> None:
    """Give the directory `path` that owner and mode, if it has others. Blocks."""
    info = os.stat(path)
    if (info.st_uid, info.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)
