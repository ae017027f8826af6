"""Did the host reboot since the launcher last ran? The kernel's boot id, remembered in the data dir.

Linux gives every boot a random id (/proc/sys/kernel/random/boot_id). The launcher keeps the id of the boot it
last finished recovering in `<data_dir>/boot-id`. At start-up, a different id means the host rebooted since
(every VM is gone because the host went down); the same id means only the launcher restarted (a VM that is gone
crashed). No file (a new data dir, or one of a launcher older than this) or no readable id means "unknown",
which recovery treats as "not rebooted".

The new id is written only once recovery has settled every instance (`remember`), so a launcher killed while
it is still restarting the VMs of a reboot sees the old id again and carries on.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from launcher.plugin import files

KERNEL_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
BOOT_ID_FILE = "boot-id"


@attrs.frozen
class HostBoot:
    """This boot of the host, against the one the data dir remembers."""

    current: str | None  # this boot's id; None if the kernel does not tell
    rebooted: bool  # the data dir names another boot: the host rebooted since the launcher last ran


def detect(data_dir: Path) -> HostBoot:
    """Compare this boot's id with the one remembered in `data_dir` (blocking)."""
    current = _read(KERNEL_BOOT_ID)
    previous = _read(data_dir / BOOT_ID_FILE)
    return HostBoot(current, rebooted=current is not None and previous is not None and previous != current)


def remember(data_dir: Path, boot: HostBoot) -> None:
    """Record `boot` as the boot the data dir's instances were last recovered in (blocking; durable)."""
    if boot.current is not None:
        files.atomic_write(data_dir / BOOT_ID_FILE, boot.current.encode() + b"\n")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
