"""What the QEMU virtualizer keeps in an instance dir (docs/architecture.md §4.3), and the file work on it.

- ``overlay.qcow2`` (`OVERLAY`): the instance's disk, a qcow2 child of its backing image (none for an instance
  that boots from a volume). `make_overlay` creates it under a temp name and renames it into place, so that a
  half-made overlay never has the real name (create_image may run again after a crash: it overwrites);
- ``seed.iso`` (`SEED`): the cloud-init seed (cloudinit.py);
- ``nvram.fd`` (`NVRAM`): the EFI variables, libvirt's copy of the OVMF template (undefined with the domain);
- ``console.log`` (`CONSOLE_LOG`): the guest's serial console, written by virtlogd;
- ``slot`` (`slots.SLOT_FILE`), only while the domain is a claimed prepared slot (claim.py): the slot's id; the
  overlay, NVRAM and console are then in the slot's dir, and ``console.log`` here is a symlink to its console.

The overlay and the seed are committed with a directory fsync, and `make_dir_durable` makes the dir's own name
durable before they are made (the launcher's instance log does not).

The dir is the launcher's user's only (0700); `let_group_search` lets QEMU's group enter it, and libvirt hands
QEMU the disks it needs while the VM runs (dynamic_ownership). The plain functions here block: callers run them
in worker threads under the launcher's limiter.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import trio

from launcher.plugin.files import INSTANCE_DIR_MODE, fsync_dir
from virtualizers.qemu import qemu_img
from virtualizers.qemu.images import ImageInfo

OVERLAY = "overlay.qcow2"
SEED = "seed.iso"
NVRAM = "nvram.fd"
CONSOLE_LOG = "console.log"
MIB = 1 << 20


async def make_overlay(instance_dir: Path, image: ImageInfo, size: int, limiter: trio.CapacityLimiter) -> None:
    """Create `instance_dir`/overlay.qcow2, `size` bytes on `image`, replacing any earlier one. ToolError (from
    qemu-img) or OSError if that fails; the temp file is removed either way, and if cancelled."""
    overlay = instance_dir / OVERLAY
    tmp = overlay.with_name(OVERLAY + ".tmp")
    try:
        await qemu_img.create_overlay(tmp, image.path, image.format, size)
        await trio.to_thread.run_sync(_commit_file, tmp, overlay, limiter=limiter)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_unlink_quietly, tmp, limiter=limiter)


def let_group_search(directory: Path, gid: int) -> None:
    """QEMU's group may enter the instance dir, nobody else: its files stay the launcher's user's only, and
    libvirt hands QEMU the disks it needs (dynamic_ownership) while the VM runs."""
    os.chown(directory, -1, gid)
    os.chmod(directory, INSTANCE_DIR_MODE | stat.S_IXGRP)


def make_dir_durable(instance_dir: Path) -> None:
    """fsync the instances dir that holds `instance_dir`, so that the dir's name survives a power loss, and with
    it the files made durable in it (the overlay, the seed). The launcher's instance log (launcher/durable/
    persist.py) makes the dir without an fsync: after a power loss its replay makes it again holding
    instance.json alone, and an instance the log says was started would come back without its disk."""
    fsync_dir(instance_dir.parent)


def allocated_mb(path: Path) -> int:
    """MiB the file `path` takes on disk (its allocated blocks, not its size); -1 if it cannot be read."""
    try:
        return os.stat(path).st_blocks * 512 // MIB
    except OSError:
        return -1


def _commit_file(tmp: Path, final: Path) -> None:
    """fsync `tmp`, make it private (it holds the guest's disk) and rename it to `final`."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
