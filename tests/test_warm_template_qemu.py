"""The qemu virtualizer's booted templates through a real `launcher serve` (issue 19; virtualizers/qemu/clones.py,
templates.py, save_image.py): the launcher builds the template in the background; two STARTs of its shape are
restored clones that never share instance-id, MAC or RNG value; a START of another shape boots cold; a launcher
kill -9 and restart keeps the clones' start_path and leaves no template domain or half-built template; DELETE
leaves nothing. Real libvirtd, real QEMU (TCG here), the test guest."""

from __future__ import annotations

import re
import signal
from typing import Any

import libvirt
from test_qemu import IMAGE_ID, conn, console, events, new_uuid, start, wait_for
from test_warm_pool_qemu import data_dir_domains, instance, mac_of, pool_payload

from launcher.cli.client import Client

TEMPLATE = {"image_uuid": IMAGE_ID, "vcpus": 1, "mem_mb": 256, "fw_type": "legacy"}
IDENTITY = re.compile(r"guest-identity (.*)")


def template_state(client: Client) -> dict[str, Any]:
    found: dict[str, Any] = client.request("GET", "/v1/node")["warm_templates"]["qemu"][0]
    return found


def identity_lines(text: str) -> list[dict[str, str]]:
    """The guest-identity lines of a console, as dicts."""
    return [dict(re.findall(r"(\S+?)=(\S*)", m.group(1))) for m in IDENTITY.finditer(text)]


def test_template_clones_have_their_own_identity_and_survive_a_restart(qemu_factory: Any) -> None:
    launcher = qemu_factory({"templates": [TEMPLATE]})
    client = launcher.client()
    data_dir = launcher.data_dir
    built = wait_for("the template", lambda: (t := template_state(client))["built"] and t, timeout=400, every=1)
    assert built["key"] and built["state_bytes"] > 0 and built["failures"] == 0
    assert (data_dir / "templates" / built["key"] / "state.sav").is_file()

    a, b, c = new_uuid(), new_uuid(), new_uuid()
    made = {uuid: pool_payload(uuid) for uuid in (a, b)}
    for uuid, (payload, _, _) in made.items():
        assert start(client, payload, wait=1, timeout=180)["state"] == "running"
        assert instance(client, uuid)["start_path"] == "template"
        running = wait_for("the running event", lambda u=uuid: [e for e in events(client, type="instance_state",
                                                                                   instance_uuid=u)
                                                                 if e["state"] == "running"], timeout=15, every=0.5)
        assert running[-1]["start_path"] == "template"  # (the answer may come before the event is written)
    seen: dict[str, dict[str, str]] = {}
    for uuid, (_, mac, hostname) in made.items():
        # start_vm returned once the guest printed its new identity: it is on the console already.
        lines = [line for line in identity_lines(console(launcher, uuid)) if line.get("reidentified", "0") != "0"]
        assert lines, console(launcher, uuid)
        line = lines[-1]
        assert (line["instance-id"], line["hostname"]) == (uuid, hostname)
        assert mac_of(f"launcher-{uuid}") == [mac]
        added = wait_for(f"{uuid}'s NIC in the guest", lambda u=uuid: re.search(r"guest-nic-added \S+ mac=(\S+)",
                                                                                console(launcher, u)), every=0.5)
        assert added.group(1) == mac
        seen[uuid] = line
    assert seen[a]["rng"] != seen[b]["rng"] and seen[a]["instance-id"] != seen[b]["instance-id"]
    assert seen[a]["vmgenid"] == "yes"

    payload_c, _, _ = pool_payload(c, mem_mb=300)  # another shape: cold
    assert start(client, payload_c, wait=1, timeout=180)["state"] == "running"
    assert instance(client, c)["start_path"] == "cold"
    assert template_state(client)["clones"] == 2

    # A kill -9 and a restart: the clones are still clones, nothing of the template's build is left.
    launcher.kill(signal.SIGKILL)
    launcher.start()
    client = launcher.client()
    for uuid in (a, b):
        wait_for(f"{uuid} recovered running", lambda u=uuid: instance(client, u)["state"] == "running", timeout=60)
        assert instance(client, uuid)["start_path"] == "template"
    assert not [name for name in (d.name() for d in conn().listAllDomains())
                if name.startswith("launcher-template-") and str(data_dir) in conn().lookupByName(name).XMLDesc(0)]
    assert not list((data_dir / "templates").glob("*.partial"))

    for uuid in (a, b, c):
        assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    assert data_dir_domains(data_dir) == {}
    try:
        conn().lookupByName(f"launcher-{a}")
        raise AssertionError(f"launcher-{a} is still defined")
    except libvirt.libvirtError:
        pass
