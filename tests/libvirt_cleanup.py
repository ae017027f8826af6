"""Removing what launchers of a directory left in libvirt: their domains and their volume pools. For the test
fixtures (tests/conftest.py) and the benchmarks (bench/), which run real launchers on the system libvirtd."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from virtualizers.qemu.domain import read_metadata, read_slot_metadata
from virtualizers.qemu.domain_calls import remove_domain


def remove_domains_under(root: Path) -> list[str]:
    """Destroy and undefine every domain of a launcher whose data dir is under `root`; their names."""
    prefix = str(root.absolute()) + "/"
    connection = libvirt.open("qemu:///system")
    removed = []
    try:
        for dom in connection.listAllDomains():
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError:
                continue  # undefined meanwhile
            meta = read_metadata(xml) or read_slot_metadata(xml)  # a prepared slot's domain has only the latter
            if meta is not None and (meta.data_dir + "/").startswith(prefix):
                remove_domain(connection, dom.name())
                removed.append(dom.name())
    finally:
        connection.close()
    return removed


def remove_pools_under(root: Path) -> list[str]:
    """Delete the volumes of, stop and undefine every libvirt storage pool whose target path is under `root` (the
    qemu virtualizer's own volume pools of the test's data dirs); their names."""
    prefix = str(root.absolute()) + "/"
    connection = libvirt.open("qemu:///system")
    removed = []
    try:
        for pool in connection.listAllStoragePools():
            try:
                name = pool.name()
                target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or ""
                if not (target + "/").startswith(prefix):
                    continue
                if pool.isActive():
                    for volume in pool.listAllVolumes():
                        with contextlib.suppress(libvirt.libvirtError):
                            volume.delete(0)
                    pool.destroy()
                pool.undefine()
            except libvirt.libvirtError:
                continue  # removed meanwhile
            removed.append(name)
    finally:
        connection.close()
    return removed
