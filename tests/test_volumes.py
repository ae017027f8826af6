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

from launcher.client import Client

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
    image_failure naming the entry), kinds not supported yet are refused, and one volume serves one instance."""
    client = launcher_factory({"intervals": {"stats_snapshot_s": 0.1}}).client()
    missing = error_of(lambda: client.request("POST", "/v1/instances", start_with_storage("ab-0001", VOL), YAML,
                                              wait=1))
    assert (missing.status, missing.code) == (502, "image_failure")
    assert f"storage[0]: volume {VOL}: no volume {VOL}" in missing.reason
    create(client, id=VOL, size_mb=64)
    boot = (f"start:\n  instance_uuid: ab-0002\n  storage:\n    - id: {VOL}\n      boot: true\n").encode()
    refused = error_of(lambda: client.request("POST", "/v1/instances", boot, YAML, wait=1))
    assert refused.code == "image_failure" and "boot volumes are not supported yet" in refused.reason
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

