"""Tests for virtualizers.qemu.domain (the libvirt domain XML of an instance) and the parts of the qemu virtualizer
that need no VM: `domain_calls.remove_domain`, `QemuBackend.our_domains` / `handle_orphans` against libvirt's
in-process test driver, the `qemu:` settings (`settings.py`), and the choice between KVM and TCG.

The XML is checked three ways: against libvirt's RELAX NG schema (`virt-xml-validate`, for every combination
of the settings that change its shape), for its meaning (parsed back with ElementTree), and by defining it
with `test:///default`. The test driver shares one in-process state per process, so every domain here has a
fresh uuid and is removed again.
"""

from __future__ import annotations

import inspect
import itertools
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import libvirt
import pytest
import trio

from launcher.plugin.host import BackendHost
from launcher.plugin.settings import ConfigError, parse_section
from launcher.plugin.spec import InstanceSpec, Networking, StorageEntry
from launcher.plugin.volumes import MAX_VOLUMES
from launcher.plugin.warm import PoolSettings, SlotShape
from virtualizers.qemu import domain, preflight
from virtualizers.qemu import instance_files as qemu
from virtualizers.qemu.backend import QemuBackend
from virtualizers.qemu.clones import TemplateSettings
from virtualizers.qemu.cloudinit import GuestNetwork
from virtualizers.qemu.domain import (
    DomainParams,
    Firmware,
    VolumeDisk,
    canonical_uuid,
    domain_xml,
    libvirt_uuid,
    read_metadata,
)
from virtualizers.qemu.domain_calls import remove_domain
from virtualizers.qemu.settings import NetworkSettings, QemuSettings, VolumeSettings, resolve_accel

UUID = "d7d86208-b46c-4465-9018-fe14087d415f"
CIAO_UUID = "67d86208-000-4465-9018-fe14087d415f"  # a ciao instance uuid that is no RFC 4122 UUID
CIAO_LIBVIRT_UUID = "d5804512-9792-5ed5-b5f4-d05813c822c2"  # its domain's UUID (test_canonical_uuid)
MAC = "02:00:E6:F5:AF:F9"
DATA_DIR = Path("/var/lib/launcher")
NASTY = "a&b<c>\"d'"  # every character XML must escape somewhere
OVMF_CODE = Path("/opt/ovmf/CODE.fd")
OVMF_VARS = Path("/opt/ovmf/VARS.fd")
TEST_URI = "test:///default"
T = TypeVar("T")

# The settings that change the XML's shape, and their values.
EFI = (False, True)
KVM = (True, False)
NETWORKS = (("network", "default"), ("bridge", "br0"), ("none", ""))
MACS = (MAC, "")
UUID_KINDS = ("uuid", "ciao")
MACHINES = ("q35", "pc")


def instance_uuid(kind: str, unique: bool = False) -> str:
    """A valid UUID or a ciao-style non-UUID; `unique` ones for the shared test-driver state."""
    if kind == "uuid":
        return str(uuid.uuid4()) if unique else UUID
    return f"{uuid.uuid4().hex[:8]}-000-4465-9018-fe14087d415f" if unique else CIAO_UUID


def make_params(uuid_: str = UUID, data_dir: Path = DATA_DIR, *, efi: bool = True, kvm: bool = True,
                network: tuple[str, str] = ("network", "default"), mac: str = MAC,
                machine: str = "q35") -> DomainParams:
    """The params the QEMU backend would build for instance `uuid_` in `data_dir`."""
    instance_dir = data_dir / "instances" / uuid_
    return DomainParams(
        instance_uuid=uuid_,
        data_dir=data_dir,
        vcpus=2,
        mem_mb=384,
        kvm=kvm,
        machine=machine,
        firmware=Firmware(efi=efi, ovmf_code=OVMF_CODE, ovmf_vars_template=OVMF_VARS),
        overlay=instance_dir / qemu.OVERLAY,
        seed=instance_dir / qemu.SEED,
        network_kind=network[0],
        network_source=network[1],
        mac=mac,
        console_log=instance_dir / qemu.CONSOLE_LOG,
        nvram=instance_dir / qemu.NVRAM,
    )


def combinations(efi: bool, kvm: bool) -> list[DomainParams]:
    """Every combination of network, mac, uuid kind and machine, for one firmware and accel."""
    return [make_params(instance_uuid(kind), efi=efi, kvm=kvm, network=network, mac=mac, machine=machine)
            for network, mac, kind, machine in itertools.product(NETWORKS, MACS, UUID_KINDS, MACHINES)]


# ---------------------------------------------------------------------------------------------------------
# virt-xml-validate


def validator() -> str:
    """virt-xml-validate's path; the test fails (never skips) without it or the xmllint it runs."""
    path = shutil.which("virt-xml-validate")
    if path is None or shutil.which("xmllint") is None:
        pytest.fail("virt-xml-validate and xmllint are required (libvirt-clients and libxml2-utils; "
                    "`bash .ci/install` installs them)")
    return path


def invalid_documents(documents: dict[str, str], workdir: Path) -> dict[str, str]:
    """virt-xml-validate each XML document (all at once, one process each): {label: output} of the rejected."""
    tool = validator()
    running = []
    for i, (name, xml) in enumerate(documents.items()):
        path = workdir / f"domain-{i}.xml"
        path.write_text(xml, encoding="utf-8")
        running.append((name, subprocess.Popen([tool, str(path), "domain"], stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True)))
    rejected = {}
    for name, proc in running:
        output, _ = proc.communicate(timeout=30)
        if proc.returncode != 0:
            rejected[name] = output
    return rejected


def label(params: DomainParams) -> str:
    return (f"efi={params.firmware.efi} kvm={params.kvm} net={params.network_kind} mac={params.mac!r} "
            f"uuid={params.instance_uuid} machine={params.machine}")


def test_validator_rejects_an_invalid_domain(tmp_path: Path) -> None:
    """The schema check can fail: an unknown device and a bad on_poweroff value are rejected."""
    root = ET.fromstring(domain_xml(make_params()))
    ET.SubElement(root.find("devices"), "bogus")
    bad_action = ET.fromstring(domain_xml(make_params()))
    bad_action.find("on_poweroff").text = "explode"
    documents = {"bogus device": ET.tostring(root, encoding="unicode"),
                 "bad on_poweroff": ET.tostring(bad_action, encoding="unicode"),
                 "ours": domain_xml(make_params())}
    assert set(invalid_documents(documents, tmp_path)) == {"bogus device", "bad on_poweroff"}


@pytest.mark.parametrize("kvm", KVM, ids=["kvm", "tcg"])
@pytest.mark.parametrize("efi", EFI, ids=["legacy", "efi"])
def test_every_combination_validates(efi: bool, kvm: bool, tmp_path: Path) -> None:
    """firmware × accel (parametrized) × network × mac × uuid kind × machine (24 documents per test)."""
    documents = {label(params): domain_xml(params) for params in combinations(efi, kvm)}
    assert len(documents) == 24
    assert invalid_documents(documents, tmp_path) == {}


# ---------------------------------------------------------------------------------------------------------
# Escaping


def test_special_characters_in_paths_are_escaped(tmp_path: Path) -> None:
    """A data dir named a&b<c>"d' gives well-formed XML that validates; metadata and paths round-trip."""
    data_dir = Path("/srv") / NASTY / "data"
    params = make_params(CIAO_UUID, data_dir, efi=True)
    params = attrs.evolve(params, firmware=attrs.evolve(params.firmware, ovmf_vars_template=data_dir / "VARS.fd"))
    xml = domain_xml(params)
    assert "&amp;" in xml and "&lt;" in xml
    root = ET.fromstring(xml)  # well-formed
    assert read_metadata(xml) == domain.DomainMetadata(instance_uuid=CIAO_UUID, data_dir=str(data_dir))
    assert root.find("devices/disk[@device='disk']/source").get("file") == str(params.overlay)
    assert root.find("devices/serial/log").get("file") == str(params.console_log)
    assert root.find("os/nvram").text == str(params.nvram)
    assert root.find("os/nvram").get("template") == str(data_dir / "VARS.fd")
    assert invalid_documents({"nasty": xml}, tmp_path) == {}


def test_read_metadata_without_ours() -> None:
    assert read_metadata("<domain type='qemu'><name>other</name></domain>") is None
    foreign = "<domain type='qemu'><metadata><x:instance xmlns:x='urn:other'/></metadata></domain>"
    assert read_metadata(foreign) is None


# ---------------------------------------------------------------------------------------------------------
# The XML's meaning


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("uuid_kind", UUID_KINDS)
@pytest.mark.parametrize("mac", MACS, ids=["mac", "nomac"])
@pytest.mark.parametrize("network", NETWORKS, ids=[kind for kind, _ in NETWORKS])
@pytest.mark.parametrize("kvm", KVM, ids=["kvm", "tcg"])
@pytest.mark.parametrize("efi", EFI, ids=["legacy", "efi"])
def test_xml_meaning(efi: bool, kvm: bool, network: tuple[str, str], mac: str, uuid_kind: str,
                     machine: str) -> None:
    params = make_params(instance_uuid(uuid_kind), efi=efi, kvm=kvm, network=network, mac=mac, machine=machine)
    root = ET.fromstring(domain_xml(params))

    assert root.tag == "domain" and root.get("type") == ("kvm" if kvm else "qemu")
    assert root.findtext("name") == f"launcher-{params.instance_uuid}" == params.name
    if uuid_kind == "uuid":
        assert root.findtext("uuid") == UUID
    else:  # a stable UUID derived from the ciao id, so a RESTART redefines the same domain
        assert root.findtext("uuid") == CIAO_LIBVIRT_UUID
    assert read_metadata(ET.tostring(root, encoding="unicode")) == domain.DomainMetadata(
        params.instance_uuid, str(DATA_DIR))
    assert (root.findtext("memory"), root.find("memory").get("unit")) == ("384", "MiB")
    assert root.findtext("vcpu") == "2"

    os_type = root.find("os/type")
    assert (os_type.text, os_type.get("arch"), os_type.get("machine")) == ("hvm", "x86_64", machine)
    loader, nvram = root.find("os/loader"), root.find("os/nvram")
    if efi:
        assert loader.text == str(OVMF_CODE) and loader.get("type") == "pflash" and loader.get("readonly") == "yes"
        assert nvram.text == str(params.nvram) == str(DATA_DIR / "instances" / params.instance_uuid / "nvram.fd")
        assert nvram.get("template") == str(OVMF_VARS)
    else:
        assert loader is None and nvram is None
    assert root.find("os/boot").get("dev") == "hd"

    assert root.find("features/acpi") is not None
    cpus = root.findall("cpu")
    assert [cpu.get("mode") for cpu in cpus] == (["host-passthrough"] if kvm else [])
    assert root.findtext("on_poweroff") == "destroy"
    assert root.findtext("on_crash") == "destroy"

    disks = root.findall("devices/disk")
    assert [d.get("device") for d in disks] == ["disk", "cdrom"]
    overlay, seed = disks
    assert overlay.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert overlay.find("driver").get("type") == "qcow2"
    assert overlay.find("source").get("file") == str(params.overlay)
    assert seed.find("target").get("bus") == "sata"
    assert seed.find("readonly") is not None
    assert seed.find("source").get("file") == str(params.seed)

    nics = root.findall("devices/interface")
    kind, source = network
    if kind == "none":
        assert nics == []
    else:
        (nic,) = nics
        assert nic.get("type") == kind
        assert nic.find("source").attrib == {kind: source}
        assert nic.find("model").get("type") == "virtio"
        if mac:
            assert nic.find("mac").get("address") == "02:00:e6:f5:af:f9"
        else:
            assert nic.find("mac") is None

    (serial,) = root.findall("devices/serial")
    assert serial.find("log").attrib == {"file": str(params.console_log), "append": "on"}
    assert serial.find("log").get("file").endswith("/console.log")
    assert root.find("devices/console/target").get("type") == "serial"
    channel_targets = [c.find("target").attrib for c in root.findall("devices/channel")]
    assert channel_targets == [{"type": "virtio", "name": "org.qemu.guest_agent.0"}]
    assert root.find("devices/graphics") is None


def test_upper_case_uuid_is_canonical_in_uuid_but_kept_in_name_and_metadata() -> None:
    upper = UUID.upper()
    xml = domain_xml(make_params(upper))
    root = ET.fromstring(xml)
    assert root.findtext("uuid") == UUID
    assert root.findtext("name") == f"launcher-{upper}"
    assert read_metadata(xml) == domain.DomainMetadata(upper, str(DATA_DIR))


# (instance uuid, its canonical form or None, the domain's libvirt UUID). The derived UUIDs are written out: a
# domain's UUID must not change between launcher versions (uuid5 in the launcher's metadata namespace).
@pytest.mark.parametrize(("given", "canonical", "in_libvirt"), [
    (UUID, UUID, UUID),
    (UUID.upper(), UUID, UUID),
    ("00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000",
     "00000000-0000-0000-0000-000000000000"),
    (CIAO_UUID, None, CIAO_LIBVIRT_UUID),
    (UUID.replace("-", ""), None, "ffc3f7df-604f-5c53-b53e-cc142b029b7e"),  # a UUID to Python, not canonical
    ("{" + UUID + "}", None, "a5c3e2a2-abb0-5896-9515-2836101dc871"),
    ("urn:uuid:" + UUID, None, "02f9bdde-a007-585d-9c91-584ec49ce460"),
    (UUID[:8] + UUID[9:], None, "ed1d6de2-bc7e-52ef-9eba-24df51a974f4"),  # a dash missing
    (UUID + "-0", None, "85f00013-cbfb-571a-8e04-e1d0c442c14f"),
    ("", None, "0ef75171-b043-5a52-b56d-61230ff77fed"),
    ("g" + UUID[1:], None, "466aab85-497e-5466-b60d-5758af3bb7a2"),
])
def test_canonical_uuid(given: str, canonical: str | None, in_libvirt: str) -> None:
    assert canonical_uuid(given) == canonical
    assert libvirt_uuid(given) == in_libvirt


def test_domain_params_from_a_spec() -> None:
    """QemuBackend.domain_params: firmware from fw_type, MAC and network from the spec and settings."""
    settings = QemuSettings(machine="pc", network=NetworkSettings("bridge", "br7"), ovmf_code=OVMF_CODE,
                            ovmf_vars=OVMF_VARS)
    backend = QemuBackend(settings, _host(DATA_DIR), hypervisor=None, images=None, kvm=False)  # type: ignore[arg-type]
    spec = InstanceSpec(instance_uuid=UUID, image_uuid="img", vcpus=3, mem_mb=640,
                        networking=Networking(vnic_mac=MAC))
    instance_dir = DATA_DIR / "instances" / UUID
    params = backend.domain_params(spec, instance_dir)
    expected = make_params(UUID, kvm=False, network=("bridge", "br7"), machine="pc")
    assert params == attrs.evolve(expected, vcpus=3, mem_mb=640, hotplug_slots=settings.hotplug_slots)
    legacy = backend.domain_params(attrs.evolve(spec, fw_type="legacy"), instance_dir)
    assert not legacy.firmware.efi
    assert (legacy.vcpus, legacy.mem_mb) == (3, 640)


# ---------------------------------------------------------------------------------------------------------
# libvirt's test driver


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    """A test:///default connection; domains it did not have before are removed afterwards."""
    connection = libvirt.open(TEST_URI)
    before = {dom.name() for dom in connection.listAllDomains()}
    yield connection
    for dom in connection.listAllDomains():
        if dom.name() not in before:
            persistent = dom.isPersistent()  # a transient domain is gone once destroyed
            if dom.isActive():
                dom.destroy()
            if persistent:
                dom.undefine()
    connection.close()


@pytest.fixture
def undefine_flags(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The flags of every virDomain.undefineFlags call; VIR_DOMAIN_UNDEFINE_NVRAM is dropped before the call.

    The test driver refuses it ("unsupported flags (0x4) in function testDomainUndefineFlags"); the QEMU
    driver supports it. The tests check that remove_domain asks for it."""
    calls: list[int] = []
    original = libvirt.virDomain.undefineFlags

    def undefine(self: libvirt.virDomain, flags: int = 0) -> int:
        calls.append(flags)
        return original(self, flags & ~libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

    monkeypatch.setattr(libvirt.virDomain, "undefineFlags", undefine)
    return calls


def _exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        assert exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
        return False
    return True


def test_test_driver_defines_every_combination(conn: libvirt.virConnect) -> None:
    """defineXML accepts every combination; our metadata element and read_metadata come back through libvirt."""
    data_dir = Path("/srv") / NASTY
    for efi, kvm in itertools.product(EFI, KVM):
        for network, mac, kind, machine in itertools.product(NETWORKS, MACS, UUID_KINDS, MACHINES):
            params = make_params(instance_uuid(kind, unique=True), data_dir, efi=efi, kvm=kvm, network=network,
                                 mac=mac, machine=machine)
            dom = conn.defineXML(domain_xml(params))
            assert dom.name() == params.name
            if kind == "uuid":
                assert dom.UUIDString() == params.instance_uuid
            element = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domain.METADATA_NS))
            assert element.tag == "instance"
            assert element.findtext("uuid") == params.instance_uuid
            assert element.findtext("data-dir") == str(data_dir)
            assert read_metadata(dom.XMLDesc(0)) == domain.DomainMetadata(params.instance_uuid, str(data_dir))
            dom.undefine()


@pytest.mark.parametrize("kind", ["uuid", "ciao"])
def test_define_twice_as_restart_does(conn: libvirt.virConnect, kind: str) -> None:
    """start_vm defines the domain on every START/RESTART; the domain stays defined after a stop."""
    params = make_params(instance_uuid(kind, unique=True), efi=False, kvm=False)
    first = conn.defineXML(domain_xml(params))
    second = conn.defineXML(domain_xml(params))
    assert second.UUIDString() == first.UUIDString()


def test_remove_domain(conn: libvirt.virConnect, undefine_flags: list[int]) -> None:
    """A running domain is destroyed, then undefined with its NVRAM; a missing one gives False."""
    running = conn.defineXML(domain_xml(make_params(instance_uuid("uuid", unique=True), efi=True)))
    running.create()
    assert running.isActive()
    stopped = conn.defineXML(domain_xml(make_params(instance_uuid("ciao", unique=True), efi=False)))

    assert remove_domain(conn, running.name()) is True
    # Undefining a running domain would have left it running as a transient one: it is gone entirely.
    assert not _exists(conn, running.name())
    wanted = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    assert undefine_flags == [wanted]

    assert remove_domain(conn, stopped.name()) is True
    assert not _exists(conn, stopped.name())
    assert remove_domain(conn, stopped.name()) is False
    assert remove_domain(conn, "launcher-never-defined") is False
    assert len(undefine_flags) == 2


# The QEMU backend with what our_domains and handle_orphans use: a host and a hypervisor that runs each call
# directly on the test connection.


@attrs.define
class DirectHypervisor:
    conn: libvirt.virConnect

    async def call(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        return fn(self.conn)


def _host(data_dir: Path, events: list[tuple[str, dict[str, Any]]] | None = None) -> BackendHost:
    def emit(type_: str, **fields: Any) -> None:
        if events is not None:
            events.append((type_, fields))

    return BackendHost(data_dir, trio.CapacityLimiter(1), emit, lambda path, message: None)


def _backend(conn: libvirt.virConnect, data_dir: Path, destroy_orphans: bool,
             events: list[tuple[str, dict[str, Any]]]) -> QemuBackend:
    return QemuBackend(QemuSettings(destroy_orphans=destroy_orphans), _host(data_dir, events),
                       DirectHypervisor(conn), images=None, kvm=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("destroy_orphans", [False, True])
async def test_our_domains_and_orphans(conn: libvirt.virConnect, undefine_flags: list[int], tmp_path: Path,
                                       destroy_orphans: bool) -> None:
    """Only domains with our metadata and our data dir are ours; those without an instance dir are
    reported, and destroyed only with destroy_orphans."""
    data_dir = tmp_path / NASTY
    kept, orphan = instance_uuid("uuid", unique=True), instance_uuid("ciao", unique=True)
    (data_dir / "instances" / kept).mkdir(parents=True)
    for uuid_ in (kept, orphan):
        conn.defineXML(domain_xml(make_params(uuid_, data_dir, efi=False, kvm=False)))
    other_launcher = instance_uuid("uuid", unique=True)
    conn.defineXML(domain_xml(make_params(other_launcher, tmp_path / "other", efi=False, kvm=False)))
    conn.createXML(f"<domain type='test'><name>foreign-{uuid.uuid4()}</name><memory>1024</memory>"
                   "<os><type>hvm</type></os></domain>")  # no metadata, running, transient

    events: list[tuple[str, dict[str, Any]]] = []
    backend = _backend(conn, data_dir, destroy_orphans, events)
    ours = await backend.our_domains()
    assert sorted(meta.instance_uuid for meta in ours) == sorted([kept, orphan])
    assert {meta.data_dir for meta in ours} == {str(data_dir)}

    await backend.handle_orphans()
    assert events == [("orphan_domain", {"instance_uuid": orphan, "domain": domain.domain_name(orphan),
                                         "destroyed": destroy_orphans})]
    assert _exists(conn, domain.domain_name(orphan)) is not destroy_orphans
    assert _exists(conn, domain.domain_name(kept))
    assert _exists(conn, domain.domain_name(other_launcher))


# ---------------------------------------------------------------------------------------------------------
# Settings and accel


def test_settings_defaults() -> None:
    assert parse_section(QemuSettings, {}, "qemu.") == QemuSettings()


def test_settings_full_section() -> None:
    raw = {
        "uri": "qemu+ssh://host/system", "accel": "tcg", "machine": "pc", "seed_format": "configdrive",
        "network": {"kind": "bridge", "source": "br0"}, "image_dirs": ["/srv/images", "rel"],
        "image_url": "https://images.example/{id}.qcow2", "image_gc_age_s": 3600, "ovmf_code": "/o/CODE.fd",
        "ovmf_vars": "/o/VARS.fd", "destroy_orphans": True, "libvirt_threads": 3, "libvirt_timeout_s": 7,
        "import_sources": ["/srv/more", "https://mirror.example/images"], "image_max_bytes": 1 << 30,
        "guest_network": {"gateway": "10.0.0.254", "dns_servers": ["10.0.0.53", "fd00::53"],
                          "dns_search": ["example.org"], "mtu": 9000},
        "volumes": {"pool": "ceph-volumes", "detach_timeout_s": 12}, "hotplug_slots": 2, "state_poll_s": 600,
        "pools": [{"image_uuid": "img", "vcpus": 2, "mem_mb": 512, "fw_type": "legacy", "size": 3}],
        "slot_make_timeout_s": 30, "templates": [{"image_uuid": "img", "vcpus": 2, "mem_mb": 384, "fw_type": "efi"}],
        "template_boot_timeout_s": 90, "clone_ready_timeout_s": 20,
    }
    assert parse_section(QemuSettings, raw, "qemu.") == QemuSettings(
        uri="qemu+ssh://host/system", accel="tcg", machine="pc", seed_format="configdrive",
        network=NetworkSettings(kind="bridge", source="br0"), image_dirs=(Path("/srv/images"), Path("rel")),
        image_url="https://images.example/{id}.qcow2", image_gc_age_s=3600.0, ovmf_code=Path("/o/CODE.fd"),
        ovmf_vars=Path("/o/VARS.fd"), destroy_orphans=True, libvirt_threads=3, libvirt_timeout_s=7.0,
        import_sources=("/srv/more", "https://mirror.example/images"), image_max_bytes=1 << 30,
        guest_network=GuestNetwork("10.0.0.254", ("10.0.0.53", "fd00::53"), ("example.org",), 9000),
        volumes=VolumeSettings(pool="ceph-volumes", detach_timeout_s=12.0), hotplug_slots=2, state_poll_s=600.0,
        pools=(PoolSettings("img", vcpus=2, mem_mb=512, fw_type="legacy", size=3),), slot_make_timeout_s=30.0,
        templates=(TemplateSettings("img", vcpus=2, mem_mb=384, fw_type="efi"),), template_boot_timeout_s=90.0,
        clone_ready_timeout_s=20.0,
    )
    assert {f.name for f in attrs.fields(QemuSettings)} == set(raw)  # the section above is complete


@pytest.mark.parametrize(("raw", "key"), [
    ({"accel": "hvf"}, "qemu.accel"),
    ({"seed_format": "iso"}, "qemu.seed_format"),
    ({"network": {"kind": "macvtap"}}, "qemu.network.kind"),
    ({"image_dirs": "/srv/images"}, "qemu.image_dirs"),
    ({"destroy_orphans": "yes"}, "qemu.destroy_orphans"),
    ({"import_sources": ["ftp://x/"]}, "qemu.import_sources"),
    ({"image_max_bytes": -1}, "qemu.image_max_bytes"),
    ({"state_poll_s": 0}, "qemu.state_poll_s"),
    ({"bogus": 1}, "qemu.bogus"),
    ({"guest_network": {"gateway": "router"}}, "qemu.guest_network.gateway"),
    ({"guest_network": {"gateway": "10.0.0.300"}}, "qemu.guest_network.gateway"),
    ({"guest_network": {"dns_servers": ["ns1.example"]}}, "qemu.guest_network.dns_servers"),
    ({"guest_network": {"dns_servers": "10.0.0.53"}}, "qemu.guest_network.dns_servers"),
    ({"guest_network": {"dns_search": ["bad domain"]}}, "qemu.guest_network.dns_search"),
    ({"guest_network": {"mtu": 20}}, "qemu.guest_network.mtu"),
    ({"guest_network": {"mtu": 70000}}, "qemu.guest_network.mtu"),
    ({"pools": [{"image_uuid": "i", "size": 0}]}, "qemu.pools[0].size"),
    ({"pools": [{"image_uuid": "i"}, {"image_uuid": "i"}]}, "qemu.pools[1]"),
    ({"pools": [{"image_uuid": "i"}], "hotplug_slots": 4}, "qemu.pools"),
])
def test_settings_errors_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_section(QemuSettings, raw, "qemu.")
    assert str(caught.value).startswith(f"{key}: ")


def test_pools_hotplug_slots_leave_a_root_port_for_the_nic() -> None:
    """A claim plugs the NIC into a spare root port: on q35 with a NIC, hotplug_slots 1..4 leave none (the spike)."""
    pools = [{"image_uuid": "i"}]
    for ok in ({"hotplug_slots": 0}, {"hotplug_slots": 5}, {"hotplug_slots": 2, "machine": "pc"},
               {"hotplug_slots": 2, "network": {"kind": "none"}}, {"hotplug_slots": 2, "pools": []}):
        parse_section(QemuSettings, {"pools": pools, **ok}, "qemu.")


def test_slot_domain_xml() -> None:
    """A slot's domain: its own name, uuid and metadata (not an instance's), an empty cdrom, no NIC; a claim's
    pieces are the cold domain's elements."""
    shape = SlotShape("img", 1, 256, "legacy", 0)
    slot_id = uuid.uuid4().hex
    params = attrs.evolve(make_params(), seed=None, slot=domain.SlotMetadata(slot_id, str(DATA_DIR), shape))
    xml = domain_xml(params)
    root = ET.fromstring(xml)
    assert root.findtext("name") == f"launcher-slot-{slot_id}"
    assert root.findtext("uuid") == str(uuid.UUID(hex=slot_id))
    assert domain.read_metadata(xml) is None
    assert domain.read_slot_metadata(xml) == domain.SlotMetadata(slot_id, str(DATA_DIR), shape)
    assert root.find("devices/interface") is None
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom is not None and cdrom.find("source") is None and cdrom.find("target").get("bus") == "sata"
    cold = ET.fromstring(domain_xml(make_params()))
    assert ET.canonicalize(domain.nic_xml("network", "default", MAC), strip_text=True) == ET.canonicalize(
        ET.tostring(cold.find("devices/interface"), encoding="unicode"), strip_text=True)
    seed = DATA_DIR / "instances" / UUID / qemu.SEED
    assert ET.canonicalize(domain.cdrom_xml(seed), strip_text=True) == ET.canonicalize(
        ET.tostring(cold.find("devices/disk[@device='cdrom']"), encoding="unicode"), strip_text=True)
    metadata = ET.fromstring(domain.instance_metadata_xml(UUID, DATA_DIR))
    assert (metadata.tag, metadata.findtext("uuid"), metadata.findtext("data-dir")) == ("instance", UUID,
                                                                                         str(DATA_DIR))


def test_resolve_accel(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_accel("tcg") is False
    assert resolve_accel("kvm") is True
    for problem in (None, "no module"):
        monkeypatch.setattr(preflight, "kvm_problem", lambda problem=problem: problem)
        assert resolve_accel("auto") is (problem is None)
        assert resolve_accel("tcg") is False


def test_kvm_is_looked_for_in_sys_module_and_dev_kvm() -> None:
    """What the host's `kvm_problem()` reads; the cases below give it fake ones."""
    parameters = inspect.signature(preflight.kvm_problem).parameters
    defaults = {name: parameter.default for name, parameter in parameters.items()}
    assert defaults == {"modules": Path("/sys/module"), "device": Path("/dev/kvm")}


NO_VENDOR = "no kvm_intel or kvm_amd module is loaded (does the CPU expose VT-x or AMD-V to this host?)"


@pytest.mark.parametrize(("modules", "dev_kvm", "problem"), [
    ({"kvm", "kvm_intel"}, True, None),
    ({"kvm", "kvm_amd"}, True, None),
    ({"kvm", "kvm_intel"}, False, "{device} does not exist"),
    ({"kvm", "kvm_pvm"}, True, NO_VENDOR),  # a nested paravirtual KVM provides /dev/kvm but boots no ordinary guest
    ({"kvm", "kvm_pvm"}, False, NO_VENDOR),
    (set(), False, NO_VENDOR),
])
def test_kvm_needs_a_vendor_module_and_dev_kvm(tmp_path: Path, modules: set[str], dev_kvm: bool,
                                              problem: str | None) -> None:
    (tmp_path / "module").mkdir()
    for name in modules:
        (tmp_path / "module" / name).mkdir()
    device = tmp_path / "kvm"
    if dev_kvm:
        device.write_bytes(b"")
    expected = None if problem is None else problem.format(device=device)
    assert preflight.kvm_problem(tmp_path / "module", device) == expected


def test_volumes_are_virtio_disks_with_their_id_as_serial(tmp_path: Path) -> None:
    volumes = (VolumeDisk(Path("/srv/vols/0a1b-0001.qcow2"), "qcow2", "0a1b-0001"),
               VolumeDisk(Path("/srv/vols/4e16e743-265a-4bf2-9fd1-57ada0b28904.raw"), "raw",
                          "4e16e743-265a-4bf2-9fd1-57ada0b28904"))
    documents = {f"efi={efi}": domain_xml(attrs.evolve(make_params(efi=efi), volumes=volumes)) for efi in (True, False)}
    assert invalid_documents(documents, tmp_path) == {}
    disks = ET.fromstring(documents["efi=True"]).findall("./devices/disk[@device='disk']")
    assert [(d.find("target").get("dev"), d.find("source").get("file"), d.find("driver").get("type"),
             d.findtext("serial")) for d in disks] == [  # type: ignore[union-attr]
        ("vda", str(DATA_DIR / "instances" / UUID / qemu.OVERLAY), "qcow2", None),
        ("vdb", "/srv/vols/0a1b-0001.qcow2", "qcow2", "0a1b-0001"),
        ("vdc", "/srv/vols/4e16e743-265a-4bf2-9fd1-57ada0b28904.raw", "raw", "4e16e743-265a-4bf2-9fd1-57ada0b28904"),
    ]
    with pytest.raises(ValueError, match="at most 24 volumes"):
        domain_xml(attrs.evolve(make_params(), volumes=volumes[:1] * 25))


def test_a_q35_domain_has_spare_root_ports_for_hot_plugs(tmp_path: Path) -> None:
    documents = {machine: domain_xml(attrs.evolve(make_params(machine=machine), hotplug_slots=3))
                 for machine in ("q35", "pc-q35-7.2", "pc")}
    assert invalid_documents(documents, tmp_path) == {}
    ports = {machine: len(ET.fromstring(xml).findall("./devices/controller[@model='pcie-root-port']"))
             for machine, xml in documents.items()}
    assert ports == {"q35": 3, "pc-q35-7.2": 3, "pc": 0}  # i440fx hot-plugs into its own PCI bus


def test_hot_plug_xml_is_the_volume_disk_on_the_first_free_target() -> None:
    first = VolumeDisk(Path("/srv/vols/0a1b-0001.qcow2"), "qcow2", "0a1b-0001")
    second = VolumeDisk(Path("/srv/vols/0a1b-0002.raw"), "raw", "0a1b-0002")
    xml = domain_xml(attrs.evolve(make_params(), volumes=(first, second)))
    assert domain.free_target(xml) == "vdd"
    plugged = ET.fromstring(domain.volume_disk_xml(second, "vdd"))
    defined = ET.fromstring(domain.find_volume_disk(xml, "0a1b-0002") or "")
    assert plugged.find("target").get("dev") == "vdd"  # type: ignore[union-attr]
    defined.find("target").set("dev", "vdd")  # type: ignore[union-attr]
    for element in (plugged, defined):
        ET.indent(element)
    assert ET.tostring(plugged) == ET.tostring(defined)  # the same element as at define time, on its new target
    assert domain.find_volume_disk(xml, "0a1b-0009") is None
    assert domain.volume_disk_alias(xml, "0a1b-0002") is None  # a defined domain's XML: libvirt names devices live
    live = ET.fromstring(xml)
    for disk in live.iterfind("devices/disk"):
        ET.SubElement(disk, "alias", name=f"virtio-disk{disk.findtext('serial') or '0'}")
    assert domain.volume_disk_alias(ET.tostring(live, encoding="unicode"), "0a1b-0002") == "virtio-disk0a1b-0002"
    assert domain.volume_disk_alias(ET.tostring(live, encoding="unicode"), "0a1b-0009") is None
    # Once vdb is free again (its volume detached), a hot-plug takes it.
    without_first = domain_xml(attrs.evolve(make_params(), volumes=(second,)))
    assert domain.free_target(without_first) == "vdc"
    full = domain_xml(attrs.evolve(make_params(), volumes=(first,) * MAX_VOLUMES))
    assert domain.free_target(full) == "vdz"  # the last: an instance has at most MAX_VOLUMES (the actor says so)
    every = ET.fromstring(full)
    devices = every.find("devices")
    assert devices is not None
    ET.SubElement(ET.SubElement(devices, "disk"), "target", dev="vdz")
    assert domain.free_target(ET.tostring(every, encoding="unicode")) is None


def _boot_disks(xml: str) -> list[tuple[str, str | None, str | None]]:
    """(target, serial, boot order) of each disk of the domain XML."""
    found = []
    for disk in ET.fromstring(xml).findall("./devices/disk[@device='disk']"):
        boot = disk.find("boot")
        found.append((disk.find("target").get("dev"), disk.findtext("serial"),  # type: ignore[union-attr]
                      None if boot is None else boot.get("order")))
    return found


def test_an_instance_booting_from_a_volume_has_no_overlay_and_boots_by_device_order(
        tmp_path: Path, conn: libvirt.virConnect) -> None:
    """No overlay: the boot volume is vda with boot order 1, an indexed volume order 2, the others none; `<os>` has no
    `<boot dev>` (libvirt refuses both); the schema and libvirt's own parser (test driver) accept it."""
    volumes = (VolumeDisk(Path("/srv/vols/b-1.qcow2"), "qcow2", "b-1", boot_order=1),
               VolumeDisk(Path("/srv/vols/d-2.raw"), "raw", "d-2"),
               VolumeDisk(Path("/srv/vols/d-3.qcow2"), "qcow2", "d-3", boot_order=2))
    documents = {f"efi={efi}": domain_xml(attrs.evolve(make_params(instance_uuid("uuid", unique=True), efi=efi),
                                                       overlay=None, volumes=volumes)) for efi in (True, False)}
    assert invalid_documents(documents, tmp_path) == {}
    for xml in documents.values():
        assert _boot_disks(xml) == [("vda", "b-1", "1"), ("vdb", "d-2", None), ("vdc", "d-3", "2")]
        assert ET.fromstring(xml).find("./os/boot") is None
        conn.defineXML(xml).undefine()


def test_an_image_instance_with_an_indexed_volume_gives_the_overlay_order_1(
        tmp_path: Path, conn: libvirt.virConnect) -> None:
    volumes = (VolumeDisk(Path("/srv/vols/d-1.qcow2"), "qcow2", "d-1", boot_order=2),)
    xml = domain_xml(attrs.evolve(make_params(instance_uuid("uuid", unique=True)), volumes=volumes,
                                  overlay_boot_order=1))
    assert invalid_documents({"indexed": xml}, tmp_path) == {}
    assert _boot_disks(xml) == [("vda", None, "1"), ("vdb", "d-1", "2")]
    assert ET.fromstring(xml).find("./os/boot") is None
    conn.defineXML(xml).undefine()
    plain = domain_xml(attrs.evolve(make_params(), volumes=(VolumeDisk(Path("/v/d-1.raw"), "raw", "d-1"),)))
    assert ET.fromstring(plain).find("./os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    assert _boot_disks(plain) == [("vda", None, None), ("vdb", "d-1", None)]


def test_domain_params_of_a_spec_that_boots_from_a_volume() -> None:
    backend = QemuBackend(QemuSettings(), _host(DATA_DIR), hypervisor=None, images=None,  # type: ignore[arg-type]
                          kvm=False)
    spec = InstanceSpec(instance_uuid=UUID, storage=(StorageEntry("b-1", boot=True),))
    assert backend.domain_params(spec, DATA_DIR / "instances" / UUID).overlay is None
    with_image = attrs.evolve(spec, image_uuid="img", storage=())
    assert backend.domain_params(with_image, DATA_DIR / "instances" / UUID).overlay == \
        DATA_DIR / "instances" / UUID / qemu.OVERLAY
