"""The blocking libvirt operations on prepared slots (slots.py, claim.py), each one function of a
`libvirt.virConnect`, run in `Hypervisor.call`'s worker threads like those of `domain_calls`.

A slot's domain is transient and held in QEMU's ``prelaunch`` state (started with ``-S``, never continued): libvirt
shows it as paused by a user, like a guest someone paused, so only QMP ``query-status`` (`qemu_status`) tells a
slot that never ran an instruction from one that did.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import libvirt
import libvirt_qemu

from virtualizers.qemu import domain
from virtualizers.qemu.hypervisor import or_none

PRELAUNCH = "prelaunch"  # QMP's status of a QEMU started with -S and never continued


@attrs.frozen
class SlotDomain:
    """A domain carrying slot metadata of this data dir: unclaimed (`instance_uuid` "") or claimed by an
    instance. `status`: QMP's status while QEMU runs ("" if it does not); `persistent`: whether it is defined."""

    name: str
    slot: domain.SlotMetadata
    instance_uuid: str
    status: str
    persistent: bool


def create_paused(conn: libvirt.virConnect, xml: str) -> None:
    """Start the transient domain `xml` held before its first instruction (VIR_DOMAIN_START_PAUSED)."""
    conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)


def slot_domains(conn: libvirt.virConnect, data_dir: Path) -> list[SlotDomain]:
    """Every domain with slot metadata of `data_dir` (domain.read_slot_metadata)."""
    found, ours = [], str(data_dir.absolute())
    for dom in conn.listAllDomains():
        try:
            xml = dom.XMLDesc(0)
            slot = domain.read_slot_metadata(xml)
            if slot is None or slot.data_dir != ours:
                continue
            instance = domain.read_metadata(xml)
            status = _qemu_status(dom) if dom.isActive() else ""
            found.append(SlotDomain(dom.name(), slot, "" if instance is None else instance.instance_uuid, status,
                                    bool(dom.isPersistent())))
        except libvirt.libvirtError:
            continue  # gone meanwhile
    return found


def set_instance_metadata(conn: libvirt.virConnect, name: str, instance_uuid: str, data_dir: Path) -> None:
    """Give the live domain `name` the instance metadata that makes it `instance_uuid`'s (domain_calls.our_domains
    finds it from now on)."""
    conn.lookupByName(name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                        domain.instance_metadata_xml(instance_uuid, data_dir),
                                        domain.METADATA_PREFIX, domain.METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def insert_seed(conn: libvirt.virConnect, name: str, seed: Path) -> None:
    """Put the seed ISO in the live domain's empty cdrom (a cdrom cannot be hot-plugged; its media can change)."""
    conn.lookupByName(name).updateDeviceFlags(domain.cdrom_xml(seed), libvirt.VIR_DOMAIN_AFFECT_LIVE)


def resume_if_prelaunch(conn: libvirt.virConnect, name: str) -> None:
    """Let the domain run its first instruction; libvirtError if QEMU is no longer in prelaunch (something ran
    it, or it is gone)."""
    dom = conn.lookupByName(name)
    status = _qemu_status(dom)
    if status != PRELAUNCH:
        raise libvirt.libvirtError(f"domain {name} is in QEMU state {status!r}, not {PRELAUNCH}")
    dom.resume()


def is_active(conn: libvirt.virConnect, name: str) -> bool | None:
    """Whether domain `name` runs; None if there is no such domain."""
    dom = or_none(lambda: conn.lookupByName(name), libvirt.VIR_ERR_NO_DOMAIN)
    return None if dom is None else bool(dom.isActive())


def _qemu_status(dom: libvirt.virDomain) -> str:
    answer = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-status"}', 0))
    status: str = answer["return"]["status"]
    return status
