"""ATTACH / DETACH end to end: a real `launcher serve` with the qemu virtualizer, real libvirtd, QEMU (TCG) and the
test guest, which prints `guest-disks disks=… marks=…` on its console whenever its disks change, and at each boot
reports (`marks=`) and then writes a mark (`<instance-id>:<boots>`) at the start of each data disk."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from conftest import LauncherProcess
from test_qemu import (
    console,
    domain_of,
    new_uuid,
    payload_for,
    start,
    state,
    wait_for,
    wait_guest_ready,
)

from launcher.cli.client import Client, ClientError


def disk_lines(launcher: LauncherProcess, uuid: str) -> list[dict[str, str]]:
    """The guest-disks lines of the console so far, as dicts."""
    return [dict(re.findall(r"(\S+?)=(\S*)", line.split("guest-disks ", 1)[1]))
            for line in console(launcher, uuid).splitlines() if "guest-disks " in line]


def wait_disks(launcher: LauncherProcess, uuid: str, disks: str) -> dict[str, str]:
    """The guest's last guest-disks line, once it shows `disks` (a hot-plugged disk may show up in more than one
    step: its device first, its serial a moment later)."""
    def shown() -> dict[str, str] | None:
        lines = disk_lines(launcher, uuid)
        return lines[-1] if lines and lines[-1]["disks"] == disks else None

    return wait_for(f"guest-disks {disks} on {uuid}'s console", shown, timeout=60, every=0.2)


def domain_serials(uuid: str) -> list[str | None]:
    domain = domain_of(uuid)
    assert domain is not None
    disks = ET.fromstring(domain.XMLDesc()).findall("./devices/disk[@device='disk']")
    return [disk.findtext("serial") for disk in disks]


def ciao(command: str, instance: str, volume: str) -> bytes:
    return f"{command}:\n  instance_uuid: {instance}\n  volume_uuid: {volume}\n".encode()


def instance_volumes(client: Client, uuid: str) -> list[str]:
    """The instance's `volumes` (as in the STATS snapshot, but live)."""
    return client.request("GET", f"/v1/instances/{uuid}")["volumes"]  # type: ignore[no-any-return]


def test_hot_plug_hot_unplug_and_data_that_outlives_the_instance(qemu_factory: Any) -> None:
    """A running guest gets a volume (ciao's attach_volume document) and sees it; it lets go of it on DETACH (the
    REST route); a volume attached while the instance is exited is a disk of its next boot, and stays attached
    across a launcher killed with -9. After the instance is deleted, another instance boots with the volume and
    finds what the first one wrote on it."""
    launcher = qemu_factory()
    client = launcher.client()
    volume, first, second = new_uuid(), new_uuid(), new_uuid()
    client.request("POST", "/v1/volumes", json.dumps({"id": volume, "size_mb": 64}).encode(), "application/json")
    assert start(client, payload_for("start_legacy.yaml", first), wait=1, timeout=120)["state"] == "running"
    assert wait_guest_ready(launcher, first)["disks"] == "vda:-"

    # Hot-plug, through /v1/commands.
    attached = client.request("POST", "/v1/commands", ciao("attach_volume", first, volume), "application/yaml",
                              wait=1, timeout=120)
    assert attached == {"instance_uuid": first, "state": "running", "done": True}
    assert wait_disks(launcher, first, f"vda:-,vdb:{volume[:20]}")["marks"] == "vdb:-"
    assert domain_serials(first) == [None, volume]
    assert client.request("GET", f"/v1/volumes/{volume}")["attached_to"] == first
    assert instance_volumes(client, first) == [volume]
    with pytest.raises(ClientError) as refused:
        client.request("DELETE", f"/v1/volumes/{volume}")
    assert (refused.value.status, refused.value.code) == (409, "volume_in_use")

    # Hot-unplug, through the REST route: answered once the guest has let go of the disk.
    detached = client.request("DELETE", f"/v1/instances/{first}/volumes/{volume}", wait=1, timeout=120)
    assert detached == {"instance_uuid": first, "state": "running", "done": True}
    wait_disks(launcher, first, "vda:-")
    assert domain_serials(first) == [None]
    assert client.request("GET", f"/v1/volumes/{volume}")["attached_to"] is None

    # Attached while exited: a disk of the next boot, kept across a launcher restart.
    assert client.request("POST", f"/v1/instances/{first}/stop", wait=1, timeout=120)["state"] == "exited"
    exited = client.request("POST", f"/v1/instances/{first}/volumes/{volume}", wait=1, timeout=60)
    assert exited == {"instance_uuid": first, "state": "exited", "done": True}
    launcher.kill()
    client = launcher.start(timeout=60)
    assert client.request("GET", f"/v1/volumes/{volume}")["attached_to"] == first
    assert client.request("POST", f"/v1/instances/{first}/restart", wait=1, timeout=120)["state"] == "running"
    line = wait_guest_ready(launcher, first, boots=2)
    assert (line["disks"], line["marks"], line["boots"]) == (f"vda:-,vdb:{volume[:20]}", "vdb:-", "2")

    # The volume outlives the instance, with the mark the guest wrote at its second boot (a STOP through ACPI
    # first: the guest syncs before it powers off).
    assert instance_volumes(client, first) == [volume]
    assert client.request("POST", f"/v1/instances/{first}/stop", wait=1, timeout=120)["state"] == "exited"
    assert client.request("DELETE", f"/v1/instances/{first}", wait=1, timeout=120)["state"] == "deleted"
    assert client.request("GET", f"/v1/volumes/{volume}")["attached_to"] is None
    payload = payload_for("start_legacy.yaml", second).decode().replace(
        f"  instance_uuid: {second}\n", f"  instance_uuid: {second}\n  storage:\n    - id: {volume}\n")
    assert start(client, payload.encode(), wait=1, timeout=120)["state"] == "running"
    line = wait_guest_ready(launcher, second)
    assert (line["disks"], line["marks"]) == (f"vda:-,vdb:{volume[:20]}", "vdb:ciao:2")  # meta-data uuid: ciao
    assert state(client, second) == "running"
    assert client.request("DELETE", f"/v1/instances/{second}", wait=1, timeout=120)["state"] == "deleted"
    assert client.request("DELETE", f"/v1/volumes/{volume}") == {"removed": volume}
