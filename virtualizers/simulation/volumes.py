"""The simulation's volume store: each volume is a small JSON file, `<data_dir>/sim-volumes/<id>.json`, that
says what a real store would hold (size, format, source image). It implements the whole `VolumeCatalog`
contract, so that the API, scale and fault tests cover volumes without libvirt.

A simulated image has no size of its own: a volume made from one with `size_mb` 0 is `IMAGE_SIZE_MB`.
Allocation is a tenth of the size (as the simulation's instance stats are). Blocking file work runs in the
host's worker threads.
"""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

import attrs
import trio

from launcher.plugin import errors, files
from launcher.plugin.errors import LauncherError
from launcher.plugin.locks import KeyedLocks
from launcher.plugin.protocol import VolumeInfo, is_valid_volume_id

log = logging.getLogger(__name__)

VOLUMES_DIR = "sim-volumes"
IMAGE_SIZE_MB = 2048


class SimulatedVolumes:
    """`VolumeCatalog` over JSON files in `root`."""

    def __init__(self, root: Path, limiter: trio.CapacityLimiter) -> None:
        self.root = root
        self.limiter = limiter
        self._locks = KeyedLocks()  # one operation per id at a time: a resize never rewrites a deleted volume

    async def open(self) -> None:
        """Make the store's dir (durably), and remove the temp files of writes a crash interrupted."""
        await trio.to_thread.run_sync(self._prepare, limiter=self.limiter)

    async def list(self) -> builtins.list[VolumeInfo]:
        return await trio.to_thread.run_sync(self._read_all, limiter=self.limiter)

    async def get(self, volume_id: str) -> VolumeInfo:
        volume = await trio.to_thread.run_sync(self._read, volume_id, limiter=self.limiter)
        if volume is None:
            raise LauncherError(errors.NOT_FOUND, f"no volume {volume_id}")
        return volume

    async def create(self, volume_id: str, size_mb: int, fmt: str, *, source_image: str = "",
                     clone: str = "cow") -> VolumeInfo:
        if source_image and clone == "cow" and fmt != "qcow2":
            raise LauncherError(errors.INVALID_DATA, "format: a copy-on-write clone of an image must be qcow2")
        size = size_mb or IMAGE_SIZE_MB
        if source_image and size < IMAGE_SIZE_MB:
            raise LauncherError(errors.INVALID_DATA, f"size_mb: {size} is smaller than image {source_image} "
                                                     f"({IMAGE_SIZE_MB} MiB)")
        volume = VolumeInfo(id=volume_id, size_mb=size, allocation_mb=size // 10, format=fmt,
                            source_image=source_image, clone=clone if source_image else "",
                            path=str(self._path(volume_id)))
        async with self._locks.hold(volume_id):
            await trio.to_thread.run_sync(self._write, volume, True, limiter=self.limiter)
        return volume

    async def delete(self, volume_id: str) -> None:
        async with self._locks.hold(volume_id):
            await self.get(volume_id)
            await trio.to_thread.run_sync(self._remove, volume_id, limiter=self.limiter)

    async def resize(self, volume_id: str, size_mb: int) -> VolumeInfo:
        async with self._locks.hold(volume_id):
            volume = await self.get(volume_id)
            if size_mb < volume.size_mb:
                raise LauncherError(errors.INVALID_DATA, f"size_mb: {size_mb} is smaller than the volume "
                                                         f"({volume.size_mb} MiB): volumes only grow")
            grown = attrs.evolve(volume, size_mb=size_mb, allocation_mb=size_mb // 10)
            await trio.to_thread.run_sync(self._write, grown, False, limiter=self.limiter)
        return grown

    # ----------------------------------------------------------------- files (worker threads)

    def _path(self, volume_id: str) -> Path:
        if not is_valid_volume_id(volume_id):
            raise LauncherError(errors.INVALID_DATA, f"{volume_id[:70]!r} is not a volume id")
        return self.root / f"{volume_id}.json"

    def _prepare(self) -> None:
        files.make_dirs(self.root, mode=0o700)
        for leftover in self.root.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def _read(self, volume_id: str) -> VolumeInfo | None:
        """The volume, None if there is none; LauncherError (volume_failure) if its file cannot be read as one."""
        path = self._path(volume_id)
        try:
            return VolumeInfo(**json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise LauncherError(errors.VOLUME_FAILURE, f"volume {volume_id}: its record {path} is unreadable "
                                                       f"({type(exc).__name__}: {exc})") from None

    def _read_all(self) -> builtins.list[VolumeInfo]:
        found = []
        for path in sorted(self.root.glob("*.json")):
            try:
                volume = self._read(path.stem)
            except LauncherError as exc:  # one broken record must not hide the others
                log.error("%s", exc.reason)
                continue
            if volume is not None:
                found.append(volume)
        return found

    def _write(self, volume: VolumeInfo, new: bool) -> None:
        path = self._path(volume.id)
        data = json.dumps(attrs.asdict(volume)).encode()
        try:
            if new:  # claims the id atomically: two creates of one id never both succeed
                files.create_new(path, data)
            else:
                files.atomic_write(path, data)
        except FileExistsError:
            raise LauncherError(errors.VOLUME_EXISTS, f"volume {volume.id} exists") from None
        except OSError as exc:
            raise errors.write_failure(exc, path.name, errors.VOLUME_FAILURE) from exc

    def _remove(self, volume_id: str) -> None:
        self._path(volume_id).unlink(missing_ok=True)
        files.fsync_dir(self.root)
