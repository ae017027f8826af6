"""Build the small bootable guest disk image used by the tests and the README's "Try it".

Contract
--------
``ensure_guest_image(cache_dir)`` returns ``cache_dir/guest-<key>.qcow2``, building it first if it
is absent. ``<key>`` is a short hash of this file, of the files it puts in the guest (``init``,
``power-button``, ``udhcpc-script``, ``on-uevent``) and of the Debian package versions used, so any change to them
makes a new image.
The image is built into a temporary file and renamed into place; an exclusive lock on
``cache_dir/build.lock`` keeps concurrent callers from building it twice. Old images are left in
place (overlays may still use them as backing files).

CLI: ``python tests/guest/build.py [--cache-dir DIR]`` prints the image path (default cache dir:
``<repo>/.cache/guest``).

The image (qcow2, usable as a backing file) boots on QEMU q35 with SeaBIOS or OVMF (no Secure
Boot), 256 MiB of RAM being enough, its disk attached as virtio-blk. Layout (MBR, 37 MiB):

- sector 0: GRUB's ``boot.img``; sectors 1..2047: GRUB's ``core.img`` (legacy BIOS);
- partition 1, FAT, label GUESTBOOT, type EF (the EFI system partition): ``/vmlinuz``,
  ``/initrd.img``, systemd-boot as ``/EFI/BOOT/BOOTX64.EFI`` and its ``/loader`` config;
- partition 2, FAT, label GUESTDATA: the guest's writable partition (``/boots``, the boot counter).

Both bootloaders start the kernel at once (no menu, no timeout) with ``KERNEL_CMDLINE``
(serial console on ttyS0, no timer check). The initramfs holds a static busybox, the kernel modules of
``MODULES`` (and their dependencies) and the ``init`` script next to this file, which runs as
PID 1 and never exits. On each boot the guest prints one line on ttyS0::

    guest-ready instance-id=<id> hostname=<name> user-data-sha256=<hex> datasource=<nocloud|configdrive|none>
    boots=<n> disks=<dev>:<serial>,... marks=<dev>:<mark>,...

(one line, wrapped here), reading the seed from an ISO 9660 NoCloud (volume ``cidata``) or
ConfigDrive (volume ``config-2``) seed, e.g. a SATA cdrom. ``boots`` counts the boots of this disk
(or of the overlay on top of it) including this one; ``disks`` lists the virtio disks it sees with
their serials (``-`` for none; virtio-blk shows at most 20 characters of a serial); ``marks`` what the
first 64 bytes of each data disk (every virtio disk but ``vda``) held: ``<instance-id>:<boots>`` written by a
guest that booted with it, or ``-``. After that line the guest writes its own mark on each data disk (durably),
and prints ``guest-disks disks=... marks=...`` whenever its disks change (a hot-plug or hot-unplug, seen
within 0.2 s). An ACPI power button press makes it print ``guest-poweroff``, sync, unmount its disk and power
off. With ``test_guest_mode: ignore-unplug`` as a top-level key of its user-data, the guest ignores hot-unplug
requests: once it has seen a hot-plugged disk it prints ``guest-holds-disks gpes=<the ACPI GPEs it disabled>
disks=...`` and disables the ACPI general-purpose events that announced it (QEMU's q35 signals PCI hot-plug and
unplug through one), so the disk stays (a DETACH then runs into its timeout).

Right after its guest-ready line the guest prints one line of what a clone must not share (see "Template clones")::

    guest-identity instance-id=<id> hostname=<name> rng=<16 bytes of /dev/urandom, hex> macs=<nic>=<mac>,...|none
    time=<wall clock, s> reidentified=<n> vmgenid=<yes|no> gpe05=<count>

With ``test_guest_mode: net-probe <ipv4>`` in its user-data, the guest, after its guest-ready line (which does not
wait for it), waits for ``eth0`` (the virtio-net driver, ``NET_MODULES``, is loaded at every boot), brings it up, asks
DHCP for an address (busybox ``udhcpc``, bounded: about 20 s at most; its hook ``udhcpc-script`` applies the
lease), pings ``<ipv4>`` (up to 5 tries of one echo request, 2 s each) and prints one line::

    guest-net addr=<address/prefix|none> gw=<router|none> probe=<ipv4> reached=<yes|no>

``reached=no`` also when there was no lease (``addr=none``).

Template clones (issue 19): the guest copies its seed's files to ``/run/seed`` and unmounts the seed at once. A
change of its VM generation ID (seen as one more ACPI GPE 05 event, QEMU's vmgenid notification, in
``/sys/firmware/acpi/interrupts/gpe05``; or a ``NEW_VMGENID=1`` uevent, which kernels >= 6.10 send), or a line
holding ``reidentify`` typed on its serial console (console echo is off), makes it, within 0.1 s: set its clock from
the RTC
(the RTC read from sysfs, ``hwclock -s -u`` if that fails), read the seed again, print its ``guest-ready`` line
again with the new identity, then a
``guest-identity`` line with ``reidentified`` one higher and a fresh RNG value. A hot-plugged NIC (a ``net`` add
uevent, seen by busybox ``uevent`` running ``on-uevent``) makes it print ``guest-nic-added nic=<nic> mac=<mac>``,
bring the NIC up, ask DHCP (bounded: about 10 s) and print ``guest-nic-up nic=<nic> mac=<mac> addr=<a/p|none>``.

Inputs come only from Debian packages, fetched with ``apt-get download`` (the apt lists must be
up to date) and unpacked with ``dpkg-deb -x``: ``linux-image-amd64`` (resolved to its
``linux-image-<abi>-amd64``), ``busybox-static``, ``grub-pc-bin``, ``systemd-boot-efi``.
Host tools, from these Debian 12 packages: apt, dpkg, grub-common (grub-mkimage), mtools
(mformat, mcopy), qemu-utils (qemu-img). No root, loop device or mount is needed.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = HERE.parent.parent / ".cache" / "guest"
GUEST_FILES = (HERE / "init", HERE / "power-button", HERE / "udhcpc-script", HERE / "on-uevent")

KERNEL_METAPACKAGE = "linux-image-amd64"
PACKAGES = ("busybox-static", "grub-pc-bin", "systemd-boot-efi")

# Loaded by init in this order, each after its dependencies: the virtio disk, the SATA cdrom
# and its file system, the FAT data partition, the ACPI power button as an input device.
MODULES = (
    "virtio_pci", "virtio_blk",
    "ahci", "sr_mod", "isofs", "nls_utf8",
    "vfat", "nls_cp437", "nls_ascii",
    "button", "evdev",
)
# Loaded after MODULES (each after its dependencies: failover, net_failover) at every boot: a template clone's NIC is
# hot-plugged after its restore.
NET_MODULES = ("virtio_net",)
# no_timer_check: under TCG on a loaded host (20 guests booting on 2 cores) the kernel's check that the timer
# interrupt works can miss its window and panic ("IO-APIC + timer doesn't work!"); virtual machines skip it.
KERNEL_CMDLINE = "console=ttyS0,115200 quiet loglevel=3 no_timer_check"

SECTOR = 512
MIB = 1024 * 1024 // SECTOR  # in sectors
BOOT_PARTITION = (1 * MIB, 32 * MIB)  # (first sector, sectors)
DATA_PARTITION = (33 * MIB, 4 * MIB)
DISK_SECTORS = 37 * MIB
DISK_SIGNATURE = 0x4C41554E


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    """Run a host tool; raise with its output if it fails."""
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


# --- package versions and cache key -------------------------------------------------------------

def apt_candidates(packages: list[str]) -> dict[str, dict[str, str]]:
    """The apt candidate stanza (Version, Depends, ...) of each package."""
    stanzas: dict[str, dict[str, str]] = {}
    for block in run("apt-cache", "show", "--no-all-versions", *packages).split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != " ")
        if "Package" in fields:
            stanzas[fields["Package"]] = fields
    missing = set(packages) - stanzas.keys()
    if missing:
        raise RuntimeError(f"apt has no candidate for {sorted(missing)} (run apt-get update?)")
    return stanzas


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Map the kernel (``KERNEL_METAPACKAGE`` resolved to its ``linux-image-<abi>-amd64``) and each of `packages`
    to its apt candidate version."""
    meta = apt_candidates([KERNEL_METAPACKAGE])[KERNEL_METAPACKAGE]
    kernel = next(dep.split()[0] for dep in meta["Depends"].split(", ") if dep.startswith("linux-image-"))
    stanzas = apt_candidates([kernel, *packages])
    return {name: stanzas[name]["Version"] for name in (kernel, *packages)}


def cache_key(versions: dict[str, str], files: tuple[Path, ...] = (Path(__file__).resolve(), *GUEST_FILES)) -> str:
    """Short hash of everything an image is made from: the package `versions` and the `files` (by default, this
    builder and what it puts in the guest)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name, version in sorted(versions.items()):
        digest.update(f"{name}={version}\n".encode())
    return digest.hexdigest()[:12]


# --- Debian inputs -------------------------------------------------------------------------------

def fetch_packages(versions: dict[str, str], scratch: Path) -> dict[str, Path]:
    """Download the exact package versions and unpack each into ``scratch/<name>``."""
    debs = scratch / "debs"
    debs.mkdir()
    run("apt-get", "download", "-q", *(f"{name}={version}" for name, version in versions.items()), cwd=debs)
    roots = {}
    for name in versions:
        (deb,) = debs.glob(f"{name}_*.deb")
        roots[name] = scratch / name
        run("dpkg-deb", "-x", deb, roots[name])
    return roots


def elf_modinfo(ko: Path) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module (ELF64 little endian)."""
    data = ko.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + index * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if data[strtab + name:data.index(b"\0", strtab + name)] == b".modinfo":
            pairs = (item.decode().split("=", 1) for item in data[offset:offset + size].split(b"\0") if b"=" in item)
            return {key: value for key, value in pairs}
    raise RuntimeError(f"{ko}: no .modinfo section")


def module_name(name: str) -> str:
    """The kernel treats "-" and "_" in module names alike."""
    return name.replace("-", "_")


def module_closure(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files of ``wanted`` and their dependencies, dependencies first; built-ins skipped."""
    files = {module_name(ko.stem): ko for ko in (moddir / "kernel").rglob("*.ko")}
    builtin = {module_name(Path(line).stem) for line in (moddir / "modules.builtin").read_text().split()}
    ordered: list[Path] = []

    def visit(name: str) -> None:
        name = module_name(name)
        if name in builtin or files.get(name) in ordered:
            return
        if name not in files:
            raise RuntimeError(f"kernel module {name} not found in {moddir}")
        for dep in filter(None, elf_modinfo(files[name]).get("depends", "").split(",")):
            visit(dep)
        ordered.append(files[name])

    for name in wanted:
        visit(name)
    return ordered


# --- initramfs -----------------------------------------------------------------------------------

def cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (path, mode, data, rdev) entries, owned by root, mtime 0."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (path, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], start=1):
        name = path.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(name), 0)
        out += b"070701" + "".join(f"{f:08X}" for f in fields).encode() + name
        pad()
        out += data
        pad()
    return bytes(out)


def initramfs(busybox: Path, modules: Sequence[Path], net_modules: Sequence[Path] = ()) -> bytes:
    """The gzip'ed initramfs: busybox, the init script, the acpid handler, udhcpc's hook, the uevent handler, the
    modules (`modules` listed in ``load.list``, then `net_modules` in ``net.list``; init loads both at every boot)."""
    directory, executable, regular = 0o040755, 0o100755, 0o100644
    entries: list[tuple[str, int, bytes, int]] = [
        (name, directory, b"", 0)
        for name in ("bin", "dev", "proc", "sys", "run", "mnt", "mnt/seed", "mnt/data", "etc", "etc/acpi",
                     "etc/acpi/PWRF", "lib", "lib/modules", "etc/udhcpc")
    ]
    entries += [
        ("dev/console", 0o020600, b"", os.makedev(5, 1)),
        ("bin/busybox", executable, busybox.read_bytes(), 0),
        ("bin/sh", 0o120777, b"busybox", 0),
        ("init", executable, (HERE / "init").read_bytes(), 0),
        # busybox acpid runs /etc/acpi/PWRF/00000080 for the power button (its default table).
        ("etc/acpi/PWRF/00000080", executable, (HERE / "power-button").read_bytes(), 0),
        # busybox udhcpc runs it to apply a lease (init names it with -s; Debian's busybox also defaults to it).
        ("etc/udhcpc/default.script", executable, (HERE / "udhcpc-script").read_bytes(), 0),
        # busybox uevent runs it for every kernel uevent (init starts `uevent /etc/on-uevent`).
        ("etc/on-uevent", executable, (HERE / "on-uevent").read_bytes(), 0),
        ("lib/modules/load.list", regular, "".join(f"{ko.stem}\n" for ko in modules).encode(), 0),
        ("lib/modules/net.list", regular, "".join(f"{ko.stem}\n" for ko in net_modules).encode(), 0),
    ]
    entries += [(f"lib/modules/{ko.name}", regular, ko.read_bytes(), 0) for ko in [*modules, *net_modules]]
    return gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)


# --- bootloaders and disk ------------------------------------------------------------------------

def grub_core(grub_pc: Path, scratch: Path, cmdline: str = KERNEL_CMDLINE,
              first_partition: int = BOOT_PARTITION[0]) -> Path:
    """GRUB's BIOS core.img, which boots /vmlinuz of partition 1 (FAT) at once with `cmdline`; it must fit
    between the MBR and `first_partition` (a sector).

    "(,msdos1)" means partition 1 of the disk GRUB was loaded from. The embedded config runs
    in GRUB's rescue parser: no menu, no timeout.
    """
    config, core = scratch / "grub.cfg", scratch / "core.img"
    config.write_text(f"linux /vmlinuz {cmdline}\ninitrd /initrd.img\nboot\n")
    run("grub-mkimage", "-O", "i386-pc", "-d", grub_pc / "usr/lib/grub/i386-pc", "-o", core,
        "-c", config, "-p", "(,msdos1)/", "biosdisk", "part_msdos", "fat", "linux")
    if core.stat().st_size > (first_partition - 1) * SECTOR:
        raise RuntimeError("core.img does not fit before the first partition")
    return core


def efi_tree(tree: Path, systemd_boot: Path) -> None:
    """systemd-boot as the removable-media loader, with one entry and no menu.

    Not GRUB: GRUB 2.06 keeps a quarter of the RAM as its heap and then fails to find the
    64 MiB the kernel needs to decompress in a 256 MiB guest.
    """
    (tree / "EFI/BOOT").mkdir(parents=True)
    shutil.copyfile(systemd_boot / "usr/lib/systemd/boot/efi/systemd-bootx64.efi", tree / "EFI/BOOT/BOOTX64.EFI")
    (tree / "loader/entries").mkdir(parents=True)
    (tree / "loader/loader.conf").write_text("timeout 0\ndefault guest.conf\neditor no\n")
    (tree / "loader/entries/guest.conf").write_text(
        f"title Launcher test guest\nlinux /vmlinuz\ninitrd /initrd.img\noptions {KERNEL_CMDLINE}\n"
    )


def fat_image(path: Path, sectors: int, label: str, tree: Path | None = None) -> None:
    """A FAT file system image of ``sectors``, holding a copy of the directory ``tree``."""
    with path.open("wb") as image:
        image.truncate(sectors * SECTOR)
    # The geometry only feeds mformat's arithmetic; -N fixes the volume serial number.
    run("mformat", "-i", path, "-T", str(sectors), "-h", "64", "-s", "32", "-N", "4c41554e", "-v", label, "::")
    if tree is not None:
        run("mcopy", "-s", "-i", path, *sorted(tree.iterdir()), "::/")


def mbr(boot_code: bytes, partitions: list[tuple[int, int, int, bool]]) -> bytes:
    """Sector 0: GRUB's boot code and a partition table of (first sector, sectors, type, active)."""
    sector = bytearray(SECTOR)
    sector[:440] = boot_code[:440]  # boot.img reads core.img from sector 1, its default
    struct.pack_into("<I", sector, 440, DISK_SIGNATURE)
    chs_lba = b"\xfe\xff\xff"  # "use the LBA fields"
    for index, (first, count, kind, active) in enumerate(partitions):
        entry = struct.pack("<B3sB3sII", 0x80 if active else 0, chs_lba, kind, chs_lba, first, count)
        sector[446 + 16 * index:462 + 16 * index] = entry
    sector[510:] = b"\x55\xaa"
    return bytes(sector)


def raw_disk(path: Path, sectors: int, boot_img: Path, core: Path,
             partitions: list[tuple[int, int, int, bool, Path]]) -> None:
    """Assemble a sparse raw disk of `sectors`: the MBR with GRUB's `boot_img`, `core` right after it, and each
    partition (first sector, sectors, type, active, its file system image) copied in place."""
    with path.open("wb") as disk:
        disk.truncate(sectors * SECTOR)
        disk.write(mbr(boot_img.read_bytes(), [(first, count, kind, active)
                                               for first, count, kind, active, _ in partitions]))
        disk.write(core.read_bytes())
    for first, _, _, _, image in partitions:
        copy_sparse(image, path, first)


def copy_sparse(source: Path, disk: Path, first_sector: int) -> None:
    """Copy `source` into `disk` at `first_sector`, skipping blocks of zeros (the disk stays sparse)."""
    block = 1 << 20
    zeros = bytes(block)
    with source.open("rb") as src, disk.open("r+b") as dst:
        offset = first_sector * SECTOR
        while chunk := src.read(block):
            if chunk != zeros[:len(chunk)]:
                dst.seek(offset)
                dst.write(chunk)
            offset += len(chunk)


def build_image(versions: dict[str, str], dest: Path, scratch: Path) -> None:
    """Build the qcow2 image at ``dest`` from the packages, working in ``scratch``."""
    roots = fetch_packages(versions, scratch)
    kernel_root = next(root for name, root in roots.items() if name.startswith("linux-image-"))
    (vmlinuz,) = (kernel_root / "boot").glob("vmlinuz-*")
    moddir = kernel_root / "lib/modules" / vmlinuz.name.removeprefix("vmlinuz-")

    tree = scratch / "boot"  # the boot partition's files
    efi_tree(tree, roots["systemd-boot-efi"])
    shutil.copyfile(vmlinuz, tree / "vmlinuz")
    modules = module_closure(moddir, MODULES)
    net_modules = [ko for ko in module_closure(moddir, MODULES + NET_MODULES) if ko not in modules]
    (tree / "initrd.img").write_bytes(initramfs(roots["busybox-static"] / "bin/busybox", modules, net_modules))
    core = grub_core(roots["grub-pc-bin"], scratch)

    boot_fs, data_fs, raw = scratch / "boot.fat", scratch / "data.fat", scratch / "disk.raw"
    fat_image(boot_fs, BOOT_PARTITION[1], "GUESTBOOT", tree)
    fat_image(data_fs, DATA_PARTITION[1], "GUESTDATA")
    raw_disk(raw, DISK_SECTORS, roots["grub-pc-bin"] / "usr/lib/grub/i386-pc/boot.img", core,
             [(*BOOT_PARTITION, 0xEF, True, boot_fs), (*DATA_PARTITION, 0x0E, False, data_fs)])
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, dest)


def ensure_guest_image(cache_dir: Path) -> Path:
    """Return the cached guest image for the current inputs, building it if it is absent."""
    versions = package_versions()
    return cached_image(cache_dir, f"guest-{cache_key(versions)}.qcow2", "build",
                        lambda dest, scratch: build_image(versions, dest, scratch))


def cached_image(cache_dir: Path, name: str, prefix: str, build: Callable[[Path, Path], None]) -> Path:
    """`cache_dir/name`, made first by `build(dest, scratch)` if it is absent. An exclusive lock on
    `cache_dir/<prefix>.lock` keeps concurrent callers from building it twice; the image is built in a scratch
    dir next to the cache (not in /tmp: a kernel package unpacks to ~400 MB) and renamed into place."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    image = cache_dir / name
    with (cache_dir / f"{prefix}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image.exists():
            with tempfile.TemporaryDirectory(prefix=f"{prefix}-", dir=cache_dir) as scratch:
                partial = Path(scratch) / image.name
                build(partial, Path(scratch))
                os.replace(partial, image)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find in the cache) the test guest image.")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    print(ensure_guest_image(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
