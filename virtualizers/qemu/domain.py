"""The libvirt domain XML of one instance, built with ElementTree so every value is escaped.

`domain_xml(params)` is pure: the QEMU virtualizer fills a `DomainParams` from the instance's spec, its
directory and the `qemu:` settings, and defines the result with libvirt. `read_metadata(xml)` reads back
the launcher's `<metadata>` element, which is how the launcher tells its own domains from any others on
the host (and from those of another launcher with a different data dir).

The domain:

- is named `launcher-<instance uuid>`; its libvirt `<uuid>` is the instance uuid when that is a valid
  RFC 4122 UUID (ciao's instance uuids need not be), else a UUID derived from it (uuid5), so that defining
  the domain again (RESTART) names the same domain;
- or, for a prepared slot (`DomainParams.slot`, slots.py), is named `launcher-slot-<slot id>` with the slot id as
  its libvirt `<uuid>`, carries the slot's metadata (`SLOT_NS`, `read_slot_metadata`) instead of an instance's,
  and has an empty cdrom (`seed` None) and no NIC: a claim inserts the seed (`cdrom_xml`) and plugs the NIC
  (`nic_xml`) before its first instruction;
- boots with SeaBIOS (legacy) or OVMF (EFI, `<loader>` + a per-instance `<nvram>` copied from the vars
  template by libvirt);
- has the overlay as a virtio disk (`vda`), its volumes as virtio disks `vdb`, `vdc`, ... (the volume id as
  their serial); an instance that boots from a volume has no overlay (`overlay` None) and its volumes are `vda`,
  `vdb`, ... (the boot volume first); `volume_disk_xml` is the same element for a hot-plug, on the first free
  target `free_target` finds; the cloud-init seed as a read-only SATA cdrom, one virtio NIC with the payload's
  MAC on a libvirt network or a bridge (or none), a virtio RNG (guests boot faster with entropy), no graphics;
- logs its serial console through virtlogd to `console.log` in the instance dir (virtlogd bounds its size:
  `max_size` / `max_backups` in virtlogd.conf) while keeping it reachable with `virsh console`;
- has a qemu-guest-agent channel (`org.qemu.guest_agent.0`);
- powers off into "shut off" and stays defined: `on_poweroff`/`on_crash` = destroy;
- boots from its first disk (`<os><boot dev='hd'/>`), unless a disk has a per-device boot order
  (`overlay_boot_order`, `VolumeDisk.boot_order`: `launcher.plugin.volumes.disk_plan`'s rule); then every
  bootable disk has `<boot order='N'/>` and `<os>` has no `<boot>` (libvirt refuses the two together);
- on a q35 machine, has `hotplug_slots` spare PCIe root ports: a PCIe device can only be hot-plugged into a free
  root port, and libvirt adds only those the defined devices take.
"""

from __future__ import annotations

import uuid as uuid_module
import xml.etree.ElementTree as ET
from pathlib import Path

import attrs

from launcher.plugin.volumes import MAX_VOLUMES
from launcher.plugin.warm import SlotShape

METADATA_NS = "http://launcher.invalid/xmlns/instance/1"  # our key for virDomainGetMetadata
METADATA_PREFIX = "launcher"
SLOT_NS = "http://launcher.invalid/xmlns/slot/1"  # a prepared slot's own metadata (slots.py), never an instance's
SLOT_PREFIX = "launcherslot"
TEMPLATE_NS = "http://launcher.invalid/xmlns/template/1"  # a template domain's metadata and its clones' marker
TEMPLATE_PREFIX = "launchertpl"
DOMAIN_PREFIX = "launcher-"
SLOT_PREFIX_NAME = "launcher-slot-"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
VIRTIO_TARGETS = tuple(f"vd{chr(ord('a') + index)}" for index in range(26))  # the overlay's, then the volumes'
NETWORK_KINDS = ("network", "bridge", "none")
_UUID_NAMESPACE = uuid_module.uuid5(uuid_module.NAMESPACE_URL, METADATA_NS)


@attrs.frozen
class Firmware:
    """Legacy BIOS when `efi` is False; else OVMF with its code and vars template."""

    efi: bool
    ovmf_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    ovmf_vars_template: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@attrs.frozen
class VolumeDisk:
    """A volume attached as a disk (`vdb`, `vdc`, ... in the order given; from `vda` without an overlay). `serial`
    is the volume id: libvirt and `virsh domblklist`/`dumpxml` show it whole; a guest sees its first 20
    characters (virtio-blk's limit). `boot_order`: libvirt's per-device boot order, None for none."""

    source: Path
    format: str  # qcow2 or raw
    serial: str
    boot_order: int | None = None


@attrs.frozen
class DomainParams:
    """Everything the domain XML depends on."""

    instance_uuid: str
    data_dir: Path
    vcpus: int
    mem_mb: int
    kvm: bool  # True: hardware virtualization (domain type kvm, host CPU); False: TCG (type qemu)
    machine: str  # e.g. "q35"
    firmware: Firmware
    overlay: Path | None  # None: the instance boots from a volume and has no image disk
    seed: Path | None  # None: an empty cdrom (a slot's, which a claim fills)
    network_kind: str  # "network", "bridge" or "none"
    network_source: str  # the libvirt network's or bridge's name
    mac: str  # "" lets libvirt pick one
    console_log: Path
    nvram: Path
    volumes: tuple[VolumeDisk, ...] = ()  # at most MAX_VOLUMES
    overlay_boot_order: int | None = None  # the overlay's per-device boot order, None for none
    hotplug_slots: int = 0  # spare PCIe root ports (q35 machines only)
    slot: SlotMetadata | None = None  # a prepared slot's domain (module doc); instance_uuid is then ignored

    @property
    def boot_orders(self) -> bool:
        """Whether the domain boots by per-device boot orders (then `<os>` has no `<boot>`)."""
        return self.overlay_boot_order is not None or any(v.boot_order is not None for v in self.volumes)

    @property
    def name(self) -> str:
        return domain_name(self.instance_uuid) if self.slot is None else slot_domain_name(self.slot.slot_id)


@attrs.frozen
class DomainMetadata:
    """A domain's instance metadata (`read_metadata`), with the domain's name (`name`: "" when read from XML
    alone; a claimed slot's domain keeps its slot's name) and, for a clone restored from a template
    (save_image.clone_xml marks it), the template's key (`template_key`, "" for any other domain)."""

    instance_uuid: str
    data_dir: str
    name: str = ""
    template_key: str = ""


@attrs.frozen
class SlotMetadata:
    """A prepared slot's metadata: its id (a uuid4 hex), its data dir and the shape it was made for."""

    slot_id: str
    data_dir: str
    shape: SlotShape


def slot_domain_name(slot_id: str) -> str:
    return SLOT_PREFIX_NAME + slot_id


def domain_name(instance_uuid: str) -> str:
    return DOMAIN_PREFIX + instance_uuid


def canonical_uuid(instance_uuid: str) -> str | None:
    """The instance uuid in libvirt's canonical form if it is a real UUID, else None."""
    try:
        parsed = uuid_module.UUID(instance_uuid)
    except ValueError:
        return None
    return str(parsed) if str(parsed) == instance_uuid.lower() else None


def libvirt_uuid(instance_uuid: str) -> str:
    """The domain's libvirt UUID: the instance uuid if it is one, else a stable UUID derived from it."""
    return canonical_uuid(instance_uuid) or str(uuid_module.uuid5(_UUID_NAMESPACE, instance_uuid))


def domain_xml(params: DomainParams) -> str:
    domain = ET.Element("domain", type="kvm" if params.kvm else "qemu")
    _text(domain, "name", params.name)
    _text(domain, "uuid", libvirt_uuid(params.instance_uuid) if params.slot is None
          else str(uuid_module.UUID(hex=params.slot.slot_id)))
    _metadata(ET.SubElement(domain, "metadata"), params)
    _text(domain, "memory", str(params.mem_mb), unit="MiB")
    _text(domain, "vcpu", str(params.vcpus), placement="static")
    _os(ET.SubElement(domain, "os"), params)
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")  # the ACPI power button is how stop_vm asks the guest to power off
    ET.SubElement(features, "apic")
    if params.kvm:
        ET.SubElement(domain, "cpu", mode="host-passthrough")
    ET.SubElement(domain, "clock", offset="utc")
    _text(domain, "on_poweroff", "destroy")
    _text(domain, "on_reboot", "restart")
    _text(domain, "on_crash", "destroy")
    _devices(ET.SubElement(domain, "devices"), params)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def instance_metadata_xml(instance_uuid: str, data_dir: Path) -> str:
    """The `<instance>` element that `domain_xml` writes in `METADATA_NS`, without its namespace (setMetadata puts
    it there): what a claim sets on the slot's domain to make it the instance's."""
    instance = ET.Element("instance")
    _text(instance, "uuid", instance_uuid)
    _text(instance, "data-dir", str(data_dir))
    return ET.tostring(instance, encoding="unicode")


def cdrom_xml(seed: Path) -> str:
    """The seed cdrom as `domain_xml` writes it: what a claim puts in a slot's empty cdrom (updateDeviceFlags)."""
    return ET.tostring(_cdrom(ET.Element("devices"), seed), encoding="unicode")


def nic_xml(kind: str, source: str, mac: str) -> str:
    """The NIC as `domain_xml` writes it (`kind` network or bridge): what a claim plugs into a slot."""
    return ET.tostring(_nic(ET.Element("devices"), kind, source, mac), encoding="unicode")


def volume_disk_xml(volume: VolumeDisk, target: str) -> str:
    """The `<disk>` of one volume on `target` (e.g. "vdc"), as `domain_xml` writes it: what a hot-plug attaches."""
    return ET.tostring(_volume_disk(ET.Element("devices"), volume, target), encoding="unicode")


def free_target(xml: str) -> str | None:
    """The first of VIRTIO_TARGETS that no disk of the domain (its XML) uses, or None: all are taken."""
    used = {target.get("dev") for target in ET.fromstring(xml).iterfind("devices/disk/target")}
    return next((target for target in VIRTIO_TARGETS if target not in used), None)


def find_volume_disk(xml: str, volume_id: str) -> str | None:
    """The `<disk>` element (as XML text) of the domain whose serial is `volume_id`, or None."""
    disk = _volume_disk_element(xml, volume_id)
    return None if disk is None else ET.tostring(disk, encoding="unicode")


def volume_disk_alias(xml: str, volume_id: str) -> str | None:
    """The device alias (`<alias name=.../>`, which libvirt gives every device of a running domain) of the disk
    whose serial is `volume_id` in the domain's live XML; None if there is no such disk, or it has no alias."""
    disk = _volume_disk_element(xml, volume_id)
    alias = None if disk is None else disk.find("alias")
    return None if alias is None else alias.get("name")


def _volume_disk_element(xml: str, volume_id: str) -> ET.Element | None:
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        if disk.findtext("serial") == volume_id:
            return disk
    return None


def read_metadata(xml: str) -> DomainMetadata | None:
    """The launcher metadata of a domain's XML (from XMLDesc), or None if it has none."""
    root = ET.fromstring(xml)
    element = root.find(f"metadata/{{{METADATA_NS}}}instance")
    if element is None:
        return None
    clone = root.find(f"metadata/{{{TEMPLATE_NS}}}clone")
    return DomainMetadata(
        instance_uuid=element.findtext(f"{{{METADATA_NS}}}uuid", ""),
        data_dir=element.findtext(f"{{{METADATA_NS}}}data-dir", ""),
        template_key="" if clone is None else clone.get("key", ""),
    )


def read_slot_metadata(xml: str) -> SlotMetadata | None:
    """The slot metadata of a domain's XML (from XMLDesc), or None if it has none (or an unreadable shape)."""
    element = ET.fromstring(xml).find(f"metadata/{{{SLOT_NS}}}slot")
    if element is None:
        return None
    shape = element.find(f"{{{SLOT_NS}}}shape")
    if shape is None:
        return None
    try:
        parsed = SlotShape(shape.get("image", ""), int(shape.get("vcpus", "")), int(shape.get("mem", "")),
                           shape.get("fw", ""), int(shape.get("disk", "")))
    except ValueError:
        return None
    return SlotMetadata(element.findtext(f"{{{SLOT_NS}}}id", ""), element.findtext(f"{{{SLOT_NS}}}data-dir", ""),
                        parsed)


def _text(parent: ET.Element, tag: str, text: str, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    element.text = text
    return element


def _metadata(metadata: ET.Element, params: DomainParams) -> None:
    if params.slot is None:
        _instance_metadata(metadata, params.instance_uuid, params.data_dir)
        return
    ET.register_namespace(SLOT_PREFIX, SLOT_NS)
    slot = ET.SubElement(metadata, f"{{{SLOT_NS}}}slot")
    _text(slot, f"{{{SLOT_NS}}}id", params.slot.slot_id)
    _text(slot, f"{{{SLOT_NS}}}data-dir", params.slot.data_dir)
    shape = params.slot.shape
    ET.SubElement(slot, f"{{{SLOT_NS}}}shape", image=shape.image_uuid, vcpus=str(shape.vcpus),
                  mem=str(shape.mem_mb), fw=shape.fw_type, disk=str(shape.disk_mb))


def _instance_metadata(metadata: ET.Element, instance_uuid: str, data_dir: Path) -> None:
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    instance = ET.SubElement(metadata, f"{{{METADATA_NS}}}instance")
    _text(instance, f"{{{METADATA_NS}}}uuid", instance_uuid)
    _text(instance, f"{{{METADATA_NS}}}data-dir", str(data_dir))


def _os(os_element: ET.Element, params: DomainParams) -> None:
    _text(os_element, "type", "hvm", arch="x86_64", machine=params.machine)
    firmware = params.firmware
    if firmware.efi:
        _text(os_element, "loader", str(firmware.ovmf_code), readonly="yes", type="pflash")
        _text(os_element, "nvram", str(params.nvram), template=str(firmware.ovmf_vars_template))
    if not params.boot_orders:
        ET.SubElement(os_element, "boot", dev="hd")


def _disk(devices: ET.Element, source: Path, fmt: str, target: str, boot_order: int | None) -> ET.Element:
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=fmt, discard="unmap")
    ET.SubElement(disk, "source", file=str(source))
    ET.SubElement(disk, "target", dev=target, bus="virtio")
    if boot_order is not None:
        ET.SubElement(disk, "boot", order=str(boot_order))
    return disk


def _devices(devices: ET.Element, params: DomainParams) -> None:
    targets = iter(VIRTIO_TARGETS)
    if params.overlay is not None:
        _disk(devices, params.overlay, "qcow2", next(targets), params.overlay_boot_order)

    if len(params.volumes) > MAX_VOLUMES:
        raise ValueError(f"at most {MAX_VOLUMES} volumes, got {len(params.volumes)}")
    for volume in params.volumes:
        _volume_disk(devices, volume, next(targets))

    _cdrom(devices, params.seed)
    if params.network_kind != "none" and params.slot is None:
        _nic(devices, params.network_kind, params.network_source, params.mac)

    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(params.console_log), append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")

    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)

    rng = ET.SubElement(devices, "rng", model="virtio")
    _text(rng, "backend", "/dev/urandom", model="random")
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="none")
    ET.SubElement(devices, "memballoon", model="none")
    if "q35" in params.machine and params.hotplug_slots:
        # libvirt numbers controllers without an index from 0, which must be the root complex: name it first.
        ET.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
        for _ in range(params.hotplug_slots):
            ET.SubElement(devices, "controller", type="pci", model="pcie-root-port")


def _cdrom(devices: ET.Element, seed: Path | None) -> ET.Element:
    cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(cdrom, "driver", name="qemu", type="raw")
    if seed is not None:
        ET.SubElement(cdrom, "source", file=str(seed))
    ET.SubElement(cdrom, "target", dev="sda", bus="sata")
    ET.SubElement(cdrom, "readonly")
    return cdrom


def _nic(devices: ET.Element, kind: str, source: str, mac: str) -> ET.Element:
    nic = ET.SubElement(devices, "interface", type=kind)
    if mac:
        ET.SubElement(nic, "mac", address=mac.lower())
    ET.SubElement(nic, "source", {kind: source})
    ET.SubElement(nic, "model", type="virtio")
    return nic


def _volume_disk(devices: ET.Element, volume: VolumeDisk, target: str) -> ET.Element:
    disk = _disk(devices, volume.source, volume.format, target, volume.boot_order)
    _text(disk, "serial", volume.serial)
    return disk
