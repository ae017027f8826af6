"""Checks that the qemu virtualizer runs before `launcher serve` takes its first command.

Each problem found here would otherwise show up only at the first START, as a `launch_failure` (or a START that
hangs). Each check raises `SetupError` with one line that says what is wrong and what to do; `launcher serve`
prints it and exits with status 2. In order:

1. `accel: kvm` on a host where KVM cannot run (no vendor module, /dev/kvm missing or not usable).
2. The EFI firmware files (`ovmf_code`, `ovmf_vars`) exist: empty `fw_type` means EFI, so START needs them.
3. libvirt reports QEMU's domain capabilities for the configured machine and accelerator within the
   hypervisor's call bound. A libvirtd that cannot probe QEMU (e.g. stuck re-probing because its QEMU user
   cannot open /dev/kvm) would otherwise hang every domain start.
4. The user QEMU runs as (libvirt's DAC base label, read from libvirt's capabilities) can traverse every
   directory from / to the data dir's `instances/` and `images/`: QEMU opens the overlays, seeds and backing
   images there. Checked from the permission bits (owner, group with the user's supplementary groups, other)
   for a local libvirt only; a remote libvirt's QEMU sees other file systems.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import libvirt

from launcher.plugin.errors import SetupError
from virtualizers.qemu.hypervisor import Hypervisor, Unavailable, error_text

LIBVIRT_UP_HINT = "`bash .ci/libvirt-up` sets libvirt up and says what is missing"
_VENDOR_KVM_MODULES = ("kvm_intel", "kvm_amd")


def kvm_problem(modules: Path = Path("/sys/module"), device: Path = Path("/dev/kvm")) -> str | None:
    """Why hardware virtualization cannot run here, or None if it can.

    /dev/kvm alone is not enough: a nested paravirtual KVM (kvm_pvm) provides it but cannot boot ordinary
    guests, so a vendor module must be loaded too."""
    if not any((modules / name).exists() for name in _VENDOR_KVM_MODULES):
        return "no kvm_intel or kvm_amd module is loaded (does the CPU expose VT-x or AMD-V to this host?)"
    if not device.exists():
        return f"{device} does not exist"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} cannot be opened for reading and writing"
    return None


def check_accel(accel: str) -> None:
    if accel == "kvm" and (problem := kvm_problem()) is not None:
        raise SetupError(f"qemu.accel: kvm, but KVM cannot run on this host: {problem}; "
                         "use accel: auto (KVM where it works, else TCG) or accel: tcg")


def check_firmware(files: dict[str, Path]) -> None:
    """`files` maps setting names (`qemu.ovmf_code`, ...) to the firmware files they name."""
    for key, path in files.items():
        if not path.is_file():
            raise SetupError(f"{key}: {path} is not a file (install Debian's ovmf package, or set {key})")


async def check_capabilities(hypervisor: Hypervisor, machine: str, kvm: bool) -> None:
    virt_type = "kvm" if kvm else "qemu"

    def probe(conn: libvirt.virConnect) -> None:
        conn.getDomainCapabilities(None, "x86_64", machine, virt_type, 0)

    try:
        await hypervisor.call(probe)
    except Unavailable as exc:
        raise SetupError(f"libvirt did not report QEMU's capabilities: {exc}. A libvirtd whose QEMU user cannot "
                         f"open /dev/kvm re-probes QEMU forever; {LIBVIRT_UP_HINT}, then restart libvirtd") from exc
    except libvirt.libvirtError as exc:
        raise SetupError(f"libvirt at {hypervisor.uri} cannot run QEMU guests of machine {machine!r} with "
                         f"accelerator {virt_type}: {error_text(exc)} (check qemu.machine and qemu.accel; "
                         f"{LIBVIRT_UP_HINT})") from exc


@attrs.frozen
class QemuUser:
    """Whom QEMU runs as: libvirt's DAC base label."""

    uid: int
    gid: int
    name: str
    groups: frozenset[int]  # gid and the user's supplementary groups (libvirt gives QEMU those too)


async def check_reachable(hypervisor: Hypervisor, directories: list[Path]) -> QemuUser | None:
    """SetupError unless QEMU's user can traverse every directory of each path in `directories`. Returns that
    user, or None if there is none to care about (a remote libvirt, no DAC security model, QEMU run as root)."""
    if not is_local(hypervisor.uri):
        return None
    try:
        capabilities = await hypervisor.call(lambda conn: conn.getCapabilities())
    except (Unavailable, libvirt.libvirtError) as exc:
        raise SetupError(f"cannot read libvirt's capabilities at {hypervisor.uri}: {error_text(exc)}") from exc
    user = qemu_user(capabilities)
    if user is None or user.uid == 0:
        return None
    for directory in directories:
        blocked = first_blocked(directory, user)
        if blocked is not None:
            mode = stat.S_IMODE(blocked.stat().st_mode)
            raise SetupError(
                f"QEMU runs as {user.name} (uid {user.uid}), which cannot enter {blocked} (mode {mode:04o}), so it "
                f"could not open the disks under {directory}: allow it (e.g. chmod o+x {blocked}) or use a data "
                "dir on a path it can traverse, such as /var/lib/launcher")
    return user


def is_local(uri: str) -> bool:
    """A libvirt URI whose daemon runs on this host (qemu:///system, qemu+unix:///...)."""
    parts = urlsplit(uri)
    return parts.scheme in ("qemu", "qemu+unix") and not parts.hostname


def qemu_user(capabilities_xml: str) -> QemuUser | None:
    """The DAC base label of libvirt's capabilities as a user, or None if there is no DAC security model."""
    root = ET.fromstring(capabilities_xml)
    for model in root.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        label = model.findtext("baselabel")
        if not label or ":" not in label:
            return None
        owner, group = label.split(":", 1)
        uid = _id(owner, lambda name: pwd.getpwnam(name).pw_uid)
        gid = _id(group, lambda name: grp.getgrnam(name).gr_gid)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return QemuUser(uid, gid, f"uid {uid}", frozenset({gid}))
        return QemuUser(uid, gid, entry.pw_name, frozenset({gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)}))
    return None


def _id(text: str, by_name: Callable[[str], int]) -> int:
    """`+123` is a numeric id, anything else a name."""
    return int(text[1:]) if text.startswith("+") else by_name(text)


def first_blocked(path: Path, user: QemuUser) -> Path | None:
    """The first directory from / down to `path` that `user` may not search, or None."""
    for directory in _chain(path.absolute()):
        info = directory.stat()
        if info.st_uid == user.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in user.groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None


def _chain(path: Path) -> Iterator[Path]:
    yield from reversed(path.parents)
    yield path
