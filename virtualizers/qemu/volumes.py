"""The volume store of the QEMU virtualizer: data and boot disks as volumes of a libvirt storage pool.

It implements `launcher.plugin.protocol.VolumeCatalog` (the backend's `volumes`). `QemuBackend.open_volumes`,
which the preflight of `launcher serve` calls, creates and opens it (`launcher hard-reset`, which must work
even where the pool cannot, does not).

The pool (`qemu.volumes.pool`):

- ``""`` (the default): the launcher's own ``dir`` pool at ``<data_dir>/volumes``, named `own_pool_name`
  (``launcher-<first 10 hex digits of sha256(absolute data dir)>``). `VolumeStore.open` defines it (persistent),
  builds, starts and marks it autostart, or adopts it if a pool of that name with that target path exists;
  a pool of that name with another type or path is a SetupError naming it. Its directory is 0710, owned by the
  launcher's user with QEMU's group (libvirt's DAC label, as for the instance dirs), so that QEMU may enter it
  but not list it; 0700 when QEMU runs as root or libvirt is remote.
- any other name: a pool the operator defined (RBD, LVM, NFS, iSCSI, ...) and started. The store only creates
  and deletes volumes named ``<volume id>.<fmt>`` in it (and sees ``<volume id>`` too, for the duplicate check).
  Such pools are not tested here. Blank volumes go through libvirt alone; a copy-on-write child is a qcow2
  file (a file-based pool: dir, fs, netfs); a full copy needs volumes with a local path (``qemu-img convert``
  writes into it), which RBD volumes are not; RBD and LVM volumes are raw.

Volumes are named ``<volume id>.<fmt>`` (so that the files of a dir pool show their format) and created with
mode 0600, owned by the launcher's user: with ``dynamic_ownership`` (libvirt's default, and Debian's) libvirt
hands a disk to QEMU's user when a domain starts using it and gives it back when the domain stops, as for the
instances' overlays. A copy-on-write volume's backing file is the image store's file, which QEMU's group may read.

What libvirt does not keep (the source image, the kind of clone, when it was made) is kept in a *record*,
``<data_dir>/volume-records/<volume id>.json``, outside the pool directory (a dir pool lists every file in it as
a volume). The record is written last, atomically: it is the commit marker. A volume without a record is not
listed; in the own pool, `open` deletes such volumes (a create that a crash interrupted). In any pool, `open`
removes records whose volume is gone, and rebuilds a broken record from its volume (the source image from a
copy-on-write child's backing file; a full copy then looks blank). A failed or cancelled create deletes what it
made.

A swap volume (a START's ``swap: true`` entry) is a raw volume that `format_swap` makes Linux swap space with
``mkswap`` on its file: only for volumes that are regular files (the own dir pool; an operator's dir, fs or
netfs pool), else volume_failure naming the pool. It formats a volume whose first page is blank (just made) and
leaves one that is swap space already (a START carried on); any other content is invalid_data (never
overwritten).

Every libvirt call goes through `Hypervisor.call` (bounded); ``qemu-img`` runs under a timeout; file work runs in
worker threads under the launcher's shared limiter. Operations on one volume id are serialised by a lock of that
id, so that two concurrent creates of one id cannot both pass the duplicate check.
"""

from __future__ import annotations

import builtins
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import libvirt
import trio

from launcher.plugin import errors
from launcher.plugin.errors import LauncherError, SetupError
from launcher.plugin.files import atomic_write, fsync_dir
from launcher.plugin.locks import KeyedLocks
from launcher.plugin.protocol import MAX_VOLUME_MB, VOLUME_FORMATS, VolumeCatalog, VolumeInfo
from launcher.plugin.tools import ToolError, run_tool
from virtualizers.qemu import preflight, qemu_img
from virtualizers.qemu.hypervisor import Hypervisor, Unavailable, error_text
from virtualizers.qemu.image_errors import ImageError, ImageNotFound
from virtualizers.qemu.images import ImageInfo, ImageStore

log = logging.getLogger(__name__)
T = TypeVar("T")

VOLUMES_DIR = "volumes"  # the own pool's directory, under the data dir
RECORDS_DIR = "volume-records"  # the volumes' records, under the data dir (not in the pool: module doc)
RECORD_SUFFIX = ".json"
VOLUME_MODE = 0o600
POOL_DIR_MODE = 0o700  # plus group search for QEMU's group (module doc)
CLONES = ("cow", "copy")
COPY_TIMEOUT_S = 3600.0  # bound on one full copy (qemu-img convert)
MIB = 1 << 20
MAX_ID_LEN = 64
SWAP_PAGE = 4096  # mkswap's signature ends the first page (x86-64's page size)
SWAP_SIGNATURE = b"SWAPSPACE2"
MKSWAP_TIMEOUT_S = 60.0
MKSWAP_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
# What a volume id must be again here (defence in depth: the caller checked it with launcher.payloads).
_ID_RE = re.compile(r"[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*")
_FULL_MARKERS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))  # in libvirt's messages


def own_pool_name(data_dir: Path) -> str:
    """The name of the launcher's own pool for `data_dir` (module doc)."""
    return "launcher-" + hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:10]


def is_valid_volume_id(volume_id: str) -> bool:
    return len(volume_id) <= MAX_ID_LEN and _ID_RE.fullmatch(volume_id) is not None


@attrs.frozen
class VolumeRecord:
    """What the store keeps about a volume besides libvirt (the content of its record file)."""

    id: str
    name: str  # the libvirt volume's name: <id>.<fmt>
    format: str
    source_image: str = ""
    clone: str = ""
    created_at: str = ""  # ISO-8601, UTC

    def as_json(self) -> bytes:
        return json.dumps(attrs.asdict(self), indent=2, sort_keys=True).encode() + b"\n"


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
        interrupted create or delete left (module doc). SetupError with what to do if that fails."""
        try:
            if self.own_pool:
                await self._open_own_pool()
            else:
                await self._call(partial(_find_pool, name=self.pool_name))
            names = set(await self._call(partial(_volume_names, pool=self.pool_name)))
            self._records, broken = await self._run(self._load_records)
            await self._clear_leftovers(names, broken)
        except (Unavailable, libvirt.libvirtError) as exc:
            raise SetupError(f"qemu.volumes: cannot open the storage pool {self.pool_name!r}: {_message(exc)}") \
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
        xml = _pool_xml(self.pool_name, self.pool_path, mode, uid, gid)
        local = preflight.is_local(self._hypervisor.uri)  # else the pool's directory is on libvirt's host
        await self._call(partial(_ensure_dir_pool, name=self.pool_name, path=self.pool_path, xml=xml, local=local))
        if local:
            await self._run(_set_dir_mode, self.pool_path, uid, gid, mode)  # an adopted pool's dir too

    async def _qemu_user(self) -> preflight.QemuUser | None:
        """Whom QEMU runs as (libvirt's DAC label), None if nobody to share the pool dir with."""
        if not preflight.is_local(self._hypervisor.uri):
            return None
        user = preflight.qemu_user(await self._call(lambda conn: conn.getCapabilities()))
        return None if user is None or user.uid == 0 else user

    def _load_records(self) -> tuple[dict[str, VolumeRecord], set[str]]:
        """The records, and the ids whose record is broken."""
        self._records_dir.mkdir(mode=0o700, exist_ok=True)
        records, broken = {}, set()
        for path in sorted(self._records_dir.iterdir()):
            if path.name.startswith("."):
                if path.name.endswith(".tmp"):  # an atomic_write that did not finish
                    path.unlink()
                continue
            volume_id = path.name.removesuffix(RECORD_SUFFIX)
            try:
                raw = json.loads(path.read_bytes())
                record = VolumeRecord(**raw)
                if record.id != volume_id or not is_valid_volume_id(volume_id) or \
                        record.name not in _names_of(volume_id) or record.format not in VOLUME_FORMATS:
                    raise ValueError("not the record of this volume")
            except (ValueError, TypeError) as exc:
                log.warning("volume store: ignoring %s, which is broken (%s)", path, exc)
                if is_valid_volume_id(volume_id):
                    broken.add(volume_id)
                continue
            records[volume_id] = record
        return records, broken

    async def _clear_leftovers(self, names: set[str], broken: set[str]) -> None:
        """Forget records whose volume is gone; rebuild a broken record from its volume (what libvirt does not
        keep is then unknown); delete a volume of the own pool that has no record (an interrupted create)."""
        for volume_id, record in sorted(self._records.items()):
            if record.name not in names:
                log.warning("volume store: volume %s is gone from pool %s; forgetting it", volume_id, self.pool_name)
                del self._records[volume_id]
                await self._run(self._remove_record, volume_id)
        committed = {record.name for record in self._records.values()}
        for name in sorted(names - committed):
            found = _id_of(name)
            if found is not None and found in broken and found not in self._records:
                log.warning("volume store: rebuilding the broken record of volume %s", found)
                rebuilt = await self._rebuilt_record(found, name)
                await self._write_record(rebuilt)
                self._records[found] = rebuilt
            elif found is not None and self.own_pool:  # the operator's pool may hold others' volumes
                log.warning("volume store: deleting volume %s of pool %s, left by an interrupted create", name,
                            self.pool_name)
                await self._call(partial(_delete_volume, pool=self.pool_name, name=name))
        for volume_id in sorted(broken - self._records.keys()):
            log.warning("volume store: removing the broken record of volume %s, which is gone", volume_id)
            await self._run(self._remove_record, volume_id)

    async def _rebuilt_record(self, volume_id: str, name: str) -> VolumeRecord:
        """A record from what libvirt knows: a copy-on-write child of an image of the store is known by its
        backing file; a full copy is indistinguishable from a blank volume."""
        record = VolumeRecord(volume_id, name, name.rpartition(".")[2])
        described = await self._call(partial(_describe_one, pool=self.pool_name, name=name))
        if described is not None and described.backing:
            image = self._images.get(Path(described.backing).stem)
            if image is not None and str(image.path.absolute()) == described.backing:
                record = attrs.evolve(record, source_image=image.id, clone="cow")
        return record

    # -- VolumeCatalog -----------------------------------------------------------------------------------

    async def list(self) -> builtins.list[VolumeInfo]:
        """Every volume of this store, by id."""
        try:
            found = await self._call(partial(_describe_all, pool=self.pool_name))
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
                image_mb = -(-image.virtual_size // MIB)
                if size_mb == 0:
                    capacity = image_mb * MIB
                elif capacity < image.virtual_size:
                    raise LauncherError(errors.INVALID_DATA, f"size_mb {size_mb} is smaller than image "
                                                             f"{image.id} ({image_mb} MiB)")
            cow = image is not None and clone == "cow"
            record = VolumeRecord(volume_id, f"{volume_id}.{fmt}", fmt, image.id if image else "",
                                  clone if image else "",
                                  datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
            xml = self._volume_xml(record.name, fmt, capacity, image if cow else None)
            what = f"cannot create volume {record.name} in pool {self.pool_name}"
            try:
                await self._call(partial(_create_volume, pool=self.pool_name, xml=xml))
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
                return self._info(record, _Described(record.name, capacity, 0, fmt, ""))

    async def delete(self, volume_id: str) -> None:
        """Delete the volume (not_found if there is none): libvirt's volume, then its record."""
        _check_id(volume_id)
        async with self._locks.hold(volume_id):
            record = self._record(volume_id)
            try:
                await self._call(partial(_delete_volume, pool=self.pool_name, name=record.name))
            except (Unavailable, libvirt.libvirtError) as exc:
                raise _failure(exc, f"cannot delete volume {record.name} of pool {self.pool_name}") from exc
            del self._records[volume_id]
            try:
                await self._run(self._remove_record, volume_id)
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
                    await self._call(partial(_resize_volume, pool=self.pool_name, name=record.name,
                                             capacity=size_mb * MIB))
                except (Unavailable, libvirt.libvirtError) as exc:
                    raise _failure(exc, f"cannot resize volume {record.name} to {size_mb} MiB") from exc
                log.info("volume %s resized to %d MiB", volume_id, size_mb)
            return self._info(record, await self._describe(record))

    async def format_swap(self, volume_id: str) -> bool:
        """Make the raw volume Linux swap space (module doc); True if it ran mkswap, False if the volume was swap
        space already. not_found, invalid_data (not raw, or holding other data) or volume_failure otherwise."""
        _check_id(volume_id)
        async with self._locks.hold(volume_id):
            record = self._record(volume_id)
            described = await self._describe(record)
            if (described.format or record.format) != "raw":
                raise LauncherError(errors.INVALID_DATA, f"volume {volume_id} is {described.format or record.format}"
                                                         ", a swap volume must be raw")
            content = await self._run(_swap_content, described.path)
            if content is None:
                raise LauncherError(errors.VOLUME_FAILURE, f"pool {self.pool_name}: swap volumes must be files (a "
                                                           f"dir, fs or netfs pool), not {described.path!r}")
            if content == "swap":
                return False
            if content != "blank":
                raise LauncherError(errors.INVALID_DATA, f"volume {volume_id} holds data that is not swap space; "
                                                         "it is not overwritten")
            await self._mkswap(described.path)
            log.info("volume %s formatted as swap", volume_id)
            return True

    async def _mkswap(self, path: str) -> None:
        try:
            await run_tool([shutil.which("mkswap", path=MKSWAP_PATH) or "mkswap", "-q", path],
                           timeout_s=MKSWAP_TIMEOUT_S)
        except ToolError as exc:
            raise LauncherError(errors.VOLUME_FAILURE, str(exc)) from exc

    # -- helpers -----------------------------------------------------------------------------------------

    def _record(self, volume_id: str) -> VolumeRecord:
        record = self._records.get(volume_id)
        if record is None:
            raise LauncherError(errors.NOT_FOUND, f"no volume {volume_id}")
        return record

    async def _describe(self, record: VolumeRecord) -> _Described:
        try:
            described = await self._call(partial(_describe_one, pool=self.pool_name, name=record.name))
        except (Unavailable, libvirt.libvirtError) as exc:
            raise _failure(exc, f"cannot read volume {record.name} of pool {self.pool_name}") from exc
        if described is None:
            raise LauncherError(errors.NOT_FOUND, f"no volume {record.id}: {record.name} is gone from pool "
                                                  f"{self.pool_name}")
        return described

    def _info(self, record: VolumeRecord, described: _Described) -> VolumeInfo:
        return VolumeInfo(id=record.id, size_mb=_mb(described.capacity), allocation_mb=_mb(described.allocation),
                          format=described.format or record.format, source_image=record.source_image,
                          clone=record.clone, path=described.path)

    async def _check_free(self, volume_id: str) -> None:
        if volume_id in self._records:
            raise LauncherError(errors.VOLUME_EXISTS, f"volume {volume_id} exists")
        try:
            taken = await self._call(partial(_existing, pool=self.pool_name, names=_names_of(volume_id)))
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

    def _volume_xml(self, name: str, fmt: str, capacity: int, backing: ImageInfo | None) -> str:
        volume = ET.Element("volume")
        ET.SubElement(volume, "name").text = name
        ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
        ET.SubElement(volume, "allocation", unit="bytes").text = "0"
        target = ET.SubElement(volume, "target")
        ET.SubElement(target, "format", type=fmt)
        if fmt == "qcow2":
            ET.SubElement(target, "compat").text = "1.1"
        if self.own_pool:
            permissions = ET.SubElement(target, "permissions")
            ET.SubElement(permissions, "mode").text = f"{VOLUME_MODE:04o}"
            ET.SubElement(permissions, "owner").text = str(self._owner[0])
            ET.SubElement(permissions, "group").text = str(self._owner[1])
        if backing is not None:
            store = ET.SubElement(volume, "backingStore")
            ET.SubElement(store, "path").text = str(backing.path.absolute())
            ET.SubElement(store, "format", type=backing.format)
        return ET.tostring(volume, encoding="unicode")

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
            full = any(marker in exc.stderr for marker in _FULL_MARKERS)
            code = errors.STORAGE_FULL if full else errors.VOLUME_FAILURE
            raise LauncherError(code, f"copying image {image.id} into volume {record.id} failed: {exc}") from exc

    async def _write_record(self, record: VolumeRecord) -> None:
        try:
            await self._run(atomic_write, self._records_dir / f"{record.id}{RECORD_SUFFIX}", record.as_json())
        except OSError as exc:
            raise errors.write_failure(exc, f"the record of volume {record.id}", errors.VOLUME_FAILURE) from exc

    async def _forget(self, record: VolumeRecord) -> None:
        """Undo a create: delete the volume and its record, logging (not raising) what fails."""
        try:
            await self._call(partial(_delete_volume, pool=self.pool_name, name=record.name))
        except (Unavailable, libvirt.libvirtError) as exc:
            log.warning("volume store: cannot delete the half-made volume %s: %s", record.name, _message(exc))
        try:
            await self._run(self._remove_record, record.id)
        except OSError as exc:
            log.warning("volume store: cannot remove the record of volume %s: %s", record.id, exc)

    def _remove_record(self, volume_id: str) -> None:
        (self._records_dir / f"{volume_id}{RECORD_SUFFIX}").unlink(missing_ok=True)
        fsync_dir(self._records_dir)

    async def _call(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        return await self._hypervisor.call(fn)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)



if TYPE_CHECKING:
    def _is_a_volume_catalog(store: VolumeStore) -> VolumeCatalog:
        return store  # mypy checks that VolumeStore has the protocol's methods and signatures


@attrs.frozen
class _Described:
    """What libvirt says of one volume."""

    name: str
    capacity: int  # bytes
    allocation: int  # bytes
    format: str  # from its XML; "" if it says none
    path: str
    backing: str = ""  # the path of its backing file, if it has one


# -- checks ----------------------------------------------------------------------------------------------


def _swap_content(path: str) -> str | None:
    """What the first page of the file at `path` holds: "swap" (mkswap's signature), "blank" (zeros) or "other";
    None if `path` is not a regular file. Blocking."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as file:
            page = file.read(SWAP_PAGE)
    except OSError:
        return None
    if page[SWAP_PAGE - len(SWAP_SIGNATURE):] == SWAP_SIGNATURE:
        return "swap"
    return "blank" if not page.strip(b"\0") else "other"


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


def _names_of(volume_id: str) -> tuple[str, ...]:
    """The names a volume `volume_id` may have in a pool (module doc)."""
    return (volume_id, *(f"{volume_id}.{fmt}" for fmt in VOLUME_FORMATS))


def _id_of(name: str) -> str | None:
    """The volume id of a volume named ``<id>.<fmt>``, or None for a name of another kind."""
    volume_id, dot, fmt = name.rpartition(".")
    return volume_id if dot and fmt in VOLUME_FORMATS and is_valid_volume_id(volume_id) else None


def _mb(size: int) -> int:
    return -(-size // MIB)


def _message(exc: Exception) -> str:
    return error_text(exc) if isinstance(exc, libvirt.libvirtError) else str(exc)


def _failure(exc: Exception, what: str) -> LauncherError:
    """A libvirt failure as a LauncherError: volume_exists, storage_full (ENOSPC, EDQUOT) or volume_failure,
    with libvirt's message."""
    message = _message(exc)
    if isinstance(exc, libvirt.libvirtError) and exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
        return LauncherError(errors.VOLUME_EXISTS, f"{what}: {message}")
    if any(marker in message for marker in _FULL_MARKERS):
        return LauncherError(errors.STORAGE_FULL, f"node storage full: {what}: {message}")
    return LauncherError(errors.VOLUME_FAILURE, f"{what}: {message}")


# -- blocking libvirt helpers (run by Hypervisor.call) --------------------------------------------------------


def _pool_xml(name: str, path: Path, mode: int, uid: int, gid: int) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = str(path)
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = f"{mode:04o}"
    ET.SubElement(permissions, "owner").text = str(uid)
    ET.SubElement(permissions, "group").text = str(gid)
    return ET.tostring(pool, encoding="unicode")


def _lookup_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    try:
        return conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            return None
        raise


def _ensure_dir_pool(conn: libvirt.virConnect, name: str, path: Path, xml: str, local: bool) -> None:
    """Define, build, start and autostart the own pool, or adopt it (module doc). SetupError if a pool of that
    name is something else. `local`: libvirt runs on this host (its directory can be checked here)."""
    pool = _lookup_pool(conn, name)
    if pool is None:
        pool = conn.storagePoolDefineXML(xml, 0)
        log.info("volume store: defined storage pool %s at %s", name, path)
    else:
        root = ET.fromstring(pool.XMLDesc(0))
        kind, where = root.get("type"), root.findtext("target/path")
        if kind != "dir" or where is None or Path(where) != path:
            raise SetupError(f"qemu.volumes: libvirt already has a storage pool {name!r} ({kind} pool at "
                             f"{where}), which is not this data dir's {path}: remove it (virsh pool-destroy "
                             f"{name}; virsh pool-undefine {name}) or set qemu.volumes.pool to a pool to use")
    if local and pool.isActive() and not path.is_dir():
        pool.destroy()  # its directory was removed behind libvirt's back: build it again
    if not pool.isActive():
        pool.build(0)  # creates the directory, or gives an existing one the pool's owner and mode
        pool.create(0)
    if not pool.autostart():
        pool.setAutostart(1)


def _find_pool(conn: libvirt.virConnect, name: str) -> None:
    pool = _lookup_pool(conn, name)
    if pool is None:
        raise SetupError(f"qemu.volumes.pool: libvirt has no storage pool {name!r} (virsh pool-list --all; "
                         "define it, or leave qemu.volumes.pool empty for the launcher's own pool)")
    if not pool.isActive():
        raise SetupError(f"qemu.volumes.pool: the storage pool {name!r} is not active (virsh pool-start {name})")


def _set_dir_mode(path: Path, uid: int, gid: int, mode: int) -> None:
    info = os.stat(path)
    if (info.st_uid, info.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)


def _volume_names(conn: libvirt.virConnect, pool: str) -> builtins.list[str]:
    storage = conn.storagePoolLookupByName(pool)
    storage.refresh(0)  # files made or removed behind libvirt's back (a dir pool caches its listing)
    return [volume.name() for volume in storage.listAllVolumes(0)]


def _lookup_volume(conn: libvirt.virConnect, pool: str, name: str) -> libvirt.virStorageVol | None:
    try:
        return conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def _existing(conn: libvirt.virConnect, pool: str, names: tuple[str, ...]) -> str:
    """The first of `names` that is a volume of `pool`, or ""."""
    for name in names:
        if _lookup_volume(conn, pool, name) is not None:
            return name
    return ""


def _create_volume(conn: libvirt.virConnect, pool: str, xml: str) -> None:
    conn.storagePoolLookupByName(pool).createXML(xml, 0)


def _delete_volume(conn: libvirt.virConnect, pool: str, name: str) -> None:
    volume = _lookup_volume(conn, pool, name)
    if volume is not None:
        volume.delete(0)


def _resize_volume(conn: libvirt.virConnect, pool: str, name: str, capacity: int) -> None:
    volume = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
    volume.resize(capacity, 0)


def _describe_volume(volume: libvirt.virStorageVol) -> _Described:
    _kind, capacity, allocation = volume.info()
    xml = ET.fromstring(volume.XMLDesc(0))
    fmt = xml.find("target/format")
    return _Described(volume.name(), capacity, allocation, "" if fmt is None else fmt.get("type", ""),
                      volume.path(), xml.findtext("backingStore/path") or "")


def _describe_one(conn: libvirt.virConnect, pool: str, name: str) -> _Described | None:
    volume = _lookup_volume(conn, pool, name)
    return None if volume is None else _describe_volume(volume)


def _describe_all(conn: libvirt.virConnect, pool: str) -> builtins.list[_Described]:
    found = []
    for volume in conn.storagePoolLookupByName(pool).listAllVolumes(0):
        if _id_of(volume.name()) is None:
            continue
        try:
            found.append(_describe_volume(volume))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise  # else deleted meanwhile
    return found
