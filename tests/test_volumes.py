"""The volume store's API (`/v1/volumes`) and CLI (`launcher volumes ...`) on a real `launcher serve` with the
simulation virtualizer: create (blank or from an image), list, show, resize, delete, the in-use rule, the
events, and bad input answered with a code and a reason that names the field. The qemu virtualizer's store, on
a libvirt storage pool, has its own tests (tests/test_volumes_qemu.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from test_api import YAML, error_of
from test_metrics import promtool_check, samples_of, scrape, value
from test_recovery import all_events

from launcher.cli.client import Client

VOL = "0a1b-0001"
JSON = "application/json"


def create(client: Client, **body: Any) -> Any:
    return client.request("POST", "/v1/volumes", json.dumps(body).encode(), JSON)


def start_with_storage(uuid: str, volume_id: str) -> bytes:
    return (f"start:\n  instance_uuid: {uuid}\n  image_uuid: test-image\n"
            f"  storage:\n    - id: {volume_id}\n").encode()


def test_create_show_list_resize_delete(launcher_factory: Any) -> None:
    client = launcher_factory().client()
    blank = create(client, id=VOL, size_mb=512, format="raw")
    assert {k: blank[k] for k in ("id", "size_mb", "format", "attached_to", "bootable", "source_image")} == \
        {"id": VOL, "size_mb": 512, "format": "raw", "attached_to": None, "bootable": False, "source_image": ""}
    cloned = create(client, id="0a1b-0002", size_mb=0, source_image="debian-12")  # qcow2, cow by default
    assert (cloned["format"], cloned["clone"], cloned["bootable"], cloned["size_mb"]) == ("qcow2", "cow", True, 2048)
    assert client.request("GET", f"/v1/volumes/{VOL}") == blank
    assert [v["id"] for v in client.request("GET", "/v1/volumes")["volumes"]] == [VOL, "0a1b-0002"]
    grown = client.request("POST", f"/v1/volumes/{VOL}/resize", json.dumps({"size_mb": 1024}).encode(), JSON)
    assert grown["size_mb"] == 1024
    assert client.request("DELETE", f"/v1/volumes/{VOL}") == {"removed": VOL}
    assert error_of(lambda: client.request("GET", f"/v1/volumes/{VOL}")).status == 404
    expected = [("volume_created", VOL), ("volume_created", "0a1b-0002"), ("volume_resized", VOL),
                ("volume_deleted", VOL)]
    deadline = time.monotonic() + 10  # events are visible once durable, which may be just after the answer
    while (seen := volume_events(client)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == expected


def volume_events(client: Client) -> list[tuple[str, str]]:
    return [(e["type"], e["volume_id"]) for e in all_events(client) if e["type"].startswith("volume_")]


def test_volumes_outlive_the_launcher(launcher_factory: Any) -> None:
    launcher = launcher_factory()
    create(launcher.client(), id=VOL, size_mb=64)
    launcher.kill()
    assert [v["id"] for v in launcher.start().request("GET", "/v1/volumes")["volumes"]] == [VOL]


def test_a_volume_an_instance_names_cannot_be_deleted_or_resized(launcher_factory: Any) -> None:
    client = launcher_factory().client()
    create(client, id=VOL, size_mb=64)
    client.request("POST", "/v1/instances", start_with_storage("ab-0001", VOL), YAML, wait=1)
    assert client.request("GET", f"/v1/volumes/{VOL}")["attached_to"] == "ab-0001"
    refused = error_of(lambda: client.request("DELETE", f"/v1/volumes/{VOL}"))
    assert (refused.status, refused.code) == (409, "volume_in_use") and "ab-0001" in refused.reason
    refused = error_of(lambda: client.request("POST", f"/v1/volumes/{VOL}/resize", b'{"size_mb": 99}', JSON))
    assert (refused.status, refused.code) == (409, "volume_in_use")
    client.request("DELETE", "/v1/instances/ab-0001", wait=1)
    assert client.request("DELETE", f"/v1/volumes/{VOL}") == {"removed": VOL}


@pytest.mark.parametrize(("body", "status", "code", "reason"), [
    ({"size_mb": 1}, 400, "invalid_data", "id: required"),
    ({"id": "../../etc", "size_mb": 1}, 400, "invalid_data", "id: '../../etc' is not a valid volume id"),
    ({"id": VOL}, 400, "invalid_data", "size_mb: required"),
    ({"id": VOL, "size_mb": 0}, 400, "invalid_data", "size_mb: must be from 1"),
    ({"id": VOL, "size_mb": 1 << 40}, 400, "invalid_data", "size_mb: must be from 1 to 67108864"),
    ({"id": VOL, "size_mb": "10"}, 400, "invalid_data", "size_mb: expected int, got str"),
    ({"id": VOL, "size_mb": True}, 400, "invalid_data", "size_mb: expected int, got bool"),
    ({"id": VOL, "size_mb": 1, "format": "vmdk"}, 400, "invalid_data", "format: must be one of qcow2, raw"),
    ({"id": VOL, "size_mb": 1, "source_image": "a/b"}, 400, "invalid_data", "source_image: 'a/b' is not a valid"),
    ({"id": VOL, "size_mb": 1, "source_image": "img", "clone": "link"}, 400, "invalid_data", "clone: must be one of"),
    ({"id": VOL, "size_mb": 0, "source_image": "img", "format": "raw"}, 400, "invalid_data",
     "format: a copy-on-write clone of an image must be qcow2"),
    ({"id": VOL, "size_mb": 100, "source_image": "img"}, 400, "invalid_data", "size_mb: 100 is smaller than image"),
    ({"id": VOL, "size_mb": 1, "pool": "x"}, 400, "invalid_data", "pool: unknown field"),
])
def test_bad_volume_requests_name_the_field(launcher_factory: Any, body: dict[str, Any], status: int, code: str,
                                            reason: str) -> None:
    client = launcher_factory().client()
    refused = error_of(lambda: create(client, **body))
    assert (refused.status, refused.code) == (status, code) and reason in refused.reason, refused.reason
    assert client.request("GET", "/v1/volumes")["volumes"] == []  # nothing half-made


def test_duplicates_shrinking_and_bodies(launcher_factory: Any) -> None:
    client = launcher_factory().client()
    create(client, id=VOL, size_mb=64)
    assert error_of(lambda: create(client, id=VOL, size_mb=64)).code == "volume_exists"
    shrink = error_of(lambda: client.request("POST", f"/v1/volumes/{VOL}/resize", b'{"size_mb": 1}', JSON))
    assert (shrink.code, shrink.status) == ("invalid_data", 400) and "only grow" in shrink.reason
    for body in (b"not json", b"[1]"):
        bad = error_of(lambda: client.request("POST", "/v1/volumes", body, JSON))
        assert (bad.code, bad.status) == ("invalid_payload", 400)
    missing = error_of(lambda: client.request("DELETE", "/v1/volumes/ffff-0009"))
    assert (missing.code, missing.status) == ("not_found", 404)


def test_cli_volumes(launcher_factory: Any) -> None:
    launcher = launcher_factory()
    done = launcher.cli("volumes", "create", VOL, "--size-mb", "256")
    assert done.returncode == 0 and f"created {VOL} (256 MiB qcow2)" in done.stdout, done.stderr
    done = launcher.cli("volumes", "create", "0a1b-0002", "--image", "debian-12", "--clone", "copy")
    assert done.returncode == 0, done.stderr
    listing = launcher.cli("volumes", "ls")
    assert listing.returncode == 0 and VOL in listing.stdout and "debian-12" in listing.stdout
    shown = json.loads(launcher.cli("volumes", "show", "0a1b-0002", "--json").stdout)
    assert (shown["clone"], shown["bootable"]) == ("copy", True)
    assert launcher.cli("volumes", "resize", VOL, "512").returncode == 0
    assert launcher.cli("volumes", "rm", VOL).returncode == 0
    failed = launcher.cli("volumes", "rm", VOL)
    assert failed.returncode != 0 and "not_found" in failed.stderr
    start_plain(launcher.client(), "ab-0701")
    attached = launcher.cli("attach", "ab-0701", "0a1b-0002", "--wait")
    assert attached.returncode == 0 and "running" in attached.stdout, attached.stderr
    assert json.loads(launcher.cli("volumes", "show", "0a1b-0002", "--json").stdout)["attached_to"] == "ab-0701"
    detached = launcher.cli("detach", "ab-0701", "0a1b-0002", "--wait", "--json")
    assert json.loads(detached.stdout) == {"instance_uuid": "ab-0701", "state": "running", "done": True}
    refused = launcher.cli("detach", "ab-0701", "0a1b-0002")
    assert refused.returncode != 0 and "not_attached" in refused.stderr


def test_metrics_count_the_volumes(launcher_factory: Any) -> None:
    """Each scrape of /metrics reads the volume store (no polling between scrapes)."""
    client = launcher_factory().client()
    create(client, id=VOL, size_mb=100)
    create(client, id="0a1b-0002", size_mb=0, source_image="debian-12")
    text = scrape(client)
    promtool_check(text)
    samples = samples_of(text)
    assert value(samples, "launcher_volumes") == 2
    assert value(samples, "launcher_volume_capacity_bytes") == (100 + 2048) * 2**20
    assert value(samples, "launcher_volume_allocation_bytes") == (10 + 204) * 2**20
    client.request("DELETE", f"/v1/volumes/{VOL}")
    assert value(samples_of(scrape(client)), "launcher_volumes") == 1


def test_a_start_attaches_only_volumes_that_exist_and_no_other_instance_names(launcher_factory: Any) -> None:
    """The simulation checks what the qemu virtualizer checks: every volume a START names exists (else
    image_failure naming the entry), and one volume serves one instance."""
    client = launcher_factory({"intervals": {"stats_snapshot_s": 0.1}}).client()
    missing = error_of(lambda: client.request("POST", "/v1/instances", start_with_storage("ab-0001", VOL), YAML,
                                              wait=1))
    assert (missing.status, missing.code) == (502, "image_failure")
    assert f"storage[0]: volume {VOL}: no volume {VOL}" in missing.reason
    create(client, id=VOL, size_mb=64)
    assert client.request("POST", "/v1/instances", start_with_storage("ab-0003", VOL), YAML, wait=1)["state"] == \
        "running"
    deadline = time.monotonic() + 10  # the STATS snapshot lists the instance's volumes (ciao's shape)
    while not any(i["instance_uuid"] == "ab-0003" for i in client.request("GET", "/v1/stats")["instances"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [figures] = [i for i in client.request("GET", "/v1/stats")["instances"] if i["instance_uuid"] == "ab-0003"]
    assert figures["volumes"] == [VOL]
    taken = error_of(lambda: client.request("POST", "/v1/instances", start_with_storage("ab-0004", VOL), YAML))
    assert (taken.status, taken.code) == (409, "volume_in_use") and "ab-0003" in taken.reason
    client.request("DELETE", "/v1/instances/ab-0003", wait=1)
    assert client.request("POST", "/v1/instances", start_with_storage("ab-0004", VOL), YAML, wait=1)["state"] == \
        "running"


def test_local_volumes_are_made_at_start_and_ephemeral_ones_go_with_the_instance(launcher_factory: Any) -> None:
    client = launcher_factory().client()
    kept, scratch = "0a1b-0101", "0a1b-0102"
    start = (f"start:\n  instance_uuid: ab-0101\n  image_uuid: test-image\n  storage:\n"
             f"    - id: {kept}\n      local: true\n      size: 2\n"
             f"    - id: {scratch}\n      local: true\n      ephemeral: true\n      size: 1\n").encode()
    assert client.request("POST", "/v1/instances", start, YAML, wait=1)["state"] == "running"
    volumes = client.request("GET", "/v1/volumes")["volumes"]
    made = {v["id"]: (v["size_mb"], v["format"], v["attached_to"]) for v in volumes}
    assert made == {kept: (2048, "qcow2", "ab-0101"), scratch: (1024, "qcow2", "ab-0101")}
    client.request("DELETE", "/v1/instances/ab-0101", wait=1)
    assert [v["id"] for v in client.request("GET", "/v1/volumes")["volumes"]] == [kept]  # the ephemeral one is gone
    no_size = error_of(lambda: client.request(
        "POST", "/v1/instances", f"start:\n  instance_uuid: ab-0102\n  image_uuid: img\n  storage:\n"
        f"    - id: {scratch}\n      local: true\n".encode(), YAML))
    assert no_size.code == "invalid_data" and no_size.reason.startswith("start.storage[0].size: required for a local")



# ----------------------------------------------------------------- ATTACH / DETACH


def command(client: Client, name: str, instance: str, volume: str) -> Any:
    """ciao's attach_volume / detach_volume document, through /v1/commands (JSON), waited for."""
    body = json.dumps({name: {"instance_uuid": instance, "volume_uuid": volume}}).encode()
    return client.request("POST", "/v1/commands", body, JSON, wait=1)


def start_plain(client: Client, uuid: str) -> None:
    body = f"start:\n  instance_uuid: {uuid}\n  image_uuid: test-image\n".encode()
    assert client.request("POST", "/v1/instances", body, YAML, wait=1)["state"] == "running"


def wait_events(client: Client, expected: list[tuple[str, str, str]]) -> None:
    """The volume_attached / volume_detached and attach/detach failure events are `expected` (type, instance,
    volume), once durable."""
    kinds = ("volume_attached", "volume_detached", "attach_volume_failure", "detach_volume_failure")
    deadline = time.monotonic() + 10
    while (seen := [(e["type"], e["instance_uuid"], e["volume_id"]) for e in all_events(client)
                    if e["type"] in kinds]) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == expected


def test_attach_and_detach_a_running_instance(launcher_factory: Any) -> None:
    """Both ways in (ciao's documents at /v1/commands and the REST routes); one volume, one instance at a time."""
    client = launcher_factory().client()
    create(client, id=VOL, size_mb=64)
    start_plain(client, "ab-0201")
    start_plain(client, "ab-0202")
    assert command(client, "attach_volume", "ab-0201", VOL) == {"instance_uuid": "ab-0201", "state": "running",
                                                                "done": True}
    assert client.request("GET", f"/v1/volumes/{VOL}")["attached_to"] == "ab-0201"
    assert client.request("GET", "/v1/instances/ab-0201")["volumes"] == [VOL]
    again = error_of(lambda: client.request("POST", f"/v1/instances/ab-0201/volumes/{VOL}"))
    assert (again.status, again.code, again.instance_uuid) == (409, "already_attached", "ab-0201")
    taken = error_of(lambda: command(client, "attach_volume", "ab-0202", VOL))
    assert (taken.status, taken.code) == (409, "volume_in_use") and "ab-0201" in taken.reason
    other = error_of(lambda: client.request("DELETE", f"/v1/instances/ab-0202/volumes/{VOL}"))
    assert (other.status, other.code) == (409, "not_attached")
    refused = error_of(lambda: client.request("DELETE", f"/v1/volumes/{VOL}"))
    assert (refused.status, refused.code) == (409, "volume_in_use")
    detached = client.request("DELETE", f"/v1/instances/ab-0201/volumes/{VOL}", wait=1)
    assert detached == {"instance_uuid": "ab-0201", "state": "running", "done": True}
    assert client.request("GET", f"/v1/volumes/{VOL}")["attached_to"] is None
    assert client.request("GET", "/v1/instances/ab-0201")["volumes"] == []
    gone = error_of(lambda: command(client, "detach_volume", "ab-0201", VOL))
    assert (gone.status, gone.code) == (409, "not_attached")
    assert client.request("POST", f"/v1/instances/ab-0202/volumes/{VOL}", wait=1)["state"] == "running"
    wait_events(client, [("volume_attached", "ab-0201", VOL), ("volume_detached", "ab-0201", VOL),
                         ("volume_attached", "ab-0202", VOL)])


def test_bad_attach_and_detach_requests(launcher_factory: Any) -> None:
    """Each refusal has its code and a reason naming what is wrong, and leaves the volume free."""
    client = launcher_factory({"simulation": {"failures": [{"phase": "attach", "match": "^ab-0302$"}]}}).client()
    create(client, id=VOL, size_mb=64)
    start_plain(client, "ab-0301")
    start_plain(client, "ab-0302")
    missing = error_of(lambda: command(client, "attach_volume", "ab-0301", "0a1b-0999"))
    assert (missing.status, missing.code) == (404, "not_found") and "volume 0a1b-0999" in missing.reason
    no_instance = error_of(lambda: command(client, "attach_volume", "ab-0399", VOL))
    assert (no_instance.status, no_instance.code) == (404, "no_instance")
    bad_id = error_of(lambda: client.request("POST", "/v1/instances/ab-0301/volumes/not-a-uuid"))
    assert (bad_id.status, bad_id.code) == (400, "invalid_data") and bad_id.reason.startswith("volume_uuid: ")
    bad_doc = error_of(lambda: client.request("POST", "/v1/commands", b"attach_volume: {instance_uuid: ab-0301}",
                                              YAML))
    assert (bad_doc.status, bad_doc.code, bad_doc.reason) == (400, "invalid_data",
                                                             "attach_volume.volume_uuid: required")
    failed = error_of(lambda: command(client, "attach_volume", "ab-0302", VOL))
    assert (failed.status, failed.code) == (502, "attach_failure") and "simulation.failures[0]" in failed.reason
    assert client.request("GET", f"/v1/volumes/{VOL}")["attached_to"] is None  # the reservation was given back
    assert client.request("GET", "/v1/instances/ab-0302")["volumes"] == []
    assert command(client, "attach_volume", "ab-0301", VOL)["state"] == "running"
    wait_events(client, [("attach_volume_failure", "ab-0301", "0a1b-0999"),
                         ("attach_volume_failure", "ab-0302", VOL), ("volume_attached", "ab-0301", VOL)])


def test_a_detach_the_guest_refuses_is_reported_and_the_volume_stays(launcher_factory: Any) -> None:
    settings = {"simulation": {"failures": [{"phase": "detach", "action": "hang"}]}, "timeouts": {"volume_s": 0.5}}
    client = launcher_factory(settings).client()
    create(client, id=VOL, size_mb=64)
    start_plain(client, "ab-0401")
    command(client, "attach_volume", "ab-0401", VOL)
    refused = error_of(lambda: command(client, "detach_volume", "ab-0401", VOL))
    assert (refused.status, refused.code) == (502, "detach_failure")
    assert refused.reason == "detach_volume did not finish within 0.5 s"
    assert client.request("GET", f"/v1/volumes/{VOL}")["attached_to"] == "ab-0401"
    assert client.request("GET", "/v1/instances/ab-0401")["volumes"] == [VOL]


def test_attachments_are_kept_across_kill_9_and_an_exited_instance_changes_its_record(launcher_factory: Any) -> None:
    launcher = launcher_factory({"simulation": {"mode": "process"}})
    client = launcher.client()
    create(client, id=VOL, size_mb=64)
    create(client, id="0a1b-0002", size_mb=64)
    start_plain(client, "ab-0501")
    command(client, "attach_volume", "ab-0501", VOL)
    launcher.kill()
    client = launcher.start()
    assert client.request("GET", f"/v1/volumes/{VOL}")["attached_to"] == "ab-0501"
    assert client.request("GET", "/v1/instances/ab-0501")["volumes"] == [VOL]
    assert client.request("POST", "/v1/instances/ab-0501/stop", wait=1)["state"] == "exited"
    assert client.request("POST", "/v1/instances/ab-0501/volumes/0a1b-0002", wait=1)["state"] == "exited"
    assert client.request("DELETE", f"/v1/instances/ab-0501/volumes/{VOL}", wait=1)["state"] == "exited"
    launcher.kill()
    client = launcher.start()
    assert client.request("GET", "/v1/instances/ab-0501")["volumes"] == ["0a1b-0002"]
    assert [(v["id"], v["attached_to"]) for v in client.request("GET", "/v1/volumes")["volumes"]] == \
        [(VOL, None), ("0a1b-0002", "ab-0501")]
    assert client.request("POST", "/v1/instances/ab-0501/restart", wait=1)["state"] == "running"


def test_a_detached_ephemeral_volume_is_not_deleted_with_the_instance(launcher_factory: Any) -> None:
    client = launcher_factory().client()
    start = (f"start:\n  instance_uuid: ab-0601\n  image_uuid: test-image\n  storage:\n"
             f"    - id: {VOL}\n      local: true\n      ephemeral: true\n      size: 1\n").encode()
    assert client.request("POST", "/v1/instances", start, YAML, wait=1)["state"] == "running"
    assert client.request("DELETE", f"/v1/instances/ab-0601/volumes/{VOL}", wait=1)["state"] == "running"
    client.request("DELETE", "/v1/instances/ab-0601", wait=1)
    assert [v["id"] for v in client.request("GET", "/v1/volumes")["volumes"]] == [VOL]


def start_from_volume(uuid: str, storage: str) -> bytes:
    """A START with no image_uuid and the given `storage:` entries (YAML lines under it)."""
    return f"start:\n  instance_uuid: {uuid}\n  storage:\n{storage}".encode()


def test_an_instance_boots_from_a_volume_that_outlives_it_unless_ephemeral(launcher_factory: Any) -> None:
    """No image_uuid and a boot: true entry: the instance runs (no image, no disk of its own: its disk figure is 0),
    the disk plan puts the boot volume first with boot order 1 and the tag reaches the disks; DELETE keeps the boot
    volume, and removes an ephemeral one. Process mode writes the plan into disk.img."""
    launcher = launcher_factory({"simulation": {"mode": "process"}})
    client = launcher.client()
    boot, data, eph = "0b00-0001", "0b00-0002", "0b00-0003"
    create(client, id=boot, size_mb=0, source_image="debian-12")
    create(client, id=data, size_mb=64)
    create(client, id=eph, size_mb=0, source_image="debian-12", clone="copy")
    storage = (f"    - id: {data}\n      boot_index: 1\n      tag: db\n"
               f"    - id: {boot}\n      boot: true\n")
    assert client.request("POST", "/v1/instances", start_from_volume("bf-0001", storage), YAML, wait=1)["state"] == \
        "running"
    disk = json.loads((launcher.data_dir / "instances" / "bf-0001" / "disk.img").read_bytes())
    assert [(d["volume_id"], d["boot_order"], d["tag"]) for d in disk["disks"]] == \
        [(boot, 1, ""), (data, 2, "db")]
    assert client.request("GET", f"/v1/volumes/{boot}")["attached_to"] == "bf-0001"
    refused = error_of(lambda: client.request("DELETE", f"/v1/instances/bf-0001/volumes/{boot}", wait=1))
    assert (refused.status, refused.code) == (502, "detach_failure") and "boot volume" in refused.reason
    assert client.request("DELETE", f"/v1/instances/bf-0001/volumes/{data}", wait=1)["state"] == "running"
    assert client.request("GET", "/v1/instances/bf-0001")["volumes"] == [boot]
    client.request("DELETE", "/v1/instances/bf-0001", wait=1)
    assert client.request("GET", f"/v1/volumes/{boot}")["attached_to"] is None  # kept: not ephemeral
    ephemeral = f"    - id: {eph}\n      boot: true\n      ephemeral: true\n"
    assert client.request("POST", "/v1/instances", start_from_volume("bf-0002", ephemeral), YAML,
                          wait=1)["state"] == "running"
    client.request("DELETE", "/v1/instances/bf-0002", wait=1)
    assert [v["id"] for v in client.request("GET", "/v1/volumes")["volumes"]] == [boot, data]


def test_a_memory_instance_booting_from_a_volume_reports_no_disk_of_its_own(launcher_factory: Any) -> None:
    client = launcher_factory({"intervals": {"stats_snapshot_s": 0.1, "instance_stats_s": 0.1}}).client()
    create(client, id=VOL, size_mb=0, source_image="debian-12")
    start = start_from_volume("bf-0003", f"    - id: {VOL}\n      boot: true\n").decode()
    start += "  requirements:\n    disk_mb: 5000\n"
    assert client.request("POST", "/v1/instances", start.encode(), YAML, wait=1)["state"] == "running"
    deadline = time.monotonic() + 10
    while not (found := [i for i in client.request("GET", "/v1/stats")["instances"]
                         if i["instance_uuid"] == "bf-0003" and i["disk_usage_mb"] >= 0]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert found[0]["disk_usage_mb"] == 0 and found[0]["volumes"] == [VOL]


@pytest.mark.parametrize(("storage", "image", "reason"), [
    ("    - id: 0b00-0001\n", False, "start.image_uuid: required unless a storage entry has boot: true"),
    ("    - id: 0b00-0001\n      boot: true\n    - id: 0b00-0002\n      boot: true\n", False,
     "start.storage[1].boot: only one storage entry may have boot: true (storage[0] has it)"),
    ("    - id: 0b00-0001\n      boot: true\n", True, "start.image_uuid: must be empty when storage[0] has boot: true"),
    ("    - id: 0b00-0001\n      swap: true\n", True, "start.storage[0].local: a swap volume must be local: true"),
    ("    - id: 0b00-0001\n      boot_index: 0\n", True, "start.storage[0].boot_index: 0 is the instance's first"),
    ("    - id: 0b00-0001\n      tag: a,b\n", True, "start.storage[0].tag: at most 60 characters, without"),
    ("    - id: 0b00-0002\n      local: true\n      size: 1\n    - id: 0b00-0001\n      boot_index: 0\n", True,
     "start.storage[1].boot_index: 0 is the instance's first"),
])
def test_storage_rules_refuse_at_once_naming_the_field(launcher_factory: Any, storage: str, image: bool,
                                                       reason: str) -> None:
    client = launcher_factory().client()
    body = start_from_volume("bf-0009", storage).decode()
    if image:
        body += "  image_uuid: test-image\n"
    refused = error_of(lambda: client.request("POST", "/v1/instances", body.encode(), YAML))
    assert (refused.status, refused.code) == (400, "invalid_data") and reason in refused.reason, refused.reason
    assert client.request("GET", "/v1/volumes")["volumes"] == []  # nothing made (the last case names a local one)


def test_a_local_swap_volume_is_raw_and_tagged_swap(launcher_factory: Any) -> None:
    launcher = launcher_factory({"simulation": {"mode": "process"}})
    client = launcher.client()
    start = ("start:\n  instance_uuid: bf-0004\n  image_uuid: test-image\n  storage:\n"
             "    - id: 0b00-0004\n      local: true\n      swap: true\n      ephemeral: true\n      size: 1\n")
    assert client.request("POST", "/v1/instances", start.encode(), YAML, wait=1)["state"] == "running"
    swap = client.request("GET", "/v1/volumes/0b00-0004")
    assert (swap["format"], swap["size_mb"]) == ("raw", 1024)
    disk = json.loads((launcher.data_dir / "instances" / "bf-0004" / "disk.img").read_bytes())
    assert [(d["volume_id"], d["boot_order"], d["tag"], d["swap"]) for d in disk["disks"]] == \
        [("", None, "", False), ("0b00-0004", None, "swap", True)]
    client.request("DELETE", "/v1/instances/bf-0004", wait=1)
    assert client.request("GET", "/v1/volumes")["volumes"] == []


def test_a_start_asking_for_more_local_volume_space_than_the_node_has_is_full(launcher_factory: Any) -> None:
    client = launcher_factory().client()
    start = ("start:\n  instance_uuid: bf-0005\n  image_uuid: test-image\n  storage:\n"
             "    - id: 0b00-0005\n      local: true\n      size: 60000\n")  # 60 000 GiB
    refused = error_of(lambda: client.request("POST", "/v1/instances", start.encode(), YAML))
    assert refused.code == "full_cn" and "includes 61440000 MiB of local volumes" in refused.reason, refused.reason
    assert client.request("GET", "/v1/volumes")["volumes"] == []


def test_an_instance_has_at_most_24_volumes(launcher_factory: Any) -> None:
    client = launcher_factory().client()
    ids = [f"0a1b-{n:04x}" for n in range(25)]
    for volume in ids:
        create(client, id=volume, size_mb=1)
    storage = "".join(f"    - id: {volume}\n" for volume in ids[:24])
    start = f"start:\n  instance_uuid: ab-0801\n  image_uuid: test-image\n  storage:\n{storage}".encode()
    assert client.request("POST", "/v1/instances", start, YAML, wait=1)["state"] == "running"
    refused = error_of(lambda: client.request("POST", f"/v1/instances/ab-0801/volumes/{ids[24]}", wait=1))
    assert (refused.status, refused.code) == (502, "attach_failure") and "24 volumes" in refused.reason
    assert client.request("GET", f"/v1/volumes/{ids[24]}")["attached_to"] is None
    assert client.request("DELETE", f"/v1/instances/ab-0801/volumes/{ids[0]}", wait=1)["state"] == "running"
    assert client.request("POST", f"/v1/instances/ab-0801/volumes/{ids[24]}", wait=1)["state"] == "running"
    assert client.request("GET", "/v1/instances/ab-0801")["volumes"] == ids[1:]


def test_a_broken_record_is_reported_and_hides_no_other_volume(launcher_factory: Any) -> None:
    """A record the disk broke (here: cut short) is `volume_failure` naming its file; the list still has the rest."""
    launcher = launcher_factory()
    client = launcher.client()
    create(client, id=VOL, size_mb=64)
    create(client, id="0a1b-0002", size_mb=32)
    record = launcher.data_dir / "sim-volumes" / f"{VOL}.json"
    record.write_bytes(record.read_bytes()[:20])
    assert [v["id"] for v in client.request("GET", "/v1/volumes")["volumes"]] == ["0a1b-0002"]
    broken = error_of(lambda: client.request("GET", f"/v1/volumes/{VOL}"))
    assert (broken.status, broken.code) == (502, "volume_failure") and str(record) in broken.reason
    assert "is unreadable" in launcher.output()
