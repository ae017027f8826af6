"""The docker backend as a whole against the real engine: what a START must give a container, set-up checks that
say what to do, hard reset and the orphan scan touching only this data dir's containers, and an engine that stops
and starts again under a running container's monitor (no answer is not "down")."""

# ruff: noqa: F811 (fixtures imported from docker_support are test arguments)

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from docker_support import (  # noqa: F401 (fixtures)
    ROOT,
    Inbox,
    Recorder,
    busybox_rootfs,
    created,
    docker,
    docker_backend,
    docker_engine,
    engine_answers,
    image_ref,
    inspect,
    put_rootfs,
    spec_for,
)

from launcher.plugin.errors import SetupError
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import MonitorEvent
from launcher.plugin.settings import ConfigError
from launcher.plugin.spec import InstanceSpec, StorageEntry
from virtualizers.docker.backend import DockerBackend, open_backend
from virtualizers.simulation.backend import open_backend as open_simulation

DOCKERD_PIDFILE = Path("/var/run/docker.pid")
SLEEP = '#cloud-config\n{"runcmd": [["sleep", "600"]]}'


def host(data_dir: Path, recorder: Recorder) -> BackendHost:
    return BackendHost(data_dir=data_dir, limiter=trio.CapacityLimiter(4), emit=recorder.emit, log=recorder.log)


async def test_check_start_says_what_a_container_needs(tmp_path: Path) -> None:
    async with open_backend({}, host(tmp_path, Recorder())) as backend:
        assert isinstance(backend, DockerBackend)
        spec = InstanceSpec(instance_uuid="a", docker_image="busybox:1", vm_type="docker")
        assert backend.check_start(spec) is None
        assert backend.check_start(InstanceSpec(instance_uuid="a", vm_type="docker")) == \
            "start.docker_image: required for a container"
        assert backend.check_start(InstanceSpec(instance_uuid="a", docker_image="b", image_uuid="c")) == \
            "start.image_uuid: must be empty for a container (its image is docker_image)"
        with_storage = InstanceSpec(instance_uuid="a", docker_image="b", storage=(StorageEntry(id="v"),))
        assert backend.check_start(with_storage) == ("start.storage: this node has no volume store a container can "
                                                     "use (enable a virtualizer that keeps volumes, such as qemu)")
        async with open_simulation({}, host(tmp_path, Recorder())) as simulation:
            backend.use_volume_store(simulation.volumes)  # what the launcher lends it: the node's store
            assert backend.check_start(with_storage) is None
            booting = InstanceSpec(instance_uuid="a", docker_image="b", storage=(StorageEntry(id="v", boot=True),))
            assert backend.check_start(booting) == "start.storage[0].boot: a container does not boot from a volume"
            local = InstanceSpec(instance_uuid="a", docker_image="b",
                                 storage=(StorageEntry(id="w"), StorageEntry(id="v", local=True, size=1)))
            assert backend.check_start(local) == ("start.storage[1].local: a container mounts existing volumes only "
                                                  "(create a raw one through /v1/volumes first)")
        privileged = InstanceSpec(instance_uuid="a", docker_image="b", privileged=True)
        assert backend.check_start(privileged) == ("start.requirements.privileged: privileged containers are not "
                                                   "allowed on this node (docker.allow_privileged)")
    async with open_backend({"allow_privileged": True}, host(tmp_path, Recorder())) as backend:
        assert backend.check_start(privileged) is None


async def test_settings_are_checked_by_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^docker\.sockt: unknown setting"):
        async with open_backend({"sockt": "x"}, host(tmp_path, Recorder())):
            pass
    with pytest.raises(ConfigError, match=r"^docker\.socket: must be unix:///"):
        async with open_backend({"socket": "tcp://1.2.3.4:2375"}, host(tmp_path, Recorder())):
            pass


async def test_preflight_says_how_to_start_an_engine_that_does_not_answer(tmp_path: Path) -> None:
    async with open_backend({"socket": f"unix://{tmp_path}/no.sock", "call_timeout_s": 2},
                            host(tmp_path, Recorder())) as backend:
        with pytest.raises(SetupError) as caught:
            await backend.preflight()
    message = str(caught.value)
    assert "\n" not in message and "does not answer" in message and "bash .ci/docker-up" in message


async def test_preflight_says_how_to_make_a_missing_network(tmp_path: Path, docker_engine: str) -> None:
    async with open_backend({"network": "no-such-net"}, host(tmp_path, Recorder())) as backend:
        with pytest.raises(SetupError, match=r"^docker\.network: the engine has no network 'no-such-net': create it"):
            await backend.preflight()


async def test_hard_reset_and_the_orphan_scan_touch_only_this_data_dirs_containers(
        tmp_path: Path, busybox_rootfs: Path, image_ref: str) -> None:
    image_dir = tmp_path / "images"
    put_rootfs(image_dir, image_ref, busybox_rootfs)
    data = tmp_path / "data"
    settings = {"image_dir": str(image_dir)}
    foreign = [f"launcher-test-foreign-{os.getpid()}-a", f"launcher-test-foreign-{os.getpid()}-b"]
    try:
        async with docker_backend(data, settings, Recorder(), cleanup=False) as backend:
            ours = spec_for(image_ref, user_data=SLEEP)
            await created(backend, ours, data)
            orphan = spec_for(image_ref, user_data=SLEEP)
            await created(backend, orphan, data)
        # no label at all, and the label of another data dir
        docker("create", "--name", foreign[0], image_ref, "sleep", "1")
        docker("create", "--name", foreign[1], "--label", f"launcher.data-dir={tmp_path / 'other'}",
               "--label", f"launcher.instance-uuid={ours.instance_uuid}", image_ref, "sleep", "1")
        (data / "instances" / orphan.instance_uuid).rmdir()  # its instance dir is gone
        recorder = Recorder()
        async with open_backend(settings, host(data, recorder)) as backend:
            [reported] = recorder.of("orphan_container")
            assert reported == {"instance_uuid": orphan.instance_uuid, "container": f"launcher-{orphan.instance_uuid}",
                                "destroyed": False}
            removed = await backend.destroy_all()
        assert sorted(removed) == sorted([f"launcher-{ours.instance_uuid}", f"launcher-{orphan.instance_uuid}"])
        for name in foreign:
            assert inspect(name)["Name"] == f"/{name}"
    finally:
        for name in foreign:
            docker("rm", "-f", name, check=False)


async def test_destroy_orphans_removes_them(tmp_path: Path, busybox_rootfs: Path, image_ref: str) -> None:
    image_dir = tmp_path / "images"
    put_rootfs(image_dir, image_ref, busybox_rootfs)
    data = tmp_path / "data"
    settings = {"image_dir": str(image_dir), "destroy_orphans": True}
    async with docker_backend(data, settings, Recorder(), cleanup=False) as backend:
        orphan = spec_for(image_ref, user_data=SLEEP)
        await created(backend, orphan, data)
    (data / "instances" / orphan.instance_uuid).rmdir()
    recorder = Recorder()
    async with open_backend(settings, host(data, recorder)):
        assert recorder.of("orphan_container")[0]["destroyed"] is True
    assert docker("inspect", f"launcher-{orphan.instance_uuid}", check=False).returncode != 0


def stop_engine() -> None:
    """Stop dockerd (started by .ci/docker-up, as this test's session fixture made sure): SIGTERM, by its pid;
    --live-restore keeps the containers running."""
    pid = int(DOCKERD_PIDFILE.read_text())
    os.kill(pid, signal.SIGTERM)
    for _ in range(900):  # it may take a minute to let go of its containerd (seen once in 20 runs)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        subprocess.run(["sleep", "0.1"], check=True)
    raise AssertionError("dockerd did not stop within 90 s")


async def test_an_engine_that_stops_under_a_running_container_is_no_answer_not_down(
        tmp_path: Path, docker_engine: str, busybox_rootfs: Path, image_ref: str) -> None:
    image_dir = tmp_path / "images"
    put_rootfs(image_dir, image_ref, busybox_rootfs)
    data = tmp_path / "data"
    recorder = Recorder()
    # poll_s 60: what the monitor learns after the engine is back comes from the event stream, connected again
    async with docker_backend(data, {"image_dir": str(image_dir), "poll_s": 60, "call_timeout_s": 3},
                              recorder) as backend:
        spec = spec_for(image_ref, user_data=SLEEP)
        vm = await created(backend, spec, data)
        await vm.start_vm()
        inbox = Inbox()
        name = f"launcher-{spec.instance_uuid}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.monitor_vm, inbox, False)
            await inbox.wait_for(MonitorEvent.CONNECTED)
            started_at = inspect(name)["State"]["StartedAt"]
            try:
                await trio.to_thread.run_sync(stop_engine)
                assert not engine_answers()
                await trio.sleep(3)  # the monitor asks, gets no answer, and waits
                assert inbox.sent == [MonitorEvent.CONNECTED]
            finally:
                await trio.to_thread.run_sync(lambda: subprocess.run(
                    ["bash", str(ROOT / ".ci" / "docker-up")], check=True, timeout=120))
            assert inspect(name)["State"]["StartedAt"] == started_at  # live-restore: it ran on
            with trio.fail_after(20):
                while not backend.events.connected:
                    await trio.sleep(0.05)
            assert inbox.sent == [MonitorEvent.CONNECTED]
            docker("stop", "-t", "1", name)
            with trio.fail_after(10):  # well before poll_s: the event stream woke the monitor
                await inbox.wait_for(MonitorEvent.CLOSED)
    assert recorder.of("container_exited")[0]["exit_code"] == 143


def test_the_engine_leaves_the_forward_chain_and_nat_alone(docker_engine: str) -> None:
    """dockerd runs with iptables off (.ci/docker-up): no DOCKER chains, and a FORWARD policy it did not set to
    DROP, so libvirt's NAT network (the VMs') keeps working beside the engine."""
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True, timeout=30).stdout
    nat = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    assert "DOCKER" not in rules and "DOCKER" not in nat
    assert "-P FORWARD DROP" not in rules
    flags = Path(f"/proc/{int(DOCKERD_PIDFILE.read_text())}/cmdline").read_bytes().split(b"\0")
    assert {b"--iptables=false", b"--ip-masq=false", b"--bridge=none", b"--live-restore"} <= set(flags)
