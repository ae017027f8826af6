"""A VM and a container on one launcher (`virtualizers: [qemu, docker]`), both with network, with the real
libvirtd, QEMU and Docker Engine.

The container joins the engine network (tests/docker_support.py: a bridge with no NAT, the engine runs with its
iptables rules off) with the START's MAC and address; the VM (the tiny test guest in its `net-probe` mode,
tests/test_vm_forwarding.py) joins libvirt's NAT network, takes an address by DHCP and pings the container's
address. That packet goes VM → virbr0 → the host's FORWARD chain (libvirt's NAT) → the engine's bridge →
the container, and back: it proves both have network, and that the engine running beside libvirt has not
broken libvirt's NAT. The container pings its bridge's gateway (the host) too. Teardown is `launcher hard-reset`
(qemu_factory), which asks both virtualizers to destroy what they made for this data dir.
"""

# ruff: noqa: F811 (fixtures imported from docker_support are test arguments)

from __future__ import annotations

import ipaddress
import json
import os
import uuid as uuid_module
from pathlib import Path
from typing import Any

from docker_support import (  # noqa: F401 (fixtures)
    SUBNET,
    busybox_rootfs,
    docker,
    docker_engine,
    docker_network,
    image_ref,
    inspect,
    put_rootfs,
)
from test_docker_launcher import exec_in, ip_of, start_payload
from test_qemu import new_uuid, start
from test_vm_forwarding import GATEWAY, NETWORK, forward_rules, guest_net, probe_payload

from launcher.cli.client import ClientError


def test_a_vm_and_a_container_side_by_side_both_with_network(qemu_factory: Any, docker_network: str,
                                                              busybox_rootfs: Path, image_ref: str,
                                                              tmp_path: Path) -> None:
    image_dir = tmp_path / "container-images"
    put_rootfs(image_dir, image_ref, busybox_rootfs)
    launcher = qemu_factory(virtualizers=["qemu", "docker"],
                            docker={"image_dir": str(image_dir), "network": docker_network})
    client = launcher.client()
    assert client.request("GET", "/v1/node")["virtualizers"] == ["qemu", "docker"]
    assert forward_rules()[0] == "-P FORWARD ACCEPT"

    box = str(uuid_module.uuid4())
    answer = client.request("POST", "/v1/instances", start_payload(box, image_ref, [["sleep", "600"]]),
                            "application/json", wait=1, timeout=60)
    assert answer["state"] == "running"
    box_ip = ip_of(box)
    assert inspect(f"launcher-{box}")["NetworkSettings"]["Networks"][docker_network]["IPAddress"] == box_ip
    gateway = str(next(ipaddress.IPv4Network(SUBNET).hosts()))
    exec_in(box, f"ping -c 1 -W 5 {gateway}")  # docker() checks the exit status: the host answered

    vm = new_uuid()
    payload, _ = probe_payload(vm, box_ip)
    assert start(client, payload, wait=1, timeout=120)["state"] == "running"  # an empty vm_type: qemu, the first
    found = guest_net(launcher, vm)
    assert found["addr"] != "none" and ipaddress.IPv4Interface(found["addr"]).network == NETWORK, found
    assert found["gw"] == GATEWAY and found["probe"] == box_ip, found
    assert found["reached"] == "yes", f"the VM did not reach the container at {box_ip}: {found}"

    listed = {i["instance_uuid"]: i["vm_type"] for i in client.request("GET", "/v1/instances")["instances"]}
    assert listed == {box: "docker", vm: "qemu"}
    # Both are this data dir's: hard-reset (the factory's teardown) removes the container, the domain too.
    assert inspect(f"launcher-{box}")["Config"]["Labels"]["launcher.data-dir"] == str(launcher.data_dir)
    assert docker("ps", "-q", "--filter", f"label=launcher.data-dir={launcher.data_dir}").stdout.split() != []


def volume(client: Any, volume_id: str, fmt: str = "raw", size_mb: int = 64) -> dict[str, Any]:
    body = {"id": volume_id, "size_mb": size_mb, "format": fmt}
    made: dict[str, Any] = client.request("POST", "/v1/volumes", json.dumps(body).encode(), "application/json")
    return made


def container_start(client: Any, uuid: str, image: str, storage: list[dict[str, Any]]) -> dict[str, Any]:
    body = json.loads(start_payload(uuid, image, [["sleep", "600"]]))
    body["start"]["storage"] = storage
    answer: dict[str, Any] = client.request("POST", "/v1/instances", json.dumps(body).encode(), "application/json",
                                            wait=1, timeout=60)
    return answer


def test_a_container_mounts_volumes_of_the_nodes_store(qemu_factory: Any, docker_network: str,
                                                      busybox_rootfs: Path, image_ref: str, tmp_path: Path) -> None:
    """Raw volumes of the node's store (qemu's pool) are a container's at /volumes/<id>, as ciao mounted its
    volumes: a blank one gets a file system, what a container writes outlives it and reaches the next one; the
    host mount is taken down at STOP and DELETE; an ephemeral volume goes with its instance; a qcow2 volume, or
    one holding what is no file system, is refused and left as it was."""
    image_dir = tmp_path / "container-images"
    put_rootfs(image_dir, image_ref, busybox_rootfs)
    launcher = qemu_factory(virtualizers=["docker", "qemu"],
                            docker={"image_dir": str(image_dir), "network": docker_network})
    client = launcher.client()
    kept, scratch = str(uuid_module.uuid4()), str(uuid_module.uuid4())
    path = Path(volume(client, kept)["path"])
    volume(client, scratch)

    first = str(uuid_module.uuid4())
    assert container_start(client, first, image_ref, [{"id": kept}, {"id": scratch, "ephemeral": True}]
                           )["state"] == "running"
    exec_in(first, f"echo kept-by-{first[:8]} > /volumes/{kept}/note && sync")
    assert f"/volumes/{scratch}" in exec_in(first, "cat /proc/mounts")
    point = launcher.data_dir / "docker-mounts" / first / kept
    assert os.path.ismount(point)
    assert client.request("GET", f"/v1/volumes/{kept}")["attached_to"] == first
    assert client.request("POST", f"/v1/instances/{first}/stop", wait=1, timeout=60)["state"] == "exited"
    assert not os.path.ismount(point)  # taken off the host once the container is down
    assert client.request("POST", f"/v1/instances/{first}/restart", wait=1, timeout=60)["state"] == "running"
    assert exec_in(first, f"cat /volumes/{kept}/note") == f"kept-by-{first[:8]}"
    assert client.request("DELETE", f"/v1/instances/{first}", wait=1, timeout=60)["state"] == "deleted"
    assert not (launcher.data_dir / "docker-mounts" / first).exists()
    remaining = {v["id"] for v in client.request("GET", "/v1/volumes")["volumes"]}
    assert kept in remaining and scratch not in remaining  # the ephemeral one went with its instance

    second = str(uuid_module.uuid4())
    assert container_start(client, second, image_ref, [{"id": kept}])["state"] == "running"
    assert exec_in(second, f"cat /volumes/{kept}/note") == f"kept-by-{first[:8]}"
    client.request("DELETE", f"/v1/instances/{second}", wait=1, timeout=60)

    qcow2 = str(uuid_module.uuid4())
    volume(client, qcow2, fmt="qcow2")
    refused = failure(client, str(uuid_module.uuid4()), image_ref, [{"id": qcow2}])
    assert (refused.code, refused.reason) == (
        "image_failure", f"volume {qcow2} is qcow2: a container mounts raw volumes only (create one with format raw)")
    junk = str(uuid_module.uuid4())
    junk_path = Path(volume(client, junk)["path"])
    with open(junk_path, "r+b") as f:
        f.write(b"not a file system" * 64)
    before = junk_path.read_bytes()
    refused = failure(client, str(uuid_module.uuid4()), image_ref, [{"id": junk}])
    assert refused.code == "launch_failure" and "holds data that is no file system" in refused.reason
    assert junk_path.read_bytes() == before  # never formatted over
    assert path.exists()


def failure(client: Any, uuid: str, image: str, storage: list[dict[str, Any]]) -> Any:
    try:
        container_start(client, uuid, image, storage)
    except ClientError as exc:
        return exc
    raise AssertionError(f"the START of {uuid} with {storage} did not fail")
