"""The qemu virtualizer's prepared pools (issue 19, virtualizers/qemu/slots.py and claim.py) end to end: a real
`launcher serve`, real libvirtd, real QEMU (TCG here) and the test guest. A START of a pool's shape claims a slot
held before its first instruction: the guest boots with the claiming instance's identity and MAC; the pool is
refilled; a START of another shape boots cold; a kill -9 mid-claim leaks nothing; a power cycle converges to the
cold layout."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid as uuid_module
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt
from conftest import LauncherProcess, example
from test_qemu import IMAGE_ID, conn, console, events, new_uuid, payload_for, start, wait_for, wait_guest_ready

from launcher.cli.client import Client
from virtualizers.qemu.domain import (
    METADATA_NS,
    METADATA_PREFIX,
    instance_metadata_xml,
    read_metadata,
    read_slot_metadata,
)

POOL = {"image_uuid": IMAGE_ID, "vcpus": 1, "mem_mb": 256, "fw_type": "legacy", "size": 2}
GUEST_NET = re.compile(r"guest-net addr=(?P<addr>\S+) gw=(?P<gw>\S+) probe=(?P<probe>\S+) reached=(?P<reached>\S+)")
STEP = re.compile(r"step (\w+): .* in (\d+) ms")


def pool_payload(uuid: str, *, mem_mb: int = 256, probe: bool = False) -> tuple[bytes, str, str]:
    """start_legacy.yaml for `uuid` with one vCPU, `mem_mb`, its own hostname in the meta-data and (`probe`) the
    test guest's net-probe mode; with its MAC and hostname."""
    text = payload_for("start_legacy.yaml", uuid).decode()
    text = text.replace("       value: 2\n", "       value: 1\n").replace("value: 370", f"value: {mem_mb}")
    hostname = "h" + uuid[:8]
    text = text.replace('"uuid": "ciao"', f'"uuid": "{uuid}"')
    text = text.replace('"hostname": "ciao"', f'"hostname": "{hostname}"')
    if probe:
        text = text.replace("#cloud-config\n", "#cloud-config\ntest_guest_mode: net-probe 192.168.122.1\n")
    mac = re.search(r"vnic_mac: (\S+)", text)
    assert mac is not None
    return text.encode(), mac.group(1), hostname


def pools(client: Client) -> dict[str, Any]:
    pool: dict[str, Any] = client.request("GET", "/v1/node")["warm_pools"]["qemu"][0]
    return pool


def wait_ready(client: Client, ready: int = 2, timeout: float = 120) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(f"{ready} ready slots", lambda: (p := pools(client))["ready"] == ready and p,
                                     timeout=timeout, every=0.3)
    return found


def instance(client: Client, uuid: str) -> dict[str, Any]:
    found: dict[str, Any] = client.request("GET", f"/v1/instances/{uuid}")
    return found


def steps(launcher: LauncherProcess, uuid: str, last: str) -> dict[str, int]:
    """The instance log's `step <name>: ... in <ms> ms` lines (the last of each name), once step `last` is there
    (the log is written out every 0.2 s)."""
    def found() -> dict[str, int] | None:
        text = (launcher.data_dir / "instances" / uuid / "launcher.log").read_text()
        parsed = {name: int(ms) for name, ms in STEP.findall(text)}
        return parsed if last in parsed else None

    parsed: dict[str, int] = wait_for(f"step {last} in {uuid}'s log", found, timeout=10, every=0.2)
    return parsed


def to_running(launcher: LauncherProcess, uuid: str) -> int:
    """Milliseconds from the instance log's "START accepted" line to its first "VM is running" line."""
    stamps = {}
    for line in (launcher.data_dir / "instances" / uuid / "launcher.log").read_text().splitlines():
        stamp, _, text = line.partition(" ")
        for mark in ("START accepted", "VM is running"):
            if text.startswith(mark):
                stamps.setdefault(mark, datetime.fromisoformat(stamp.replace("Z", "+00:00")))
    return round((stamps["VM is running"] - stamps["START accepted"]).total_seconds() * 1000)


def data_dir_domains(data_dir: Path) -> dict[str, tuple[str, str]]:
    """Every domain of `data_dir`: name → (its instance uuid or "", its slot id or "")."""
    found = {}
    for dom in conn().listAllDomains():
        try:
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError:
            continue
        meta, slot = read_metadata(xml), read_slot_metadata(xml)
        if (meta and meta.data_dir == str(data_dir)) or (slot and slot.data_dir == str(data_dir)):
            found[dom.name()] = (meta.instance_uuid if meta else "", slot.slot_id if slot else "")
    return found


def mac_of(name: str) -> list[str]:
    xml = conn().lookupByName(name).XMLDesc(0)
    return [mac.get("address", "") for mac in ET.fromstring(xml).iterfind("devices/interface/mac")]


def test_pool_claim_refill_cold_fallback_power_cycle_and_delete(qemu_factory: Any) -> None:
    """(a) a claimed slot's guest boots with its instance's identity and MAC, start_path pool; (b) the pool is
    refilled; (d) another shape is cold; (e) STOP + RESTART converges to the cold layout, DELETE leaves nothing."""
    launcher = qemu_factory({"pools": [POOL]})
    client = launcher.client()
    data_dir = launcher.data_dir
    wait_ready(client)
    slot_names = {name for name, (_, slot) in data_dir_domains(data_dir).items() if slot}
    assert len(slot_names) == 2 and all(name.startswith("launcher-slot-") for name in slot_names)

    a, b, c = new_uuid(), new_uuid(), new_uuid()
    payload, mac, hostname = pool_payload(a, probe=True)
    assert start(client, payload, wait=1, timeout=120)["state"] == "running"
    assert instance(client, a)["start_path"] == "pool"
    running = wait_for("the running event", lambda: [e for e in events(client, type="instance_state", instance_uuid=a)
                                                     if e["state"] == "running"], timeout=15, every=0.5)
    assert running[-1]["start_path"] == "pool"
    (name_a,) = [name for name, (owner, _) in data_dir_domains(data_dir).items() if owner == a]
    assert name_a in slot_names and mac_of(name_a) == [mac]
    line = wait_guest_ready(launcher, a)
    assert (line["instance-id"], line["hostname"], line["datasource"]) == (a, hostname, "nocloud")
    net = wait_for("the guest-net line", lambda: GUEST_NET.search(console(launcher, a)), every=0.5)
    assert net["reached"] == "yes"
    leases = subprocess.run(["virsh", "-q", "net-dhcp-leases", "default", "--mac", mac], capture_output=True,
                            text=True, timeout=30).stdout
    assert net["addr"] in leases, f"the guest's address {net['addr']} is not leased to {mac}: {leases}"
    pool_steps = steps(launcher, a, "persist")
    assert {"claim", "resume", "persist"} <= set(pool_steps) and "overlay" not in pool_steps

    payload_b, _, _ = pool_payload(b)
    assert start(client, payload_b, wait=1, timeout=120)["state"] == "running"
    assert instance(client, b)["start_path"] == "pool"
    refilled = wait_ready(client)  # (b)
    assert refilled["claimed"] == 2 and refilled["made"] >= 4

    payload_c, _, _ = pool_payload(c, mem_mb=300)  # (d)
    assert start(client, payload_c, wait=1, timeout=120)["state"] == "running"
    assert instance(client, c)["start_path"] == "cold"
    cold_steps = steps(launcher, c, "start")
    assert {"overlay", "define", "start"} <= set(cold_steps) and "claim" not in cold_steps
    print(f"START steps (ms): pool {pool_steps}, cold {cold_steps}; START accepted → VM running: "
          f"pool {to_running(launcher, a)} ms, cold {to_running(launcher, c)} ms")
    print(*[line for line in (data_dir / "instances" / a / "launcher.log").read_text().splitlines()
            if "step claim" in line or " ok in " in line or "VM is running" in line or "START accepted" in line])

    # (e) a power cycle of a claimed instance: its domain and files come back to the cold layout.
    assert client.request("POST", f"/v1/instances/{a}/stop", wait=1, timeout=120)["state"] == "exited"
    assert client.request("POST", f"/v1/instances/{a}/restart", wait=1, timeout=120)["state"] == "running"
    instance_dir = data_dir / "instances" / a
    slot_id = name_a.removeprefix("launcher-slot-")
    assert not (data_dir / "slots" / slot_id).exists()
    assert data_dir_domains(data_dir).get(f"launcher-{a}") == (a, "")
    assert name_a not in data_dir_domains(data_dir)
    assert (instance_dir / "overlay.qcow2").is_file() and not (instance_dir / "console.log").is_symlink()
    assert instance(client, a)["start_path"] == "cold"
    line = wait_guest_ready(launcher, a, boots=2)
    assert (line["instance-id"], line["hostname"], line["boots"]) == (a, hostname, "2")

    for uuid in (a, b, c):
        assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    left = data_dir_domains(data_dir)
    assert all(owner == "" for owner, _ in left.values()), left
    assert {f"launcher-slot-{path.name}" for path in (data_dir / "slots").iterdir()} == set(left)
    assert len(left) == 2


def test_kill_mid_claim_leaks_nothing(qemu_factory: Any) -> None:
    """(c) kill -9 with slots ready and claims in flight; after a restart every slot domain and slot dir of the data
    dir is a ready slot (/v1/node) or an instance's domain, and every instance runs. Added before the restart: a
    claim cut short in prelaunch (a ready slot given instance metadata) and a half-made slot's dir; both go."""
    launcher = qemu_factory({"pools": [{**POOL, "size": 3}]})
    client = launcher.client()
    data_dir = launcher.data_dir
    wait_ready(client, 3)
    uuids = [new_uuid() for _ in range(2)]
    for uuid in uuids:
        start(client, pool_payload(uuid)[0])
    time.sleep(0.3)
    launcher.kill(signal.SIGKILL)
    ready_slots = [name for name, (owner, slot) in data_dir_domains(data_dir).items() if slot and not owner
                   and conn().lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_PAUSED]
    cut_short = ready_slots[0]
    conn().lookupByName(cut_short).setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, instance_metadata_xml(new_uuid(), data_dir), METADATA_PREFIX,
        METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    half_made = data_dir / "slots" / uuid_module.uuid4().hex
    half_made.mkdir()
    (half_made / "overlay.qcow2").write_bytes(b"")

    client = launcher.start(timeout=60)
    for uuid in uuids:  # each START was accepted (durable) before the kill: carried on
        wait_for(f"{uuid} running", lambda uuid=uuid: instance(client, uuid)["state"] == "running")
    ready = wait_ready(client, 3)
    domains = data_dir_domains(data_dir)
    assert cut_short not in domains and not half_made.exists()
    assert not (data_dir / "slots" / cut_short.removeprefix("launcher-slot-")).exists()
    owners = [owner for owner, _ in domains.values() if owner]
    assert sorted(owners) == sorted(uuids), domains  # one domain per instance
    free_slots = {slot for owner, slot in domains.values() if slot and not owner}
    assert len(free_slots) == ready["ready"] + ready["making"] + ready["reserved"]
    claimed = {slot for owner, slot in domains.values() if slot and owner}
    assert {path.name for path in (data_dir / "slots").iterdir()} == free_slots | claimed
    for owner, slot in domains.values():
        if owner:
            assert instance(client, owner)["start_path"] == ("pool" if slot else "cold")


def test_efi_pool_with_a_ciao_style_uuid_and_configdrive(qemu_factory: Any) -> None:
    """An EFI slot (OVMF, its nvram in the slot dir) claimed by a ciao-style instance uuid with a ConfigDrive seed:
    the guest boots with the seed's identity; a power cycle moves the nvram into the instance dir and boots again."""
    efi_image = re.search(r"image_uuid: (\S+)", example("start_efi.yaml").decode())
    assert efi_image is not None
    pool = {"image_uuid": efi_image.group(1), "vcpus": 2, "mem_mb": 256, "fw_type": "efi", "size": 1}
    launcher = qemu_factory({"pools": [pool], "seed_format": "configdrive"})
    client = launcher.client()
    wait_ready(client, 1)
    uuid = new_uuid(ciao_style=True)
    assert start(client, payload_for("start_efi.yaml", uuid), wait=1, timeout=120)["state"] == "running"
    assert instance(client, uuid)["start_path"] == "pool"
    line = wait_guest_ready(launcher, uuid)
    assert (line["instance-id"], line["hostname"], line["datasource"]) == ("ciao", "ciao", "configdrive")
    (name,) = [name for name, (owner, _) in data_dir_domains(launcher.data_dir).items() if owner == uuid]
    slot_dir = launcher.data_dir / "slots" / name.removeprefix("launcher-slot-")
    assert (slot_dir / "nvram.fd").is_file()

    assert client.request("POST", f"/v1/instances/{uuid}/stop", wait=1, timeout=120)["state"] == "exited"
    assert client.request("POST", f"/v1/instances/{uuid}/restart", wait=1, timeout=120)["state"] == "running"
    assert not slot_dir.exists() and (launcher.data_dir / "instances" / uuid / "nvram.fd").is_file()
    line = wait_guest_ready(launcher, uuid, boots=2)
    assert (line["instance-id"], line["boots"]) == ("ciao", "2")
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    assert all(owner == "" for owner, _ in data_dir_domains(launcher.data_dir).values())


def test_a_claim_plugs_the_nic_into_a_bridge(qemu_factory: Any) -> None:
    """`network.kind: bridge`: a slot claimed from a pool gets its NIC, with the payload's MAC, on the configured
    Linux bridge (a bridge of this test's own), and the guest sees that MAC at its first boot."""
    bridge = f"lbr{uuid_module.uuid4().hex[:8]}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        pool = {"image_uuid": IMAGE_ID, "vcpus": 1, "mem_mb": 256, "fw_type": "legacy", "size": 1}
        launcher = qemu_factory({"pools": [pool], "network": {"kind": "bridge", "source": bridge}})
        client = launcher.client()
        wait_ready(client, 1)
        uuid = new_uuid()
        payload, mac, hostname = pool_payload(uuid)
        assert start(client, payload, wait=1, timeout=120)["state"] == "running"
        assert instance(client, uuid)["start_path"] == "pool"
        (name,) = [name for name, (owner, _) in data_dir_domains(launcher.data_dir).items() if owner == uuid]
        interfaces = ET.fromstring(conn().lookupByName(name).XMLDesc(0)).findall("devices/interface")
        assert [(i.get("type"), i.find("source").get("bridge"), i.find("mac").get("address"))  # type: ignore[union-attr]
                for i in interfaces] == [("bridge", bridge, mac)]
        line = wait_guest_ready(launcher, uuid)
        assert (line["instance-id"], line["hostname"]) == (uuid, hostname)
        identity = wait_for("the guest-identity line", lambda: re.search(r"guest-identity .*macs=(\S+)",
                                                                         console(launcher, uuid)))
        assert identity.group(1) == f"eth0={mac}"
        # libvirt put the NIC's tap on the bridge.
        taps = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True,
                              check=True).stdout
        assert taps.count(" master ") == 1, taps
        assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)
