"""The docker virtualizer end to end: a real `launcher serve` with `virtualizer: docker` and a real Docker Engine.
START (vm_type docker) → running with the payload's hostname, limits and MAC inside; a container that exits is
`exited` with its exit code in `container_exited`; STOP / RESTART / DELETE; kill -9 of the launcher and a restart
reconnect without restarting the container; hard reset leaves a foreign container alone."""

# ruff: noqa: F811 (fixtures imported from docker_support are test arguments)

from __future__ import annotations

import json
import time
import uuid as uuid_module
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LauncherProcess
from docker_support import (  # noqa: F401 (fixtures)
    NETWORK,
    SUBNET,
    busybox_rootfs,
    docker,
    docker_engine,
    docker_network,
    image_ref,
    inspect,
    put_rootfs,
)

from launcher.cli.client import Client

MIB = 1 << 20


@pytest.fixture
def docker_launcher(tmp_path: Path, docker_network: str, busybox_rootfs: Path,
                    image_ref: str) -> Iterator[LauncherProcess]:
    image_dir = tmp_path / "images"
    put_rootfs(image_dir, image_ref, busybox_rootfs)
    data_dir = tmp_path / "data"
    launcher = LauncherProcess(data_dir, {"virtualizer": "docker", "docker": {
        "image_dir": str(image_dir), "network": docker_network}})
    launcher.start()
    yield launcher
    launcher.kill()
    launcher.cli("hard-reset", "--yes", "--config", str(launcher.config_path))


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return value


def start_payload(uuid: str, image: str, runcmd: list[Any], **resources: int) -> bytes:
    """A START of a container with a MAC and address of the test network made from its uuid (so that a
    container left by another run is unlikely to hold them)."""
    mac, ip = mac_of(uuid), ip_of(uuid)
    requested = [{"type": name, "value": value} for name, value in resources.items()]
    return json.dumps({
        "start": {"instance_uuid": uuid, "tenant_uuid": str(uuid_module.uuid4()), "vm_type": "docker",
                  "docker_image": image, "requested_resources": requested,
                  "networking": {"vnic_mac": mac, "subnet": SUBNET, "private_ip": ip}},
        "user_data": "#cloud-config\n" + json.dumps({"runcmd": runcmd}),
        "meta_data": json.dumps({"uuid": uuid, "hostname": "box-" + uuid[:8]}),
    }).encode()


def mac_of(uuid: str) -> str:
    return "02:42:" + ":".join(uuid.replace("-", "")[i:i + 2] for i in range(0, 8, 2))


def ip_of(uuid: str) -> str:
    return "172.31.250." + str(10 + int(uuid.replace("-", "")[-4:], 16) % 240)


def state(client: Client, uuid: str) -> str:
    return str(client.request("GET", f"/v1/instances/{uuid}")["state"])


def events(client: Client, kind: str, uuid: str) -> list[dict[str, Any]]:
    lines = b"".join(client.stream("/v1/events", read_timeout=10)).splitlines()
    found = [json.loads(line) for line in lines if line]
    return [e for e in found if e.get("type") == kind and e.get("instance_uuid") == uuid]


def exec_in(uuid: str, command: str) -> str:
    return docker("exec", f"launcher-{uuid}", "sh", "-c", command).stdout.strip()


def test_start_stop_restart_delete_and_a_container_that_exits(docker_launcher: LauncherProcess,
                                                               image_ref: str) -> None:
    client = docker_launcher.client()
    uuid = str(uuid_module.uuid4())
    answer = client.request("POST", "/v1/instances", start_payload(
        uuid, image_ref, [["sleep", "600"]], vcpus=1, mem_mb=80),
        "application/json", wait=1, timeout=60)
    assert answer == {"instance_uuid": uuid, "state": "running", "done": True}
    assert exec_in(uuid, "hostname") == f"box-{uuid[:8]}"
    assert exec_in(uuid, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes") == str(80 * MIB)
    assert exec_in(uuid, "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us") == "100000"
    assert exec_in(uuid, "cat /sys/class/net/eth0/address") == mac_of(uuid)
    assert client.request("POST", f"/v1/instances/{uuid}/stop", wait=1, timeout=60)["state"] == "exited"
    assert inspect(f"launcher-{uuid}")["State"]["Running"] is False
    assert client.request("POST", f"/v1/instances/{uuid}/restart", wait=1, timeout=60)["state"] == "running"
    assert inspect(f"launcher-{uuid}")["State"]["Running"] is True
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=60)["state"] == "deleted"
    assert docker("inspect", f"launcher-{uuid}", check=False).returncode != 0

    other = str(uuid_module.uuid4())
    client.request("POST", "/v1/instances", start_payload(
        other, image_ref, ["echo bye", "exit 7"]), "application/json")
    wait_for("the container to exit", lambda: state(client, other) == "exited")
    [exited] = events(client, "container_exited", other)
    assert (exited["exit_code"], exited["oom_killed"]) == (7, False)
    assert (docker_launcher.data_dir / "instances" / other / "console.log").read_text() == "bye\n"


def test_an_oom_killed_container_is_exited_with_the_reason(docker_launcher: LauncherProcess, image_ref: str) -> None:
    """A container whose command needs more than its mem_mb is killed by the kernel's OOM killer: the instance is
    `exited` and `container_exited` says so (exit code 137, oom_killed), as its launcher.log does."""
    client = docker_launcher.client()
    uuid = str(uuid_module.uuid4())
    hog = ["sh", "-c", "x=$(head -c 67108864 /dev/zero | tr '\\0' a); sleep 60"]  # 64 MiB in a 32 MiB container
    client.request("POST", "/v1/instances", start_payload(uuid, image_ref, [hog], mem_mb=32), "application/json")
    wait_for("the container to be OOM-killed", lambda: state(client, uuid) == "exited", timeout=60)
    [exited] = events(client, "container_exited", uuid)
    assert (exited["exit_code"], exited["oom_killed"]) == (137, True), exited
    log = b"".join(client.stream(f"/v1/instances/{uuid}/log", read_timeout=10)).decode()
    assert "killed by the OOM killer" in log


def test_kill_9_and_restart_reconnects_without_restarting_the_container(docker_launcher: LauncherProcess,
                                                                        image_ref: str) -> None:
    client = docker_launcher.client()
    uuid = str(uuid_module.uuid4())
    client.request("POST", "/v1/instances", start_payload(
        uuid, image_ref, [["sleep", "600"]]), "application/json",
        wait=1, timeout=60)
    started_at = inspect(f"launcher-{uuid}")["State"]["StartedAt"]
    docker_launcher.kill()
    client = docker_launcher.start()
    wait_for("the instance to be running again", lambda: state(client, uuid) == "running")
    assert inspect(f"launcher-{uuid}")["State"]["StartedAt"] == started_at


def test_hard_reset_leaves_a_foreign_container_alone(docker_launcher: LauncherProcess, image_ref: str) -> None:
    client = docker_launcher.client()
    uuid = str(uuid_module.uuid4())
    client.request("POST", "/v1/instances", start_payload(
        uuid, image_ref, [["sleep", "600"]]), "application/json",
        wait=1, timeout=60)
    foreign = f"launcher-test-foreign-{uuid[:8]}"
    docker("run", "-d", "--name", foreign, "--network", NETWORK, image_ref, "sleep", "600")
    try:
        docker_launcher.kill()
        done = docker_launcher.cli("hard-reset", "--yes", "--config", str(docker_launcher.config_path))
        assert done.returncode == 0, done.stdout + done.stderr
        assert docker("inspect", f"launcher-{uuid}", check=False).returncode != 0
        assert inspect(foreign)["State"]["Running"] is True
    finally:
        docker("rm", "-f", foreign, check=False)
