"""A container's volumes: raw volumes of the node's volume store, loop-mounted on the host and bind-mounted into
the container at ``/volumes/<volume id>``, as ciao mapped and mounted its volumes into its containers
(reference §10).

The store is the node's (the one /v1/volumes serves, another virtualizer's: `Backend.use_volume_store`), so a
volume means the same to a container as to a VM: made, resized and deleted through the volume API, used by one
instance at a time (the supervisor's reservations), ``ephemeral`` ones deleted with the instance.

- **Which volumes**: raw ones kept as files (a dir pool); a qcow2 volume cannot be mounted without QEMU and is
  refused with the reason. At its first mount, a volume whose first MiB is zeroes and in which ``blkid`` finds
  nothing gets an ext4 file system; one that holds anything else that is not a file system (a VM's partition
  table, say) is refused, never overwritten.
- **Where**: ``<data_dir>/docker-mounts/<instance uuid>/<volume id>``, outside the instance dir, so that removing
  an instance dir can never reach into a volume still mounted there.
- **When**: `mount_all` before the container starts (a mount left by an earlier run, across a launcher restart,
  is kept); `unmount_all` once it is stopped and when the instance is deleted; `launcher hard-reset` unmounts
  every one of the data dir. Mounts are ``nodev,nosuid``.

Every tool (``mount``, ``umount``, ``blkid``, ``mkfs.ext4``) runs under `run_tool`'s bound; failures raise
`MountError` naming the volume.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import trio

from launcher.plugin.protocol import VolumeInfo
from launcher.plugin.tools import ToolError, run_tool

MOUNTS_DIR = "docker-mounts"  # under the data dir
CONTAINER_DIR = "/volumes"  # where a container sees its volumes
TOOL_TIMEOUT_S = 120.0  # mkfs.ext4 of a large volume is the longest
BLANK_BYTES = 1 << 20


class MountError(Exception):
    """A volume that cannot be mounted for a container; the message names it and says why."""


def mounts_root(data_dir: Path) -> Path:
    """Where every container's volume mounts are: ``<data_dir>/docker-mounts``."""
    return data_dir / MOUNTS_DIR


def mount_point(data_dir: Path, instance_uuid: str, volume_id: str) -> Path:
    """Where the volume `volume_id` of instance `instance_uuid` is mounted on the host."""
    return mounts_root(data_dir) / instance_uuid / volume_id


def binds(data_dir: Path, instance_uuid: str, volume_ids: Sequence[str]) -> list[str]:
    """The engine's bind specs for the instance's volumes: host mount point → ``/volumes/<id>``."""
    return [f"{mount_point(data_dir, instance_uuid, v)}:{CONTAINER_DIR}/{v}" for v in volume_ids]


def volume_problem(info: VolumeInfo) -> str | None:
    """Why a container cannot have the volume `info`, or None (no I/O)."""
    if info.format != "raw":
        return f"volume {info.id} is {info.format}: a container mounts raw volumes only (create one with format raw)"
    if not info.path:
        return f"volume {info.id} has no file on this host (its pool keeps no files): a container cannot mount it"
    return None


async def mount_all(data_dir: Path, instance_uuid: str, volumes: Sequence[VolumeInfo],
                    limiter: trio.CapacityLimiter) -> list[str]:
    """Mount each volume at its mount point (made if missing), formatting a blank one first; a mount already there
    is kept. What was done, one line per volume. MountError on the first that fails (those before stay mounted:
    `unmount_all` takes them down)."""
    done = []
    for info in volumes:
        problem = volume_problem(info)
        if problem is not None:
            raise MountError(problem)
        point = mount_point(data_dir, instance_uuid, info.id)
        await trio.to_thread.run_sync(_make_dirs, point, limiter=limiter)
        if await trio.to_thread.run_sync(os.path.ismount, point, limiter=limiter):
            done.append(f"volume {info.id} is mounted at {point} already")
            continue
        formatted = await _format_if_blank(info, limiter)
        try:
            await run_tool(["mount", "-o", "loop,nodev,nosuid", info.path, point], timeout_s=TOOL_TIMEOUT_S)
        except ToolError as exc:
            raise MountError(f"cannot mount volume {info.id}: {exc}") from exc
        done.append(f"volume {info.id} {'formatted (ext4) and ' if formatted else ''}mounted at {point}")
    return done


async def unmount_all(data_dir: Path, instance_uuid: str, limiter: trio.CapacityLimiter) -> list[str]:
    """Unmount every volume of the instance and remove its mount points; the ids unmounted. MountError if one
    stays mounted (it is then left, with its dir, for a later try)."""
    root = mounts_root(data_dir) / instance_uuid
    names = await trio.to_thread.run_sync(_list, root, limiter=limiter)
    unmounted = []
    for name in names:
        point = root / name
        if await trio.to_thread.run_sync(os.path.ismount, point, limiter=limiter):
            try:
                await run_tool(["umount", point], timeout_s=TOOL_TIMEOUT_S)
            except ToolError as exc:
                raise MountError(f"cannot unmount volume {name} from {point}: {exc}") from exc
            unmounted.append(name)
        await trio.to_thread.run_sync(_remove_dir, point, limiter=limiter)
    await trio.to_thread.run_sync(_remove_dir, root, limiter=limiter)
    return unmounted


async def instances_with_mounts(data_dir: Path, limiter: trio.CapacityLimiter) -> list[str]:
    """The uuids of the instances that have a mount dir (`launcher hard-reset` unmounts them all)."""
    return await trio.to_thread.run_sync(_list, mounts_root(data_dir), limiter=limiter)


async def _format_if_blank(info: VolumeInfo, limiter: trio.CapacityLimiter) -> bool:
    """Give a blank volume an ext4 file system; whether it did. MountError if it holds something that is no file
    system."""
    try:
        await run_tool(["blkid", "-p", info.path], timeout_s=TOOL_TIMEOUT_S)
        return False  # blkid found a file system (or another signature: mount says which it cannot take)
    except ToolError as exc:
        if exc.returncode != 2:  # 2: nothing found
            raise MountError(f"cannot probe volume {info.id}: {exc}") from exc
    if not await trio.to_thread.run_sync(_starts_blank, info.path, limiter=limiter):
        raise MountError(f"volume {info.id} holds data that is no file system a container can mount (blkid finds "
                         "none): a container mounts a raw volume with a file system, or a blank one")
    try:
        await run_tool(["mkfs.ext4", "-q", "-F", "-L", info.id[:16], info.path], timeout_s=TOOL_TIMEOUT_S)
    except ToolError as exc:
        raise MountError(f"cannot make a file system on volume {info.id}: {exc}") from exc
    return True


def _starts_blank(path: str) -> bool:
    """Whether the file's first BLANK_BYTES are zeroes (a volume nobody wrote to)."""
    with open(path, "rb") as f:
        head = f.read(BLANK_BYTES)
    return head.count(0) == len(head)


def _make_dirs(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _list(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except FileNotFoundError:
        return []


def _remove_dir(path: Path) -> None:
    """Remove an empty dir; one that is gone or not empty (never removed with what it holds) is left."""
    try:
        path.rmdir()
    except OSError:
        pass
