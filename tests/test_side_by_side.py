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
