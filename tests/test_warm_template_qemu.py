"""The qemu virtualizer's booted templates through a real `launcher serve` (issue 19; virtualizers/qemu/clones.py,
templates.py, save_image.py): the launcher builds the template in the background; two STARTs of its shape are
restored clones that never share instance-id, MAC or RNG value; a START of another shape boots cold; a launcher
kill -9 and restart keeps the clones' start_path and leaves no template domain or half-built template; DELETE
leaves nothing; an image that changes gets a new template, never the stale one. Real libvirtd, real QEMU (TCG
here), the test guest."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import libvirt
from conftest import example
from test_qemu import (
    IMAGE_ID,
    conn,
    console,
    events,
    guest_lines,
    new_uuid,
    payload_for,
    start,
    wait_for,
)
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


def with_boot_count(source: Path, dest: Path, count: int, scratch: Path) -> None:
    """`dest`: the test guest image `source` with its boot counter (``/boots`` on its data partition) set to
    `count`, as a qcow2 of its own (another sha256, another content)."""
    from build import DATA_PARTITION, SECTOR  # tests/guest/build.py, on sys.path through conftest's guest_image

    raw = scratch / "guest.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(source), str(raw)], check=True)
    (scratch / "boots").write_text(f"{count}\n")
    subprocess.run(["mcopy", "-o", "-i", f"{raw}@@{DATA_PARTITION[0] * SECTOR}", str(scratch / "boots"), "::/boots"],
                   check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(dest)], check=True)
    raw.unlink()


def test_a_changed_image_gets_a_new_template_and_never_the_stale_one(qemu_factory: Any, qemu_test_root: Any,
                                                                      guest_image: Path) -> None:
    # The image, in a search dir of its own: first the test guest as built (its template boots it once: boots=1).
    images = qemu_test_root.path / "changing-images"
    images.mkdir(mode=0o755)
    image = images / f"{IMAGE_ID}.qcow2"
    shutil.copyfile(guest_image, image)
    image.chmod(0o644)
    launcher = qemu_factory({"templates": [TEMPLATE], "image_dirs": [str(images)]})
    client = launcher.client()
    first = wait_for("the first template", lambda: (t := template_state(client))["built"] and t, timeout=400,
                     every=1)

    def started_from(uuid: str, path: str) -> dict[str, str]:
        """START `uuid` (the template's shape), check the path it took; its guest's (last) guest-ready line."""
        payload, _, _ = pool_payload(uuid)
        assert start(client, payload, wait=1, timeout=180)["state"] == "running"
        assert instance(client, uuid)["start_path"] == path
        lines: list[dict[str, str]] = wait_for(f"{uuid}'s guest-ready line", lambda: [
            found for found in guest_lines(launcher, uuid) if found.get("instance-id") == uuid])
        return lines[-1]

    old = new_uuid()
    assert started_from(old, "template")["boots"] == "1"
    assert client.request("DELETE", f"/v1/instances/{old}", wait=1, timeout=120)["state"] == "deleted"

    # The image changes: removed from the store (nothing uses it now: a template does not hold it), and its file in
    # the search dir replaced by another content, whose boot counter says 41.
    assert client.request("DELETE", f"/v1/images/{IMAGE_ID}") == {"removed": IMAGE_ID}
    with_boot_count(guest_image, images / "next.qcow2", 41, qemu_test_root.path)
    (images / "next.qcow2").chmod(0o644)
    (images / "next.qcow2").replace(image)

    # The next START of the template's shape imports the new image and boots it cold: the old template, built on
    # the old content, is not used; the new one is built meanwhile.
    cold = new_uuid()
    assert started_from(cold, "cold")["boots"] == "42"
    second = wait_for("the template of the new image", lambda: (t := template_state(client))["built"]
                      and t["key"] != first["key"] and t, timeout=400, every=1)
    assert (launcher.data_dir / "templates" / second["key"] / "state.sav").is_file()
    clone = new_uuid()
    assert started_from(clone, "template")["boots"] == "42"  # the new template's guest booted the new image once
    for uuid in (cold, clone):
        assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"

    # The old template stays until the launcher starts again, which removes it: no disk backs onto it any more.
    assert (launcher.data_dir / "templates" / first["key"]).is_dir()
    launcher.kill(signal.SIGTERM)
    launcher.start()
    client = launcher.client()
    wait_for("the old template removed", lambda: not (launcher.data_dir / "templates" / first["key"]).exists(),
             timeout=60)
    assert (launcher.data_dir / "templates" / second["key"]).is_dir()


def test_an_efi_template_cloned_for_a_ciao_payload_whose_meta_data_names_its_own_instance_id(
        qemu_factory: Any) -> None:
    """An EFI template (OVMF; each clone gets its own copy of the saved variables) cloned for ciao's
    start_efi.yaml, whose meta-data says instance-id and hostname "ciao" (not the instance uuid): the clone takes
    the seed's identity, and a power cycle boots its disk cold with its own nvram."""
    efi_image = re.search(r"image_uuid: (\S+)", example("start_efi.yaml").decode())
    assert efi_image is not None
    launcher = qemu_factory({"templates": [{"image_uuid": efi_image.group(1), "vcpus": 2, "mem_mb": 256,
                                            "fw_type": "efi"}]})
    client = launcher.client()
    wait_for("the EFI template", lambda: template_state(client)["built"], timeout=400, every=1)
    uuid = new_uuid(ciao_style=True)
    assert start(client, payload_for("start_efi.yaml", uuid), wait=1, timeout=180)["state"] == "running"
    assert instance(client, uuid)["start_path"] == "template"
    reidentified = [line for line in identity_lines(console(launcher, uuid)) if line.get("reidentified", "0") != "0"]
    assert reidentified and (reidentified[0]["instance-id"], reidentified[0]["hostname"]) == ("ciao", "ciao")
    nvram = launcher.data_dir / "instances" / uuid / "nvram.fd"
    assert nvram.is_file()

    assert client.request("POST", f"/v1/instances/{uuid}/stop", wait=1, timeout=120)["state"] == "exited"
    assert client.request("POST", f"/v1/instances/{uuid}/restart", wait=1, timeout=180)["state"] == "running"
    assert instance(client, uuid)["start_path"] == "cold"
    boots = wait_for("the cold boot's guest-ready line", lambda: [
        line for line in guest_lines(launcher, uuid) if line.get("boots") == "2"])
    assert boots[0]["instance-id"] == "ciao"
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"


def test_an_image_that_does_not_take_part_fails_its_template_build_and_boots_cold(qemu_factory: Any,
                                                                                  qemu_test_root: Any) -> None:
    """An image whose guest never prints guest-identity (here a blank disk: nothing boots): the build fails after
    template_boot_timeout_s with a template_failed event and a reason that says what to check, leaves neither a
    template domain nor a half-built template, and a START of the shape boots cold at once."""
    images = qemu_test_root.path / "blank-images"
    images.mkdir(mode=0o755)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "blank.qcow2"), "64M"], check=True)
    (images / "blank.qcow2").chmod(0o644)
    launcher = qemu_factory({"templates": [{**TEMPLATE, "image_uuid": "blank"}], "image_dirs": [str(images)],
                             "template_boot_timeout_s": 5})
    client = launcher.client()
    failed = wait_for("the failed build", lambda: (t := template_state(client))["failures"] >= 1 and t, timeout=120,
                      every=0.5)
    assert not failed["built"] and "guest-identity" in failed["last_error"]
    assert "template_boot_timeout_s" in failed["last_error"]
    reported = events(client, type="template_failed")
    assert reported and reported[0]["image_uuid"] == "blank" and "guest-identity" in reported[0]["reason"]
    wait_for("the failed build removed", lambda: not [
        d.name() for d in conn().listAllDomains() if d.name().startswith("launcher-template-")
        and str(launcher.data_dir) in d.XMLDesc(0)] and not list((launcher.data_dir / "templates").glob("*.partial")),
        timeout=30)

    uuid = new_uuid()
    payload, _, _ = pool_payload(uuid)
    payload = payload.replace(IMAGE_ID.encode(), b"blank")
    assert start(client, payload, wait=1, timeout=60)["state"] == "running"
    assert instance(client, uuid)["start_path"] == "cold"
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
