"""Template clones on real QEMU (issue 19, virtualizers/qemu/templates.py): the test guest booted once and saved as a
template, then two clones restored from it, each with its own name, UUID, overlay, seed, MAC and instance-id.

Both clones run at once; each prints its own guest-ready identity after the console kick; their RNG values and MACs
differ (from each other and from the template's); each one's guest RAM is private to its QEMU (no shared pages).
START -> guest-ready of a clone is measured against a cold boot of the same guest and printed (run with -s).
Every domain and file it made is removed, also on failure: the clones and the cold domain by name, the template
domain and dirs by `TemplateStore.cleanup`, the data dir by `qemu_test_root`."""

from __future__ import annotations

import hashlib
import secrets
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest
import trio

from virtualizers.qemu import clone_restore, cloudinit, domain, domain_calls, qemu_img, save_image, templates
from virtualizers.qemu.domain import DomainParams, Firmware
from virtualizers.qemu.hypervisor import Hypervisor, open_hypervisor
from virtualizers.qemu.images import ImageInfo

URI = "qemu:///system"
MEM_MB = 256
COLD_READY_TIMEOUT_S = 300.0


def seed_of(instance_id: str, hostname: str) -> cloudinit.Seed:
    return cloudinit.Seed(label="cidata", files={
        "meta-data": f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n".encode(),
        "user-data": b"#cloud-config\n"}, instance_id=instance_id, hostname=hostname)


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def guest_ram_mappings(name: str) -> list[dict[str, int]]:
    """The smaps fields (kB) of the QEMU process of domain `name` for every mapping of at least 3/4 of its RAM."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    mappings: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            current = {}
            mappings.append(current)
        elif current is not None and head and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            current[head[0].rstrip(":")] = int(head[1])
    return [m for m in mappings if m.get("Size", 0) >= MEM_MB * 1024 * 3 // 4]


async def cold_boot(hv: Hypervisor, data_dir: Path, image: ImageInfo, name_uuid: str) -> float:
    """START -> guest-ready of a cold boot of the image (overlay, seed, define, create, wait), in seconds."""
    directory = data_dir / "instances" / name_uuid
    directory.mkdir(mode=0o711, parents=True)
    started = time.monotonic()
    await qemu_img.create_overlay(directory / "overlay.qcow2", image.path, image.format, image.virtual_size)
    await trio.to_thread.run_sync(cloudinit.write_seed, seed_of("cold-1", "cold-1"), directory / "seed.iso")
    xml = domain.domain_xml(DomainParams(
        instance_uuid=name_uuid, data_dir=data_dir, vcpus=1, mem_mb=MEM_MB, kvm=False, machine="q35",
        firmware=Firmware(efi=False), overlay=directory / "overlay.qcow2", seed=directory / "seed.iso",
        network_kind="network", network_source="default", mac=random_mac(), console_log=directory / "console.log",
        nvram=directory / "nvram.fd", hotplug_slots=8))
    await hv.call(lambda c: c.defineXML(xml).create())
    _, seen = await templates.wait_for_line(directory / "console.log", lambda line: line.startswith(
        "guest-ready ") and "instance-id=cold-1 " in line, COLD_READY_TIMEOUT_S)
    return seen - started


@pytest.mark.timeout(1200)
async def test_two_clones_of_a_template_have_their_own_identity_and_memory(qemu_test_root: Any,
                                                                           guest_image: Path) -> None:
    data_dir = qemu_test_root.path / "data"
    data_dir.mkdir(mode=0o711)
    (data_dir / "images").mkdir(mode=0o711)
    image_path = data_dir / "images" / "guest.img"
    shutil.copyfile(guest_image, image_path)
    image_path.chmod(0o644)
    info = await qemu_img.info(image_path)
    image = ImageInfo(id="guest", path=image_path, format="qcow2", virtual_size=int(info["virtual-size"]),
                      size=image_path.stat().st_size, sha256=hashlib.sha256(image_path.read_bytes()).hexdigest(),
                      source=str(guest_image), imported_at="", sha256_verified=False, last_used=0.0)
    spec = templates.TemplateSpec(image=image, vcpus=1, mem_mb=MEM_MB, firmware=Firmware(efi=False), machine="q35",
                                  hotplug_slots=8, kvm=False)
    clone_names: list[str] = []
    figures: dict[str, Any] = {}
    async with open_hypervisor(URI, threads=4, call_timeout_s=120) as hv:
        store = templates.TemplateStore(data_dir, hv, trio.CapacityLimiter(4))
        try:
            built = time.monotonic()
            template = await store.ensure(spec)
            figures["template_build_s"] = round(time.monotonic() - built, 2)
            figures["template"] = {k: template.record[k] for k in ("state_bytes", "timings_s")}
            assert (template.disk.stat().st_mode & 0o777) == 0o444
            assert not list(store.root.glob("*.partial"))
            assert await hv.call(lambda c: [d.name() for d in c.listAllDomains()
                                            if d.name().startswith(templates.DOMAIN_PREFIX)]) == []
            assert "<genid" in template.header.xml and "nosharepages" in template.header.xml
            assert "<interface" not in template.header.xml
            template_identity = templates.fields((template.path / "console.log").read_text().split(
                "guest-identity ", 1)[1].splitlines()[0])

            cold_uuid = str(uuid.uuid4())
            clone_names.append(domain.domain_name(cold_uuid))
            figures["cold_ready_s"] = round(await cold_boot(hv, data_dir, image, cold_uuid), 2)
            await hv.call(lambda c: domain_calls.remove_domain(c, domain.domain_name(cold_uuid)))

            results, macs = {}, {}
            for index in (1, 2):
                instance_uuid = str(uuid.uuid4())
                name = domain.domain_name(instance_uuid)
                clone_names.append(name)
                directory = data_dir / "instances" / instance_uuid
                directory.mkdir(mode=0o711, parents=True)
                macs[index] = random_mac()
                started = time.monotonic()
                await clone_restore.make_clone_overlay(template, directory / "overlay.qcow2")
                await trio.to_thread.run_sync(cloudinit.write_seed, seed_of(f"clone-{index}", f"host-{index}"),
                                              directory / "seed.iso")
                prepared = time.monotonic() - started
                clone = save_image.CloneIdentity(
                    name=name, uuid=instance_uuid, metadata=domain.DomainMetadata(instance_uuid, str(data_dir)),
                    template_key=template.key, overlay=directory / "overlay.qcow2", seed=directory / "seed.iso",
                    console_log=directory / "console.log")
                result = await clone_restore.restore_clone(hv, template, clone, instance_id=f"clone-{index}",
                                                       mac=macs[index], network_kind="network",
                                                       network_source="default")
                results[index] = result
                figures[f"clone{index}"] = {"ready_s": round(prepared + result.timings["ready"], 3),
                                            "files_s": round(prepared, 3),
                                            **{k: round(v, 3) for k, v in result.timings.items()}}

            # Both run at once, persistent, each with its own name, UUID, MAC and identity.
            identities = {}
            for index, name in ((1, clone_names[1]), (2, clone_names[2])):
                state, persistent, live = await hv.call(lambda c, n=name: (
                    c.lookupByName(n).state()[0], c.lookupByName(n).isPersistent(), c.lookupByName(n).XMLDesc(0)))
                assert state == libvirt.VIR_DOMAIN_RUNNING and persistent
                assert domain.read_metadata(live) == domain.DomainMetadata(name.removeprefix("launcher-"),
                                                                           str(data_dir), template_key=template.key)
                live_macs = [m.get("address") for m in ET.fromstring(live).iterfind("devices/interface/mac")]
                assert live_macs == [macs[index]]
                ready = templates.fields(results[index].ready_line)
                assert (ready["instance-id"], ready["hostname"]) == (f"clone-{index}", f"host-{index}")
                identities[index] = templates.fields(results[index].identity_line)
                assert identities[index]["reidentified"] == "1"
                assert identities[index]["vmgenid"] == "yes" and int(identities[index]["gpe05"]) >= 1
                assert abs(int(identities[index]["time"]) - time.time()) < 120  # the clock was corrected
                added, _ = await templates.wait_for_line(
                    Path(live.split("<log file='", 1)[1].split("'", 1)[0]),
                    lambda line: line.startswith("guest-nic-added "), 60)
                assert templates.fields(added)["mac"] == macs[index]
                mappings = guest_ram_mappings(name)
                assert mappings, "no mapping of the guest's RAM in QEMU's smaps"
                assert all(m.get("Shared_Clean", 0) + m.get("Shared_Dirty", 0) == 0 for m in mappings), mappings
                figures[f"clone{index}"]["ram_private_kb"] = sum(m.get("Private_Dirty", 0) for m in mappings)
            assert identities[1]["rng"] != identities[2]["rng"]
            assert template_identity["rng"] not in (identities[1]["rng"], identities[2]["rng"])
            assert macs[1] != macs[2]
            assert identities[1]["instance-id"] != identities[2]["instance-id"]
            figures["ratio_clone_to_cold"] = [round(figures[f"clone{i}"]["ready_s"] / figures["cold_ready_s"], 3)
                                              for i in (1, 2)]
            print("\ntemplate figures:", figures)
        finally:
            with trio.CancelScope(shield=True):
                for name in clone_names:
                    await hv.call(lambda c, n=name: domain_calls.remove_domain(c, n))
                removed = await store.cleanup(wanted=(), overlays=())
                print("cleanup removed:", removed)
                assert not list(store.root.iterdir()) if store.root.exists() else True
