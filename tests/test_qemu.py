"""The qemu virtualizer end to end: a real `launcher serve`, real libvirtd, real QEMU (TCG here) and the test
guest of tests/guest/, which prints `guest-ready instance-id=… hostname=… … boots=N` on its serial console."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml
from conftest import EXAMPLE_IMAGE_IDS, LauncherProcess, example
from test_metrics import promtool_check, samples_of, scrape, value

from launcher.cli.client import Client

IMAGE_ID = "b286cd45-7d0c-4525-a140-4db6c95e41fa"
BOOT_TIMEOUT_S = 180.0  # a TCG guest on a busy 2-core machine
POLL_OUT_OF_REACH_S = 600  # qemu.state_poll_s for a test that only a libvirt event can make pass


def new_uuid(ciao_style: bool = False) -> str:
    """A fresh instance uuid, so that domain names (`launcher-<uuid>`) never collide with another run's.
    ciao-style: a uuid missing its last digit, as in configs/examples/start_efi.yaml (not an RFC 4122 UUID)."""
    fresh = str(uuid_module.uuid4())
    return fresh[:-1] if ciao_style else fresh


def conn() -> libvirt.virConnect:
    return libvirt.open("qemu:///system")


def domain_of(uuid: str) -> libvirt.virDomain | None:
    try:
        return conn().lookupByName(f"launcher-{uuid}")
    except libvirt.libvirtError:
        return None


def wait_for(what: str, check: Callable[[], Any], timeout: float = BOOT_TIMEOUT_S, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def console(launcher: LauncherProcess, uuid: str) -> str:
    path = launcher.data_dir / "instances" / uuid / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


def guest_lines(launcher: LauncherProcess, uuid: str) -> list[dict[str, str]]:
    """The whole guest-ready lines of the console so far, as dicts: a last line without its newline is still
    being written (a read in the middle of it lacks its last fields) and is left for the next read."""
    text = console(launcher, uuid)
    whole = text[:text.rfind("\n") + 1]
    # Firmware or kernel text may precede the line on the same console line.
    return [dict(re.findall(r"(\S+?)=(\S*)", line.split("guest-ready ", 1)[1]))
            for line in whole.splitlines() if "guest-ready " in line]


def wait_guest_ready(launcher: LauncherProcess, uuid: str, boots: int = 1) -> dict[str, str]:
    def ready() -> dict[str, str] | None:
        lines = guest_lines(launcher, uuid)
        return lines[-1] if len(lines) >= boots else None

    return wait_for(f"guest-ready #{boots} on {uuid}'s console", ready, every=0.5)


def start(client: Client, payload: bytes, **query: Any) -> dict[str, Any]:
    answer: dict[str, Any] = client.request("POST", "/v1/instances", payload, "application/yaml", **query)
    return answer


def state(client: Client, uuid: str) -> str:
    return str(client.request("GET", f"/v1/instances/{uuid}")["state"])


def events(client: Client, **match: Any) -> list[dict[str, Any]]:
    lines = b"".join(client.stream("/v1/events", read_timeout=10)).splitlines()
    found = [json.loads(line) for line in lines if line]
    return [e for e in found if all(e.get(k) == v for k, v in match.items())]


def payload_for(name: str, uuid: str) -> bytes:
    """An example payload with its instance uuid (and MAC, which libvirt wants unique) replaced."""
    text = example(name).decode()
    original = re.search(r"instance_uuid: (\S+)", text)
    assert original is not None
    mac = "02:00:00:%02x:%02x:%02x" % tuple(bytes.fromhex(uuid.replace("-", "")[-6:]))
    text = re.sub(r"vnic_mac: \S+", f"vnic_mac: {mac}", text.replace(original.group(1), uuid))
    return text.encode()


def test_example_lifecycle_legacy_nocloud(qemu_factory: Any) -> None:
    """START → running with the guest line; STOP (ACPI) → exited; RESTART keeps the disk; DELETE cleans up."""
    launcher = qemu_factory()
    client = launcher.client()
    uuid = new_uuid()
    answer = start(client, payload_for("start_legacy.yaml", uuid), wait=1, timeout=120)
    assert answer == {"instance_uuid": uuid, "state": "running", "done": True}
    line = wait_guest_ready(launcher, uuid)
    # The example's meta-data is {"uuid": "ciao", "hostname": "ciao"}; its user-data goes through unchanged.
    assert (line["instance-id"], line["hostname"], line["datasource"], line["boots"]) == \
        ("ciao", "ciao", "nocloud", "1")
    instance_dir = launcher.data_dir / "instances" / uuid
    seed_user_data = _user_data_of(example("start_legacy.yaml"))
    assert line["user-data-sha256"] == _sha256(seed_user_data)
    domain = domain_of(uuid)
    assert domain is not None and domain.isPersistent() and domain.isActive()
    # The guest booted from files only the launcher's user and (through libvirt) QEMU can read.
    info = instance_dir.stat()
    assert (stat.S_IMODE(info.st_mode), grp.getgrgid(info.st_gid).gr_name) == (0o710, "libvirt-qemu")
    assert {stat.S_IMODE((instance_dir / name).stat().st_mode) for name in ("seed.iso", "overlay.qcow2",
                                                                             "instance.json")} == {0o600}
    # /metrics: one observation of each START step, the actor's and the ones the qemu virtualizer times itself.
    text = scrape(client)
    promtool_check(text)
    samples = samples_of(text)
    assert [value(samples, "launcher_start_step_duration_seconds_count", step=step)
            for step in ("image", "disk", "start", "boot")] == [1, 1, 1, 1]
    assert [value(samples, "launcher_virtualizer_step_duration_seconds_count", virtualizer="qemu", step=step)
            for step in ("image", "overlay", "seed", "define", "start")] == [1, 1, 1, 1, 1]

    stopped = client.request("POST", f"/v1/instances/{uuid}/stop", wait=1, timeout=120)
    assert stopped["state"] == "exited"
    assert "guest-poweroff" in console(launcher, uuid), "the guest did not power off through ACPI"
    log = b"".join(client.stream(f"/v1/instances/{uuid}/log", read_timeout=10)).decode()
    assert "guest powered off" in log and "destroyed" not in log

    restarted = client.request("POST", f"/v1/instances/{uuid}/restart", wait=1, timeout=120)
    assert restarted["state"] == "running"
    assert wait_guest_ready(launcher, uuid, boots=2)["boots"] == "2"  # the first boot's marker is kept

    deleted = client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)
    assert deleted["state"] == "deleted"
    assert domain_of(uuid) is None
    assert not instance_dir.exists()
    images = client.request("GET", "/v1/images")["images"]
    assert [i["id"] for i in images] == [IMAGE_ID] and not images[0]["in_use"]
    assert (launcher.data_dir / "images" / f"{IMAGE_ID}.img").exists()
    assert [e["state"] for e in events(client, type="instance_state", instance_uuid=uuid)] == \
        ["pending", "running", "exited", "pending", "running", "deleted"]


@pytest.mark.parametrize("example_name, seed_format, efi", [
    ("start_efi.yaml", "configdrive", True),  # its instance uuid is ciao-style, not an RFC 4122 UUID
    ("start_efi.yaml", "nocloud", True),
    ("start_legacy.yaml", "configdrive", False),
])
def test_boot_matrix(qemu_factory: Any, example_name: str, seed_format: str, efi: bool) -> None:
    launcher = qemu_factory({"seed_format": seed_format})
    client = launcher.client()
    uuid = new_uuid(ciao_style=example_name == "start_efi.yaml")
    assert start(client, payload_for(example_name, uuid), wait=1, timeout=120)["state"] == "running"
    line = wait_guest_ready(launcher, uuid)
    assert (line["instance-id"], line["hostname"], line["datasource"]) == ("ciao", "ciao", seed_format)
    xml = domain_of(uuid).XMLDesc(0)  # type: ignore[union-attr]
    assert ("OVMF_CODE" in xml) is efi
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=60)["state"] == "deleted"
    assert domain_of(uuid) is None


def test_five_concurrent_starts_import_the_image_once(qemu_factory: Any) -> None:
    launcher = qemu_factory()
    client = launcher.client()
    uuids = [new_uuid() for _ in range(5)]
    for uuid in uuids:
        assert start(client, payload_for("start_legacy.yaml", uuid))["state"] == "pending"
    wait_for("five running instances", lambda: all(state(client, u) == "running" for u in uuids), every=0.5)
    finished = [e for e in events(client, type="image_progress") if e["finished"]]
    assert [e["image_uuid"] for e in finished] == [IMAGE_ID]
    assert all(domain_of(u).isActive() for u in uuids)  # type: ignore[union-attr]


def test_qemu_killed_from_outside_is_exited_from_libvirts_event(qemu_factory: Any) -> None:
    """The monitor learns of the death from libvirt's lifecycle event, not from its backstop poll of the domain's
    state: with the poll pushed out to 600 s (`qemu.state_poll_s`), only the event can report the death within
    the 60 s allowed (a bound that only stops a hang on a busy machine, not a speed target)."""
    launcher = qemu_factory({"state_poll_s": POLL_OUT_OF_REACH_S})
    client = launcher.client()
    uuid = new_uuid()
    start(client, payload_for("start_legacy.yaml", uuid), wait=1, timeout=120)
    pid = int(Path(f"/run/libvirt/qemu/launcher-{uuid}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for("the exited event", lambda: events(client, type="instance_state", state="exited"), timeout=60)
    assert state(client, uuid) == "exited"


def _three_running(launcher: LauncherProcess) -> list[str]:
    client = launcher.client()
    uuids = [new_uuid() for _ in range(3)]
    for uuid in uuids:
        start(client, payload_for("start_legacy.yaml", uuid))
    wait_for("three running instances", lambda: all(state(client, u) == "running" for u in uuids), every=0.5)
    return uuids


def _stats_resume(client: Client, uuids: list[str], after: float) -> None:
    """A stats snapshot taken after `after` has real memory figures for every instance."""
    def fresh() -> bool:
        snapshot = client.request("GET", "/v1/stats")
        figures = {i["instance_uuid"]: i for i in snapshot["instances"]}
        return all(figures[u]["memory_usage_mb"] > 0 for u in uuids) and _epoch(snapshot) > after

    wait_for("stats with memory figures", fresh, timeout=60, every=0.5)


def _epoch(snapshot: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(snapshot["taken_at"].replace("Z", "+00:00")).timestamp()


FAST_STATS = {"intervals": {"instance_stats_s": 1, "stats_snapshot_s": 1}}


def test_launcher_killed_and_restarted_reconnects(qemu_factory: Any) -> None:
    launcher = qemu_factory(**FAST_STATS)
    uuids = _three_running(launcher)
    launcher.kill(signal.SIGKILL)
    client = launcher.start(timeout=60)
    restarted = time.time()
    wait_for("recovered instances", lambda: all(state(client, u) == "running" for u in uuids), timeout=30)
    assert events(client, type="instance_state", state="exited") == []
    assert all(domain_of(u).isActive() for u in uuids)  # type: ignore[union-attr]
    _stats_resume(client, uuids, restarted)


def test_libvirtd_restarted_under_a_running_launcher(qemu_factory: Any) -> None:
    launcher = qemu_factory(**FAST_STATS)
    uuids = _three_running(launcher)
    client = launcher.client()
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    wait_for("libvirtd to exit", lambda: subprocess.run(["pgrep", "-x", "libvirtd"]).returncode != 0, timeout=30)
    subprocess.run(["libvirtd", "--daemon"], check=True)
    restarted = time.time()
    wait_for("libvirtd to answer", lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                                          capture_output=True).returncode == 0, timeout=30)
    _stats_resume(client, uuids, restarted)
    assert events(client, type="instance_state", state="exited") == []
    assert all(state(client, u) == "running" for u in uuids)
    # The reconnected launcher still drives libvirt.
    assert client.request("POST", f"/v1/instances/{uuids[0]}/stop", grace=0, wait=1, timeout=60)["state"] == "exited"


def test_libvirt_calls_are_bounded_while_libvirtd_is_stopped(qemu_factory: Any) -> None:
    """libvirtd frozen (SIGSTOP): STARTs fail with launch_failure within their phase bound instead of hanging,
    and the API keeps answering; once libvirtd runs again, the same instances start.

    This freezes the shared system libvirtd (tests run one at a time, and it is resumed in `finally`): a second
    system-mode libvirtd cannot run beside it (its paths under /run/libvirt are fixed), and a session-mode one
    would run QEMU as another user than the launcher's real set-up does."""
    launcher = qemu_factory({"libvirt_threads": 2}, timeouts={"start_vm_s": 3})
    client = launcher.client()
    uuids = [new_uuid() for _ in range(3)]  # more STARTs than libvirt threads
    libvirtd = int(subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
    os.kill(libvirtd, signal.SIGSTOP)
    try:
        for uuid in uuids:
            assert start(client, payload_for("start_legacy.yaml", uuid))["state"] == "pending"
        wait_for("the STARTs to fail", lambda: all(state(client, u) == "exited" for u in uuids), timeout=90)
        failures = events(client, type="start_failure")
        assert sorted(e["instance_uuid"] for e in failures) == sorted(uuids)
        assert {e["reason"] for e in failures} == {"launch_failure"}, failures
        assert any("start_vm did not finish within 3 s" in e["detail"] for e in failures), failures
        # Everything that does not need libvirt still answers while it is frozen.
        assert client.request("GET", "/healthz") == {"status": "ok"}
        assert len(client.request("GET", "/v1/instances")["instances"]) == 3
        assert "instances" in client.request("GET", "/v1/stats")
        assert subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0  # still frozen
    finally:
        os.kill(libvirtd, signal.SIGCONT)
    for uuid in uuids:
        answer = client.request("POST", f"/v1/instances/{uuid}/restart", wait=1, timeout=120)
        assert answer["state"] == "running", answer
    assert all(domain_of(u).isActive() for u in uuids)  # type: ignore[union-attr]


def test_orphan_domains_are_reported_and_destroyed_only_if_configured(qemu_factory: Any) -> None:
    launcher = qemu_factory()
    client = launcher.client()
    uuid = new_uuid()
    start(client, payload_for("start_legacy.yaml", uuid), wait=1, timeout=120)
    launcher.kill(signal.SIGKILL)
    # The instance dir disappears behind the launcher's back: its domain is now an orphan.
    subprocess.run(["rm", "-rf", str(launcher.data_dir / "instances" / uuid)], check=True)
    subprocess.run(["rm", "-f", str(launcher.data_dir / "instances.wal")], check=True)
    client = launcher.start(timeout=60)
    orphans = events(client, type="orphan_domain")
    assert [(e["instance_uuid"], e["destroyed"]) for e in orphans] == [(uuid, False)]
    assert domain_of(uuid).isActive()  # type: ignore[union-attr]
    launcher.kill(signal.SIGTERM)
    config = yaml.safe_load(launcher.config_path.read_text())
    config["qemu"]["destroy_orphans"] = True
    launcher.config_path.write_text(yaml.safe_dump(config))
    client = launcher.start(timeout=60)
    assert [e["destroyed"] for e in events(client, type="orphan_domain")] == [False, True]
    assert domain_of(uuid) is None


def test_hard_reset_destroys_our_domains_and_instances(qemu_factory: Any) -> None:
    launcher = qemu_factory()
    client = launcher.client()
    uuid = new_uuid()
    start(client, payload_for("start_legacy.yaml", uuid), wait=1, timeout=120)
    refused = launcher.cli("hard-reset", "--yes", "--config", str(launcher.config_path))
    assert refused.returncode == 2 and "another launcher" in refused.stderr  # it runs: refused
    launcher.kill(signal.SIGTERM)
    assert domain_of(uuid).isActive()  # type: ignore[union-attr]  # VMs outlive the launcher
    done = launcher.cli("hard-reset", "--yes", "--config", str(launcher.config_path))
    assert done.returncode == 0, done.stderr
    assert "destroyed 1 VMs, removed 1 instances" in done.stdout
    assert domain_of(uuid) is None
    assert list((launcher.data_dir / "instances").iterdir()) == []
    assert (launcher.data_dir / "images" / f"{IMAGE_ID}.img").exists()


def test_images_cli_import_ls_rm_gc(qemu_factory: Any, guest_image: Path) -> None:
    launcher = qemu_factory()  # import reads allowed places only: by default <data_dir>/import/
    refused = launcher.cli("images", "import", str(guest_image), "--id", "guest")
    assert refused.returncode == 1 and "invalid_data: source: not an allowed import source" in refused.stderr
    drop_dir = launcher.data_dir / "import"
    assert stat.S_IMODE(drop_dir.stat().st_mode) == 0o700
    shutil.copyfile(guest_image, drop_dir / "guest.qcow2")
    imported = launcher.cli("images", "import", str(drop_dir / "guest.qcow2"), "--id", "guest")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("guest: qcow2")
    client = launcher.client()
    uuid = new_uuid()
    start(client, payload_for("start_legacy.yaml", uuid).replace(IMAGE_ID.encode(), b"guest"), wait=1, timeout=120)
    listed = json.loads(launcher.cli("images", "ls", "--json").stdout)["images"]
    assert [(i["id"], i["in_use"]) for i in listed] == [("guest", True)]
    refused = launcher.cli("images", "rm", "guest")
    assert refused.returncode == 1 and "image_in_use" in refused.stderr
    gc = launcher.cli("images", "gc", "--older-than", "0")
    assert gc.returncode == 0 and "removed nothing" in gc.stdout
    client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=60)
    assert launcher.cli("images", "gc", "--older-than", "0").stdout.strip() == "removed guest"
    assert json.loads(launcher.cli("images", "ls", "--json").stdout)["images"] == []


def _user_data_of(payload: bytes) -> bytes:
    from launcher.transport.payloads import parse_start

    return parse_start(payload, "application/yaml", max_bytes=1 << 20).spec.user_data.encode()


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_an_instance_boots_from_a_volume_cloned_from_the_image(qemu_factory: Any) -> None:
    """configs/examples/start_volume_boot.yaml (no image_uuid; its volume a copy-on-write child of the imported test
    guest image) plus a local ephemeral swap volume: no overlay, the boot volume is vda with boot order 1 (and no
    `<os><boot>`), the swap volume vdb, formatted (SWAPSPACE2) and tagged `swap` in the seed's meta-data; the guest
    boots from the volume. The instance's disk figure is 0; DELETE keeps the boot volume, removes the swap one."""
    launcher = qemu_factory(**FAST_STATS)
    client = launcher.client()
    boot_id, swap_id, uuid = new_uuid(), new_uuid(), new_uuid()
    made = client.request("POST", "/v1/volumes", json.dumps({"id": boot_id, "size_mb": 0, "source_image":
                                                             EXAMPLE_IMAGE_IDS[0]}).encode(), "application/json")
    assert (made["clone"], made["bootable"]) == ("cow", True)
    payload = payload_for("start_volume_boot.yaml", uuid).decode().replace("0a1b2c3d-0000-4000-8000-0000000000b0",
                                                                           boot_id)
    payload = payload.replace("      boot: true\n", f"      boot: true\n    - id: {swap_id}\n      local: true\n"
                                                  "      swap: true\n      ephemeral: true\n      size: 1\n")
    assert start(client, payload.encode(), wait=1, timeout=120)["state"] == "running"
    assert wait_guest_ready(launcher, uuid)["disks"] == f"vda:{boot_id[:20]},vdb:{swap_id[:20]}"
    domain = domain_of(uuid)
    assert domain is not None
    xml = ET.fromstring(domain.XMLDesc())
    disks = xml.findall("./devices/disk[@device='disk']")
    orders = [None if d.find("boot") is None else d.find("boot").get("order") for d in disks]  # type: ignore[union-attr]
    assert [(d.find("target").get("dev"), d.findtext("serial")) for d in disks] == \
        [("vda", boot_id), ("vdb", swap_id)]  # type: ignore[union-attr]
    assert orders == ["1", None]
    assert xml.find("./os/boot") is None
    instance_dir = launcher.data_dir / "instances" / uuid
    assert not (instance_dir / "overlay.qcow2").exists()
    swap = client.request("GET", f"/v1/volumes/{swap_id}")
    assert (swap["format"], swap["size_mb"]) == ("raw", 1024)
    with open(swap["path"], "rb") as file:
        assert file.read(4096)[-10:] == b"SWAPSPACE2"
    meta = yaml.safe_load(iso_file(instance_dir / "seed.iso", "/meta-data"))
    assert meta["devices"] == [{"type": "disk", "bus": "virtio", "serial": swap_id, "tags": ["swap"]}]
    figures = wait_for("the instance's stats", lambda: [i for i in client.request("GET", "/v1/stats")["instances"]
                                                        if i["instance_uuid"] == uuid and i["disk_usage_mb"] >= 0])
    assert figures[0]["disk_usage_mb"] == 0
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    assert client.request("GET", f"/v1/volumes/{boot_id}")["attached_to"] is None
    assert [v["id"] for v in client.request("GET", "/v1/volumes")["volumes"]] == [boot_id]  # the swap one: gone


def iso_file(iso: Path, rr_path: str) -> bytes:
    """A file of an ISO image, by its Rock Ridge path."""
    import io

    import pycdlib

    image = pycdlib.PyCdlib()
    image.open(str(iso))
    try:
        data = io.BytesIO()
        image.get_file_from_iso_fp(data, rr_path=rr_path)
        return data.getvalue()
    finally:
        image.close()


def test_a_volume_named_by_a_start_is_a_disk_the_guest_sees(qemu_factory: Any) -> None:
    """A data volume made through /v1/volumes and a local ephemeral one, named in a START's storage: virtio disks
    of the domain whose serials are the volume ids, seen by the guest. After the instance is deleted, the first
    volume is still there and the ephemeral one is gone."""
    launcher = qemu_factory()
    client = launcher.client()
    volume_id, local_id, uuid = new_uuid(), new_uuid(), new_uuid()
    client.request("POST", "/v1/volumes", json.dumps({"id": volume_id, "size_mb": 64}).encode(), "application/json")
    payload = payload_for("start_legacy.yaml", uuid).decode().replace(
        f"  instance_uuid: {uuid}\n", f"  instance_uuid: {uuid}\n  storage:\n    - id: {volume_id}\n"
                                     f"    - id: {local_id}\n      local: true\n      ephemeral: true\n      size: 1\n")
    assert start(client, payload.encode(), wait=1, timeout=120)["state"] == "running"
    assert wait_guest_ready(launcher, uuid)["disks"] == \
        f"vda:-,vdb:{volume_id[:20]},vdc:{local_id[:20]}"  # virtio-blk: 20 characters
    domain = domain_of(uuid)
    assert domain is not None
    disks = ET.fromstring(domain.XMLDesc()).findall("./devices/disk[@device='disk']")
    assert [(d.find("target").get("dev"), d.findtext("serial")) for d in disks] == \
        [("vda", None), ("vdb", volume_id), ("vdc", local_id)]  # type: ignore[union-attr]
    assert client.request("GET", f"/v1/volumes/{volume_id}")["attached_to"] == uuid
    assert client.request("GET", f"/v1/volumes/{local_id}")["size_mb"] == 1024
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    assert client.request("GET", f"/v1/volumes/{volume_id}")["attached_to"] is None
    assert [v["id"] for v in client.request("GET", "/v1/volumes")["volumes"]] == [volume_id]  # ephemeral: gone
    assert client.request("DELETE", f"/v1/volumes/{volume_id}") == {"removed": volume_id}
