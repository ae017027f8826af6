"""Build the Debian 12 test guest: a real bookworm with Debian's real cloud-init, for end-to-end network tests.

Contract
--------
``ensure_debian_image(cache_dir)`` returns ``cache_dir/debian-<key>.qcow2``, building it first if it is
absent. ``<key>`` is a short hash of this file, of ``build.py`` (whose disk helpers it uses), of the files it
puts in the guest (``guest-net-report``, ``guest-net.service``) and of the apt candidate versions of the main
packages (kernel, systemd, cloud-init, ifupdown, openssh-server, GRUB): a change to any of them makes a new
image. The image is built in a temporary directory next to the cache and renamed into place; an exclusive lock
on ``cache_dir/debian-build.lock`` keeps concurrent callers from building it twice. Old images are left in place
(overlays may still use them as backing files).

CLI: ``python tests/guest/debian.py [--cache-dir DIR]`` prints the image path (default cache dir:
``<repo>/.cache/guest``).

The guest
---------
``mmdebstrap --variant=minbase`` bookworm (bookworm, -updates, -security from deb.debian.org) with
``linux-image-amd64``, ``initramfs-tools``, ``systemd-sysv``, ``udev``, ``dbus`` (logind and hostnamed need it),
``cloud-init``, ``ifupdown``, ``isc-dhcp-client``, ``resolvconf`` (so that the ``dns-nameservers`` /
``dns-search`` lines cloud-init renders into ``/etc/network/interfaces.d/50-cloud-init`` really reach
``/etc/resolv.conf``, as DHCP's do), ``iproute2``, ``openssh-server`` (no host keys in the image: cloud-init
makes them at first boot), ``netbase``, ``locales`` (``en_US.UTF-8``, cloud-init's default locale on Debian,
generated at build time, so that cloud-init's locale module has nothing to do). No Recommends, no docs, man
pages or translations, no apt lists. Only the kernel modules of ``KEPT_MODULES`` stay (virtio, SATA cdrom, ext4,
ISO 9660, FAT, the network stack, input: about 55 of the kernel's 400 MB), and the initramfs holds only
``INITRAMFS_MODULES`` (``MODULES=list``).

What is Debian's own and not changed: cloud-init's configuration (its ``datasource_list`` has NoCloud and
ConfigDrive, and ds-identify finds the seed by its ISO label at boot); NIC naming (predictable names such as
``enp1s0`` unless the seed renames the NIC); the ACPI power button, which powers the guest off
(systemd-logind's ``HandlePowerKey=poweroff``); the default user (``debian``). ``net-tools`` is not installed,
as on any minimal Debian 12: cloud-init's ENI renderer writes a subnet's ``routes`` as
``post-up route add ... || true``, which then adds nothing, while a subnet's ``gateway`` becomes ifupdown's own
``gateway`` line (iproute2).

Disk (MBR, 2 GiB virtual, qcow2 with zstd-compressed clusters, about 120 MB), for QEMU q35 with legacy BIOS
(SeaBIOS), attached as virtio-blk (``vda``), the seed as a SATA cdrom, a virtio NIC:

- sector 0: GRUB's ``boot.img``; sectors 1..2047: GRUB's ``core.img``, which boots at once (no menu) the
  kernel and initrd of partition 1 with ``KERNEL_CMDLINE`` (``console=ttyS0,115200``: the kernel's and
  systemd's messages and the report below go to the serial console);
- partition 1, FAT, label DEBBOOT: ``/vmlinuz``, ``/initrd.img`` (moved there from the guest's ``/boot``);
- partition 2, ext4, label ``debroot``: the root file system, made from the mmdebstrap tree with
  ``mke2fs -d`` (no loop device or mount needed beyond mmdebstrap's own chroot).

Under TCG on a 2-core machine, two such guests booting at once print their report 50 s (a quiet machine) to
110 s (other tests' VMs running) after they start.

The report
----------
``guest-net.service`` (``After=cloud-final.service``; it also runs ``cloud-init status --wait``, bounded) runs
``/usr/local/sbin/guest-net-report``, which writes one line, in one write, to ``/dev/ttyS0`` (and to
``/dev/console`` when that is not ttyS0) and to the journal, once per boot::

    guest-net nic=<ifname>/<mac> addrs=<cidr>[,<cidr>...] routes=<route>[;<route>...] dns=<ip>[,<ip>...]
      search=<domain>[,<domain>...] mtu=<n> hostname=<hostname> fqdn=<hostname -f> instance-id=<id>
      datasource=<nocloud|configdrive|...> keys=<sha256 hex|none> user=<name> cloud-init=<done|error|...>
      eni=<line>[;<line>...]

(one line; wrapped here). Every value has no spaces; a list that is empty is ``none``. Later fields may be added:
parse ``key=value`` pairs rather than positions.

- ``nic``: the device of the first IPv4 default route, else the first NIC with a device (sorted by name), and
  its MAC; ``addrs``, ``mtu``: its IPv4 addresses (``ip -4 -o addr``) and MTU.
- ``routes``: ``ip -4 route show``, one route per element, the spaces inside a route replaced by ``_``
  (``default_via_192.168.122.1_dev_eth0``).
- ``dns``, ``search``: the ``nameserver`` and ``search``/``domain`` entries of ``/etc/resolv.conf``, which is
  what the resolver really uses (resolvconf writes it from DHCP and from ifupdown's ``dns-*`` lines).
- ``hostname``: the kernel hostname; ``fqdn``: ``hostname -f`` (``none`` if it fails).
- ``instance-id``: ``v1.instance_id`` of ``/run/cloud-init/instance-data.json``; ``datasource``: the first word of
  ``/run/cloud-init/status.json``'s datasource, ``DataSource`` removed, lower case (``nocloud``,
  ``configdrive``).
- ``user``: the default user of cloud-init's merged config (Debian's: ``debian``); ``keys``: the sha256 of its
  ``~/.ssh/authorized_keys`` lines that are not blank or comments, stripped, sorted, each followed by ``\\n``
  (``none`` without any). For one key K: ``sha256(K.strip() + "\\n")``.
- ``cloud-init``: the status ``cloud-init status --wait`` ended with.
- ``eni``: what cloud-init rendered for ifupdown, ``/etc/network/interfaces.d/50-cloud-init`` without blank
  lines and comments, one element per line, spaces replaced by ``_`` (``post-up_route_add_default_gw_...``).

Host tools (Debian 12 packages): mmdebstrap, e2fsprogs (mke2fs -d), mtools, grub-common (grub-mkimage),
qemu-utils, apt, dpkg. Building needs root (mmdebstrap's chroot mode) and the Debian mirror; it takes about
1.5 minutes, most of it downloading and unpacking packages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build import (  # noqa: E402
    SECTOR,
    cache_key,
    cached_image,
    fat_image,
    fetch_packages,
    grub_core,
    package_versions,
    raw_disk,
    run,
)

DEFAULT_CACHE_DIR = HERE.parent.parent / ".cache" / "guest"
GUEST_FILES = (HERE / "guest-net-report", HERE / "guest-net.service", HERE / "build.py")

SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
PACKAGES = (
    "linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev", "dbus", "cloud-init", "ifupdown",
    "isc-dhcp-client", "resolvconf", "iproute2", "openssh-server", "netbase", "locales",
)
# Whose versions make the cache key (with the kernel metapackage's dependency).
KEY_PACKAGES = ("systemd", "cloud-init", "ifupdown", "openssh-server", "resolvconf", "grub-pc-bin")
# The kernel modules kept (paths under lib/modules/<abi>/kernel; shell patterns): what a VM of ours can use
# (virtio, the SATA cdrom, ext4, ISO 9660, FAT, the network stack, input for the power button). Every other
# module goes, about 330 of the kernel's 400 MB.
KEPT_MODULES = (
    "arch", "crypto", "lib", "net", "virt",
    "drivers/acpi", "drivers/ata", "drivers/block", "drivers/cdrom", "drivers/char", "drivers/firmware",
    "drivers/input", "drivers/virtio", "drivers/net/*.ko", "drivers/scsi/*.ko",
    "fs/*.ko", "fs/ext4", "fs/jbd2", "fs/isofs", "fs/fat", "fs/nls", "fs/fuse",
)
DROPPED_MODULES = ("arch/x86/kvm", "lib/test_*", "net/wireless", "net/mac80211", "net/bluetooth")
# Only what mounts the root file system, and the SATA cdrom, goes into the initramfs (small and quick to unpack
# under TCG). The cdrom must be there before the root file system's systemd starts: cloud-init's generator
# (ds-identify) looks for the seed's ISO label then, and disables cloud-init if it finds none. crc32c is loaded
# by name, not as a dependency, by ext4's metadata checksums.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "crc32c-intel", "ext4", "ahci", "sr_mod")
ROOT_LABEL = "debroot"
KERNEL_CMDLINE = f"root=LABEL={ROOT_LABEL} ro console=ttyS0,115200"

MIB = 1024 * 1024 // SECTOR  # in sectors
BOOT_PARTITION = (1 * MIB, 96 * MIB)  # (first sector, sectors)
ROOT_PARTITION = (97 * MIB, 1951 * MIB)
DISK_SECTORS = 2048 * MIB

# Run in the chroot after the packages are installed ($1 is the root directory).
CUSTOMIZE = r"""
set -eu
root="$1"
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo "LABEL=debroot / ext4 defaults,errors=remount-ro 0 1" > "$root/etc/fstab"
echo localhost > "$root/etc/hostname"
printf 'auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n' > "$root/etc/network/interfaces"
install -m 0755 "$GUEST_DIR/guest-net-report" "$root/usr/local/sbin/guest-net-report"
install -m 0644 "$GUEST_DIR/guest-net.service" "$root/etc/systemd/system/guest-net.service"
chroot "$root" systemctl enable guest-net.service
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service
# The kernel modules no VM uses; the initramfs again, with only what mounts the root file system.
printf 'MODULES=list\n' > "$root/etc/initramfs-tools/conf.d/launcher-guest"
printf '%s\n' $INITRAMFS_MODULES > "$root/etc/initramfs-tools/modules"
for abi in "$root"/lib/modules/*; do
    keep="$abi.kept"
    mkdir "$keep"
    (cd "$abi/kernel" && for pattern in $KEPT_MODULES; do
        for path in $pattern; do if [ -e "$path" ]; then cp -a --parents "$path" "$keep/"; fi; done
    done)
    rm -rf "$abi/kernel"
    mv "$keep" "$abi/kernel"
    (cd "$abi/kernel" && for pattern in $DROPPED_MODULES; do rm -rf $pattern; done)
    chroot "$root" depmod "$(basename "$abi")"
    chroot "$root" update-initramfs -u -k "$(basename "$abi")"
done
# en_US.UTF-8, cloud-init's default locale on Debian, generated now rather than by cloud-init at each first boot.
echo "en_US.UTF-8 UTF-8" > "$root/etc/locale.gen"
chroot "$root" locale-gen
echo "LANG=en_US.UTF-8" > "$root/etc/default/locale"
# Not $root/tmp, nor apt's lists and cache: mmdebstrap's apt config is in $root/tmp until its own clean-up
# (apt-get update with no sources, apt-get clean) empties those; without it, that clean-up would hit the host's.
rm -rf "$root"/var/cache/debconf/*-old "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
"""
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias",
)


def debootstrap(tree: Path) -> None:
    """The root file system tree at `tree`, made by mmdebstrap in chroot mode (as root)."""
    argv: list[str] = [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory", "--quiet",
        f"--include={','.join(PACKAGES)}",
        "--aptopt=Acquire::Retries \"3\"",
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
        f"--customize-hook={CUSTOMIZE}",
        SUITE, str(tree), *MIRRORS,
    ]
    env = {**os.environ, "GUEST_DIR": str(HERE), "KEPT_MODULES": " ".join(KEPT_MODULES),
           "DROPPED_MODULES": " ".join(DROPPED_MODULES), "INITRAMFS_MODULES": " ".join(INITRAMFS_MODULES),
           "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr[-8000:]}")


def build_image(versions: dict[str, str], dest: Path, scratch: Path) -> None:
    """Build the qcow2 image at `dest`, working in `scratch`."""
    tree = scratch / "root"
    debootstrap(tree)
    boot = scratch / "boot"
    boot.mkdir()
    (vmlinuz,) = (tree / "boot").glob("vmlinuz-*")
    (initrd,) = (tree / "boot").glob("initrd.img-*")
    # Moved, not copied: only GRUB reads them (the guest never installs another kernel).
    shutil.move(vmlinuz, boot / "vmlinuz")
    shutil.move(initrd, boot / "initrd.img")

    grub = fetch_packages({"grub-pc-bin": versions["grub-pc-bin"]}, scratch)["grub-pc-bin"]
    core = grub_core(grub, scratch, KERNEL_CMDLINE, BOOT_PARTITION[0])
    boot_fs, root_fs, raw = scratch / "boot.fat", scratch / "root.ext4", scratch / "disk.raw"
    fat_image(boot_fs, BOOT_PARTITION[1], "DEBBOOT", boot)
    # GRUB never reads it, so any ext4 feature the guest's kernel knows is fine.
    run("mke2fs", "-q", "-t", "ext4", "-L", ROOT_LABEL, "-d", tree, "-E", "root_owner=0:0",
        root_fs, f"{ROOT_PARTITION[1] * SECTOR // 1024}k")
    raw_disk(raw, DISK_SECTORS, grub / "usr/lib/grub/i386-pc/boot.img", core,
             [(*BOOT_PARTITION, 0x0E, True, boot_fs), (*ROOT_PARTITION, 0x83, False, root_fs)])
    # Compressed clusters (zstd): a third of the size; QEMU, not the guest, decompresses them on reads.
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", raw, dest)


def ensure_debian_image(cache_dir: Path) -> Path:
    """Return the cached Debian guest image for the current inputs, building it if it is absent."""
    versions = package_versions(KEY_PACKAGES)
    key = cache_key(versions, (Path(__file__).resolve(), *GUEST_FILES))
    return cached_image(cache_dir, f"debian-{key}.qcow2", "debian-build",
                        lambda dest, scratch: build_image(versions, dest, scratch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find in the cache) the Debian 12 cloud-init guest image.")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    print(ensure_debian_image(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
