"""The blocking libvirt operations on domains, each one function of a `libvirt.virConnect`.

They run in `Hypervisor.call`'s worker threads (bounded there, docs/concurrency.md), never on the Trio thread:
``await hypervisor.call(partial(remove_domain, name=name))``. Each is one short exchange with libvirtd and
keeps no state. A domain that went down or away meanwhile (another call, the guest powering off) is the
outcome the caller wanted, not an error, wherever that is so; any other libvirtError passes to the caller.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import libvirt

from virtualizers.qemu import domain
from virtualizers.qemu.hypervisor import or_none

# Domain states in which QEMU runs (the VM is "up" for the launcher).
ACTIVE_STATES = frozenset({
    libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_PMSUSPENDED,
})


def our_domains(conn: libvirt.virConnect, data_dir: Path) -> list[domain.DomainMetadata]:
    """The launcher metadata of every domain that belongs to `data_dir` (its `<metadata>`, domain.py), with the
    domain's name (a claimed slot's domain keeps its slot's name)."""
    found, ours = [], str(data_dir.absolute())
    for dom in conn.listAllDomains():
        try:
            meta = domain.read_metadata(dom.XMLDesc(0))
            name = dom.name()
        except libvirt.libvirtError:
            continue  # undefined meanwhile
        if meta is not None and meta.data_dir == ours:
            found.append(attrs.evolve(meta, name=name))
    return found


def domain_state(conn: libvirt.virConnect, name: str) -> tuple[int, int]:
    """(libvirt state, reason) of domain `name`; (VIR_DOMAIN_SHUTOFF, 0) if there is no such domain."""
    found = or_none(lambda: conn.lookupByName(name).state(), libvirt.VIR_ERR_NO_DOMAIN)
    if found is None:
        return libvirt.VIR_DOMAIN_SHUTOFF, 0
    state, reason = found
    return state, reason


def start_domain(dom: libvirt.virDomain) -> None:
    """Boot the defined domain. One that already runs counts as started: an earlier start_vm that overran its
    timeout may have started it after all (its abandoned thread's call went through), and a RESTART adopts it."""
    if not dom.isActive():
        dom.create()


def press_power_button(conn: libvirt.virConnect, name: str) -> None:
    """The ACPI power button of domain `name` (the guest decides); nothing if it is down or gone."""
    try:
        conn.lookupByName(name).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    except libvirt.libvirtError as exc:
        if not _down_or_gone(exc):
            raise


def destroy_domain(conn: libvirt.virConnect, name: str) -> None:
    """Force domain `name` off (QEMU is killed; the definition stays); nothing if it is down or gone."""
    try:
        conn.lookupByName(name).destroy()
    except libvirt.libvirtError as exc:
        if not _down_or_gone(exc):
            raise


def remove_domain(conn: libvirt.virConnect, name: str, keep_nvram: bool = False) -> bool:
    """Destroy (if active) and undefine domain `name` with its NVRAM (or without, `keep_nvram`: the file stays);
    False if there was none."""
    dom = or_none(lambda: conn.lookupByName(name), libvirt.VIR_ERR_NO_DOMAIN)
    if dom is None:
        return False
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if not _down_or_gone(exc):
            raise
    try:
        nvram = libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM if keep_nvram else libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        if dom.isPersistent():
            dom.undefineFlags(nvram | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    return True


def hot_plug(conn: libvirt.virConnect, name: str, disk: domain.VolumeDisk) -> str | None:
    """Attach `disk` to the running domain on its first free target; that target, or None if the domain does not
    run (the disk is then one from its next start, which defines the domain again)."""
    dom = conn.lookupByName(name)
    if not dom.isActive():
        return None
    target = domain.free_target(dom.XMLDesc(0))
    if target is None:
        raise libvirt.libvirtError(f"every disk target of {name} is taken")
    dom.attachDeviceFlags(domain.volume_disk_xml(disk, target), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return target


def request_unplug(conn: libvirt.virConnect, name: str, volume_id: str) -> bool:
    """Ask the running domain's guest to let go of the volume's disk, and return at once: the caller waits for the
    disk to go (`has_disk`), bounded by its own timeout. False if the domain does not run or has no such disk (then
    there is nothing to wait for).

    By the disk's alias (`detachDeviceAlias`, asynchronous): `detachDeviceFlags` would first wait up to 5 s of
    libvirt's own for the guest, so a guest that ignores the request would be given the caller's bound plus
    those 5 s. (A live disk without an alias, which libvirt does not make, falls back to it.)"""
    dom = conn.lookupByName(name)
    if not dom.isActive():
        return False
    xml = dom.XMLDesc(0)
    disk = domain.find_volume_disk(xml, volume_id)
    if disk is None:
        return False
    alias = domain.volume_disk_alias(xml, volume_id)
    if alias is not None:
        dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    else:
        dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return True


def has_disk(conn: libvirt.virConnect, name: str, volume_id: str) -> bool:
    """Whether the running domain still has the volume's disk."""
    dom = conn.lookupByName(name)
    return bool(dom.isActive()) and domain.find_volume_disk(dom.XMLDesc(0), volume_id) is not None


def plug_nic(conn: libvirt.virConnect, name: str, kind: str, source: str, mac: str) -> None:
    """Attach the NIC (`domain.nic_xml`) to the live domain (on q35, into a spare root port): a claimed slot's before
    its first instruction (the guest finds an ordinary cold-plugged NIC), a restored clone's after its restore."""
    conn.lookupByName(name).attachDeviceFlags(domain.nic_xml(kind, source, mac), libvirt.VIR_DOMAIN_AFFECT_LIVE)


def make_persistent(conn: libvirt.virConnect, name: str) -> None:
    """Define the running transient domain from its own configuration (with what a claim or a restore gave it), so
    that it powers off into "shut off" and stays defined like a cold domain; nothing if it is persistent."""
    dom = conn.lookupByName(name)
    if not dom.isPersistent():
        conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))


def _down_or_gone(exc: libvirt.libvirtError) -> bool:
    """Whether `exc` says the domain is not running (any more) or does not exist (any more)."""
    return exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
