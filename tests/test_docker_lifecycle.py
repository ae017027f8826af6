"""The docker virtualizer's instance calls against the real engine, through the plugin API: create and start a
container with the START's hostname, limits, MAC, address and files; watch it exit, be OOM-killed, stop, start
again and go; recover a running one after a "launcher restart" without restarting it; only this data dir's
containers are touched."""

# ruff: noqa: F811 (fixtures imported from docker_support are test arguments)

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import trio
from docker_support import (  # noqa: F401 (fixtures)
    SUBNET,
    Inbox,
    Recorder,
    busybox_rootfs,
    created,
    docker,
    docker_backend,
    docker_engine,
    docker_network,
    image_ref,
    inspect,
    put_rootfs,
    spec_for,
)

from launcher.plugin.errors import IMAGE_FAILURE, NOT_SUPPORTED, VirtualizerError
from launcher.plugin.protocol import MonitorEvent
from launcher.plugin.spec import Networking
from virtualizers.docker.console import CONSOLE_LOG

MIB = 1 << 20


@pytest.fixture
def image_dir(tmp_path: Path, busybox_rootfs: Path, image_ref: str) -> Path:
    directory = tmp_path / "images"
    put_rootfs(directory, image_ref, busybox_rootfs)
    return directory


def cloud_config(*runcmd: object, **more: object) -> str:
    return "#cloud-config\n" + json.dumps({"runcmd": list(runcmd), **more})


def exec_in(name: str, command: str) -> str:
    return docker("exec", name, "sh", "-c", command).stdout.strip()


async def test_a_started_container_has_the_payloads_hostname_limits_mac_address_and_files(
        tmp_path: Path, image_dir: Path, image_ref: str, docker_network: str) -> None:
    recorder = Recorder()
    data = tmp_path / "data"
    user_data = cloud_config("echo hello from the container", "exec sleep 600", packages=["vim"], write_files=[
        {"path": "/etc/motd", "content": "hi\n", "permissions": "0600"},
        {"path": "/opt/app/run.sh", "content": base64.b64encode(b"#!/bin/sh\necho ok\n").decode(),
         "encoding": "b64", "permissions": "0755"}])
    spec = spec_for(image_ref, user_data=user_data, meta_data='{"hostname": "web-1.example.org"}', vcpus=2,
                    mem_mb=96, networking=Networking(vnic_mac="02:42:AC:1F:FA:21", subnet=SUBNET,
                                                     private_ip="172.31.250.33"))
    async with docker_backend(data, {"image_dir": str(image_dir), "network": docker_network}, recorder) as backend:
        vm = await created(backend, spec, data)
        inbox = Inbox()
        await vm.start_vm()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.monitor_vm, inbox, False)
            await inbox.wait_for(MonitorEvent.CONNECTED)
            vm.connected()
            name = f"launcher-{spec.instance_uuid}"
            assert exec_in(name, "hostname") == "web-1"
            assert exec_in(name, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes") == str(96 * MIB)
            assert exec_in(name, "cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || echo -") \
                in (str(96 * MIB), "-")
            assert exec_in(name, "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us") == "200000"
            assert exec_in(name, "cat /sys/class/net/eth0/address") == "02:42:ac:1f:fa:21"
            assert "172.31.250.33/24" in exec_in(name, "ip -4 addr show eth0")
            assert exec_in(name, "cat /etc/motd; stat -c %a /etc/motd") == "hi\n600"
            assert exec_in(name, "/opt/app/run.sh; stat -c %a /opt/app/run.sh") == "ok\n755"
            labels = inspect(name)["Config"]["Labels"]
            assert labels == {"launcher.instance-uuid": spec.instance_uuid, "launcher.data-dir": str(data)}
            assert inspect(name)["HostConfig"]["RestartPolicy"]["Name"] == "no"
            stats = await vm.stats()
            assert 0 <= stats.memory_mb < 96 and stats.disk_mb >= 0 and stats.cpu_percent == -1
            await trio.sleep(0.3)
            assert 0 <= (await vm.stats()).cpu_percent <= 100
            with trio.fail_after(10):
                while b"hello from the container" not in _console(data, spec.instance_uuid):
                    await trio.sleep(0.05)
            with pytest.raises(VirtualizerError) as caught:
                await vm.attach_volume("0f1e2d3c-0000-4000-8000-000000000001")
            assert caught.value.code == NOT_SUPPORTED
            await vm.stop_vm(5)
            await inbox.wait_for(MonitorEvent.CLOSED)
    assert any("user-data keys not applied to a container: packages" in line for _, line in recorder.lines)
    assert [step for step, _ in recorder.steps] == ["image", "disk", "start"]


def _console(data: Path, uuid: str) -> bytes:
    try:
        return (data / "instances" / uuid / CONSOLE_LOG).read_bytes()
    except FileNotFoundError:
        return b""


async def test_a_container_that_exits_is_closed_with_its_exit_code_and_its_output(
        tmp_path: Path, image_dir: Path, image_ref: str) -> None:
    recorder = Recorder()
    data = tmp_path / "data"
    spec = spec_for(image_ref, user_data=cloud_config("echo last words; echo to stderr >&2", "exit 3"))
    async with docker_backend(data, {"image_dir": str(image_dir)}, recorder) as backend:
        vm = await created(backend, spec, data)
        inbox = Inbox()
        await vm.start_vm()
        with trio.fail_after(30):
            await vm.monitor_vm(inbox, False)  # returns once the container is down
    assert inbox.sent[-1] == MonitorEvent.CLOSED
    [exited] = recorder.of("container_exited")
    assert (exited["exit_code"], exited["oom_killed"], exited["instance_uuid"]) == (3, False, spec.instance_uuid)
    # stdout and stderr are copied by the engine apart: their order between the two streams is not kept
    assert sorted(_console(data, spec.instance_uuid).splitlines()) == [b"last words", b"to stderr"]


async def test_an_oom_killed_container_is_closed_with_oom_killed(tmp_path: Path, image_dir: Path,
                                                                 image_ref: str) -> None:
    recorder = Recorder()
    data = tmp_path / "data"
    # 64 MiB held in a shell variable by a 32 MiB container
    spec = spec_for(image_ref, mem_mb=32, user_data=cloud_config(
        ["sh", "-c", "x=$(head -c 67108864 /dev/zero | tr '\\0' a); sleep 60"]))
    async with docker_backend(data, {"image_dir": str(image_dir)}, recorder) as backend:
        vm = await created(backend, spec, data)
        inbox = Inbox()
        await vm.start_vm()
        with trio.fail_after(60):
            await vm.monitor_vm(inbox, False)
    [exited] = recorder.of("container_exited")
    assert exited["oom_killed"] is True, exited
    assert exited["exit_code"] == 137
    assert any("OOM killer" in line for _, line in recorder.lines)


async def test_stop_restart_and_delete(tmp_path: Path, image_dir: Path, image_ref: str) -> None:
    recorder = Recorder()
    data = tmp_path / "data"
    spec = spec_for(image_ref, user_data=cloud_config(["sleep", "600"]))
    name = f"launcher-{spec.instance_uuid}"
    async with docker_backend(data, {"image_dir": str(image_dir)}, recorder) as backend:
        vm = await created(backend, spec, data)
        for round_ in range(2):  # START, then RESTART after a STOP
            inbox = Inbox()
            await vm.start_vm()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vm.monitor_vm, inbox, False)
                await inbox.wait_for(MonitorEvent.CONNECTED)
                with trio.fail_after(5):  # SIGTERM reaches sleep through the init: no 10 s wait for SIGKILL
                    await vm.stop_vm(10)
                await inbox.wait_for(MonitorEvent.CLOSED)
            assert inspect(name)["State"]["Running"] is False
            assert recorder.of("container_exited")[round_]["exit_code"] == 143  # SIGTERM
        await vm.stop_vm(10)  # stopped already: fine
        await vm.delete_image()
        assert docker("inspect", name, check=False).returncode != 0
        assert docker("image", "inspect", image_ref).returncode == 0  # the image stays
        await vm.delete_image()  # gone already: fine


async def test_create_again_overwrites_a_partial_earlier_attempt(tmp_path: Path, image_dir: Path,
                                                                 image_ref: str) -> None:
    data = tmp_path / "data"
    spec = spec_for(image_ref, user_data=cloud_config(["sleep", "600"]))
    async with docker_backend(data, {"image_dir": str(image_dir)}, Recorder()) as backend:
        vm = await created(backend, spec, data)
        first = inspect(f"launcher-{spec.instance_uuid}")["Id"]
        await vm.create_image(spec.user_data, spec.meta_data, None)
        assert inspect(f"launcher-{spec.instance_uuid}")["Id"] != first


async def test_bad_user_data_is_an_image_failure_naming_the_key(tmp_path: Path, image_dir: Path,
                                                                image_ref: str) -> None:
    data = tmp_path / "data"
    spec = spec_for(image_ref, user_data=cloud_config("true", write_files=[{"path": "relative"}]))
    async with docker_backend(data, {"image_dir": str(image_dir)}, Recorder()) as backend:
        with pytest.raises(VirtualizerError) as caught:
            await created(backend, spec, data)
    assert caught.value.code == IMAGE_FAILURE
    assert caught.value.reason.startswith("user-data.write_files[0].path: must be an absolute file path")


async def test_recover_reconnects_to_a_running_container_without_restarting_it(
        tmp_path: Path, image_dir: Path, image_ref: str) -> None:
    data = tmp_path / "data"
    spec = spec_for(image_ref, user_data=cloud_config(["sleep", "600"]))
    gone = spec_for(image_ref, user_data=cloud_config(["true"]))
    settings = {"image_dir": str(image_dir)}
    async with docker_backend(data, settings, Recorder(), cleanup=False) as backend:  # a launcher, then kill -9
        vm = await created(backend, spec, data)
        await vm.start_vm()
        await created(backend, gone, data)  # created, never started: not running
    started_at = inspect(f"launcher-{spec.instance_uuid}")["State"]["StartedAt"]
    recorder = Recorder()
    async with docker_backend(data, settings, recorder) as backend:  # the next launcher
        vm = backend.new_virtualizer()
        vm.init(spec, data / "instances" / spec.instance_uuid, lambda: ())
        inbox = Inbox()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.monitor_vm, inbox, True)
            await inbox.wait_for(MonitorEvent.CONNECTED)
            assert inspect(f"launcher-{spec.instance_uuid}")["State"]["StartedAt"] == started_at
            nursery.cancel_scope.cancel()
        other = backend.new_virtualizer()
        other.init(gone, data / "instances" / gone.instance_uuid, lambda: ())
        inbox = Inbox()
        with trio.fail_after(10):
            await other.monitor_vm(inbox, True)
        assert inbox.sent == [MonitorEvent.CLOSED]
