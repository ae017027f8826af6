"""Several virtualizers in one launcher (config `virtualizers:`), with a real `launcher serve`, the real qemu
virtualizer (libvirtd, its image store) beside the simulation.

A START's `vm_type` picks the virtualizer and an empty one takes the first; the name is kept in the instance's
record, so that a restarted launcher gives the instance the same virtualizer, whatever the order of the list
then. An instance whose virtualizer is no longer enabled is left alone on disk, reported, and never driven.
(Containers beside VMs, with the real Docker Engine: tests/test_docker_*.py.)
"""

from __future__ import annotations

import json
from typing import Any

from conftest import LauncherProcess
from test_metrics import promtool_check, samples_of, scrape, value
from test_qemu import domain_of, wait_for

from launcher.cli.client import Client, ClientError

JSON = "application/json"


def start(client: Client, uuid: str, **fields: Any) -> dict[str, Any]:
    body = {"start": {"instance_uuid": uuid, "image_uuid": "b286cd45-7d0c-4525-a140-4db6c95e41fa",
                      "fw_type": "legacy", "requirements": {"vcpus": 1, "mem_mb": 128}, **fields}}
    answer: dict[str, Any] = client.request("POST", "/v1/instances", json.dumps(body).encode(), JSON, wait=True,
                                            timeout=120)
    return answer


def failure(client: Client, uuid: str, **fields: Any) -> ClientError:
    """The error a START answers (refused, or failed while it ran)."""
    try:
        start(client, uuid, **fields)
    except ClientError as exc:
        return exc
    raise AssertionError(f"START {uuid} {fields} did not fail")


def vm_type(client: Client, uuid: str) -> str:
    value: str = client.request("GET", f"/v1/instances/{uuid}")["spec"]["vm_type"]
    return value


def events(client: Client, kind: str) -> list[dict[str, Any]]:
    lines = b"".join(client.stream("/v1/events")).splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == kind]


def test_vm_type_picks_the_virtualizer_for_life(qemu_factory: Any) -> None:
    launcher: LauncherProcess = qemu_factory(virtualizers=["simulation", "qemu"])
    client = launcher.client()
    node = client.request("GET", "/v1/node")
    assert (node["virtualizer"], node["virtualizers"], node["unmanaged_instances"]) == (
        "simulation", ["simulation", "qemu"], 0)

    # The simulation (first: an empty vm_type) runs one, qemu the other: a real domain, from qemu's store.
    assert start(client, "aa-01", image_uuid="not-in-any-store")["state"] == "running"
    assert vm_type(client, "aa-01") == "simulation"
    assert start(client, "aa-02", vm_type="qemu")["state"] == "running"
    assert vm_type(client, "aa-02") == "qemu"
    assert domain_of("aa-02") is not None and domain_of("aa-01") is None
    # qemu's store does not know this image: a START routed there fails in ensure_backing_image.
    failed = failure(client, "aa-05", image_uuid="not-in-any-store", vm_type="qemu")
    assert failed.code == "image_failure" and "not in the store" in failed.reason

    # An identical START again is an idempotent repeat, with or without the name it was resolved to.
    assert start(client, "aa-01", image_uuid="not-in-any-store", vm_type="simulation")["state"] == "running"
    assert start(client, "aa-01", image_uuid="not-in-any-store")["state"] == "running"
    other = failure(client, "aa-01", image_uuid="not-in-any-store", vm_type="qemu")
    assert other.code == "already_running"  # a different START for a running instance (lifecycle)

    # Not enabled here: invalid_data naming the enabled ones; nothing is made.
    exc = failure(client, "aa-03", vm_type="docker")
    assert (exc.code, exc.reason) == (
        "invalid_data", "start.vm_type: 'docker' is not enabled on this node (enabled: simulation, qemu)")
    assert not (launcher.data_dir / "instances" / "aa-03").exists()

    # Restarted with the list reversed: each instance keeps the virtualizer its record names.
    launcher.kill()
    launcher.config_path.write_text(launcher.config_path.read_text().replace(
        "- simulation\n- qemu", "- qemu\n- simulation"))
    client = launcher.start(timeout=60)
    assert client.request("GET", "/v1/node")["virtualizers"] == ["qemu", "simulation"]
    assert (vm_type(client, "aa-01"), vm_type(client, "aa-02")) == ("simulation", "qemu")
    # (The simulation's memory-mode VM ended with the launcher: found gone, as its virtualizer says.)
    assert client.request("GET", "/v1/instances/aa-01")["state"] == "exited"
    wait_for("aa-02 running again", lambda: client.request("GET", "/v1/instances/aa-02")["state"] == "running")


def test_an_instance_whose_virtualizer_is_not_enabled_is_left_alone(qemu_factory: Any) -> None:
    launcher: LauncherProcess = qemu_factory(virtualizers=["qemu", "simulation"])
    client = launcher.client()
    assert start(client, "bb-01", vm_type="simulation", image_uuid="sim-image")["state"] == "running"
    assert start(client, "bb-02")["state"] == "running"  # a real guest
    domain = domain_of("bb-02")
    assert domain is not None
    domain_id = domain.ID()
    record = (launcher.data_dir / "instances" / "bb-02" / "instance.json").read_bytes()

    launcher.kill()
    launcher.config_path.write_text(launcher.config_path.read_text().replace("- qemu\n- simulation", "- simulation"))
    client = launcher.start(timeout=60)
    node = client.request("GET", "/v1/node")
    assert (node["virtualizers"], node["unmanaged_instances"], node["instances"]) == (["simulation"], 1, 1)
    assert [e["vm_type"] for e in events(client, "instance_unmanaged") if e["instance_uuid"] == "bb-02"] == ["qemu"]
    text = scrape(client)
    promtool_check(text)
    samples = samples_of(text)
    assert [value(samples, "launcher_virtualizer_instances", virtualizer=name) for name in ("simulation", "unmanaged")
            ] == [1, 1]
    try:
        client.request("GET", "/v1/instances/bb-02")
        raise AssertionError("an unmanaged instance is served")
    except ClientError as exc:
        assert exc.code == "no_instance"
    # Its dir is never written to nor removed, and its uuid is not free for a new instance.
    assert failure(client, "bb-02", image_uuid="sim-image").code == "instance_exists"
    assert (launcher.data_dir / "instances" / "bb-02" / "instance.json").read_bytes() == record
    running = domain_of("bb-02")
    assert running is not None and running.isActive() and running.ID() == domain_id  # never touched

    launcher.kill()
    launcher.config_path.write_text(launcher.config_path.read_text().replace("- simulation", "- qemu\n- simulation"))
    client = launcher.start(timeout=60)
    assert client.request("GET", "/v1/node")["unmanaged_instances"] == 0
    wait_for("bb-02 running again", lambda: client.request("GET", "/v1/instances/bb-02")["state"] == "running")
    back = domain_of("bb-02")
    assert back is not None and back.ID() == domain_id  # recovered: the same domain, not booted again
