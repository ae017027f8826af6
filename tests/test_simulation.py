"""The simulation virtualizer, driven through the Virtualizer API as the launcher's actors drive it."""

from __future__ import annotations

import json
import os
import re
import signal
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
import trio.testing

from launcher.core.backends import load_backend
from launcher.plugin.errors import IMAGE_FAILURE, LAUNCH_FAILURE, SetupError, VirtualizerError
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import MonitorEvent, VmStats
from launcher.plugin.spec import InstanceSpec
from virtualizers.simulation.backend import SimulationBackend, SimulationVirtualizer, open_backend
from virtualizers.simulation.process_vm import SIMVM_MODULE

CONNECTED = MonitorEvent.CONNECTED
CLOSED = MonitorEvent.CLOSED
FAST = {"boot_delay_s": 0.05, "stop_delay_s": 0.0}
HANG_S = 30.0  # a bound that only stops a test that hangs


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _simvm_pids(root: Path) -> Iterator[int]:
    """Pids of live simvm processes named by the pidfiles under `root`."""
    for pidfile in root.rglob("vm.pid"):
        try:
            process = psutil.Process(int(pidfile.read_text()))
            if process.status() != psutil.STATUS_ZOMBIE and SIMVM_MODULE in process.cmdline():
                yield process.pid
        except (ValueError, psutil.Error):
            continue


@pytest.fixture(autouse=True)
def kill_leftover_vms(tmp_path: Path) -> Iterator[None]:
    """Whatever a test does, no VM process outlives it."""
    yield
    for pid in _simvm_pids(tmp_path):
        os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    """True if `pid` has exited. (A zombie counts: here init may not reap the reparented VMs.)"""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def read_pid(instance_dir: Path) -> int:
    return int((instance_dir / "vm.pid").read_text())


def host_for(data_dir: Path) -> BackendHost:
    """A host whose events and log lines go nowhere: the simulation reports nothing of its own."""
    return BackendHost(data_dir, trio.CapacityLimiter(2), emit=lambda type, **fields: None,
                       log=lambda instance_dir, message: None)


@asynccontextmanager
async def backend(tmp_path: Path, **settings: Any) -> AsyncIterator[SimulationBackend]:
    async with open_backend(settings, host_for(tmp_path)) as opened:
        yield opened


def new_vm(
    backend: SimulationBackend, tmp_path: Path, uuid: str = "u-1", **spec: Any
) -> tuple[SimulationVirtualizer, Path]:
    """A virtualizer initialised for instance `uuid`, with its instance dir created."""
    instance_dir = tmp_path / "instances" / uuid
    instance_dir.mkdir(parents=True, exist_ok=True)
    vm = backend.new_virtualizer()
    vm.init(InstanceSpec(uuid, **spec), instance_dir, lambda: ())
    return vm, instance_dir


async def boot(vm: SimulationVirtualizer) -> None:
    """The START sequence of an actor up to the monitor."""
    await vm.ensure_backing_image()
    await vm.create_image("#cloud-config\n", '{"uuid": "x"}', None)
    await vm.start_vm()


@asynccontextmanager
async def monitoring(
    vm: SimulationVirtualizer, recover: bool = False
) -> AsyncIterator[trio.MemoryReceiveChannel[MonitorEvent]]:
    """Run monitor_vm in the background; yield the channel its events arrive on. Cancelled at exit."""
    send, receive = trio.open_memory_channel[MonitorEvent](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vm.monitor_vm, send, recover)
        yield receive
        nursery.cancel_scope.cancel()


async def expect(events: trio.MemoryReceiveChannel[MonitorEvent], event: MonitorEvent) -> None:
    """The monitor's next event is `event`. The bound only stops a hang: a process-mode VM is a Python process
    that a busy machine may take seconds to start."""
    with trio.fail_after(HANG_S):
        assert await events.receive() == event


async def nothing_within(events: trio.MemoryReceiveChannel[MonitorEvent], seconds: float) -> None:
    with trio.move_on_after(seconds):
        event = await events.receive()
        pytest.fail(f"unexpected {event}")


# ---------------------------------------------------------------------------------------------------------
# Settings


def test_entry_point_is_open_backend() -> None:
    assert load_backend("simulation") is open_backend


async def test_defaults(tmp_path: Path) -> None:
    async with backend(tmp_path) as opened:
        assert opened.name == "simulation"
        assert (opened.settings.mode, opened.settings.boot_delay_s, opened.settings.stop_delay_s) == (
            "memory",
            0.05,
            0.0,
        )
        assert opened.settings.failures == ()


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"mood": "memory"}, "simulation.mood"),
        ({"mode": "qemu"}, "simulation.mode"),
        ({"boot_delay_s": -1}, "simulation.boot_delay_s"),
        ({"boot_delay_s": "1"}, "simulation.boot_delay_s"),
        ({"stop_delay_s": True}, "simulation.stop_delay_s"),
        ({"stop_delay_s": float("nan")}, "simulation.stop_delay_s"),
        ({"failures": {"phase": "start"}}, "simulation.failures"),
        ({"failures": ["start"]}, "simulation.failures[0]"),
        ({"failures": [{}]}, "simulation.failures[0].phase"),
        ({"failures": [{"phase": "boot"}]}, "simulation.failures[0].phase"),
        ({"failures": [{"phase": "start", "match": "("}]}, "simulation.failures[0].match"),
        ({"failures": [{"phase": "start", "match": 7}]}, "simulation.failures[0].match"),
        ({"failures": [{"phase": "start", "probability": 1.5}]}, "simulation.failures[0].probability"),
        ({"failures": [{"phase": "start", "action": "explode"}]}, "simulation.failures[0].action"),
        ({"failures": [{"phase": "crash", "action": "hang"}]}, "simulation.failures[0].action"),
        ({"failures": [{"phase": "start", "after_s": 1}]}, "simulation.failures[0].after_s"),
        ({"failures": [{"phase": "crash", "after_s": -1}]}, "simulation.failures[0].after_s"),
        ({"failures": [{"phase": "start"}, {"phase": "start", "when": 1}]}, "simulation.failures[1].when"),
    ],
)
async def test_invalid_settings_name_the_key(tmp_path: Path, settings: Mapping[str, Any], key: str) -> None:
    with pytest.raises(SetupError, match=rf"^{re.escape(key)}:"):
        async with open_backend(settings, host_for(tmp_path)):
            pass


# ---------------------------------------------------------------------------------------------------------
# Both modes


@pytest.fixture(params=["memory", "process"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_lifecycle(tmp_path: Path, mode: str) -> None:
    async with backend(tmp_path, mode=mode, **FAST) as opened:
        vm, _ = new_vm(opened, tmp_path)
        await boot(vm)
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            vm.connected()
            await vm.stop_vm(grace=2)
            await expect(events, CLOSED)
        vm.lost_vm()
        assert (await vm.stats()).memory_mb == -1
        # Stopped VMs can be started again (RESTART).
        await vm.start_vm()
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            await vm.stop_vm(grace=2)
            await expect(events, CLOSED)


async def test_connected_only_after_boot_delay(tmp_path: Path, mode: str) -> None:
    """CONNECTED comes no sooner than boot_delay_s after start_vm was called (a lower bound only: how much later
    depends on the machine's load)."""
    async with backend(tmp_path, mode=mode, boot_delay_s=0.4) as opened:
        vm, _ = new_vm(opened, tmp_path)
        await vm.ensure_backing_image()
        await vm.create_image("#cloud-config\n", '{"uuid": "x"}', None)
        starting = trio.current_time()
        await vm.start_vm()
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            assert trio.current_time() - starting >= 0.4
            await vm.stop_vm(grace=1)


async def test_stop_while_booting_closes_without_connecting(tmp_path: Path, mode: str) -> None:
    async with backend(tmp_path, mode=mode, boot_delay_s=600) as opened:
        vm, _ = new_vm(opened, tmp_path)
        await boot(vm)
        async with monitoring(vm) as events:
            await trio.testing.wait_all_tasks_blocked()  # the monitor waits for the VM to come up
            await vm.stop_vm(grace=1)
            await expect(events, CLOSED)  # the next event: no CONNECTED before it


async def test_second_start_is_launch_failure(tmp_path: Path, mode: str) -> None:
    async with backend(tmp_path, mode=mode, **FAST) as opened:
        vm, _ = new_vm(opened, tmp_path)
        await boot(vm)
        with pytest.raises(VirtualizerError) as raised:
            await vm.start_vm()
        assert raised.value.code == LAUNCH_FAILURE
        assert raised.value.instance_uuid == "u-1"
        await vm.stop_vm(grace=1)


async def test_stop_of_a_vm_that_is_not_running_is_fine(tmp_path: Path, mode: str) -> None:
    """stop_vm of a VM that never ran, and a second stop_vm, succeed. After the double stop the VM is really gone
    (process mode: its process, looked at here, before `kill_leftover_vms` would SIGKILL it) and a monitor finds
    none."""
    async with backend(tmp_path, mode=mode, **FAST) as opened:
        vm, instance_dir = new_vm(opened, tmp_path)
        await vm.stop_vm(grace=1)
        await boot(vm)
        if mode == "process":
            pid = read_pid(instance_dir)
            assert not gone(pid)
        else:
            assert opened.vms.get("u-1") is not None
        await vm.stop_vm(grace=1)
        await vm.stop_vm(grace=1)
        if mode == "process":
            assert gone(pid) and list(_simvm_pids(tmp_path)) == []
        else:
            assert opened.vms.get("u-1") is None
        async with monitoring(vm) as events:
            await expect(events, CLOSED)
        await vm.delete_image()


async def test_monitor_without_a_vm_sends_closed(tmp_path: Path, mode: str) -> None:
    async with backend(tmp_path, mode=mode, **FAST) as opened:
        vm, _ = new_vm(opened, tmp_path)
        for recover in (False, True):
            async with monitoring(vm, recover) as events:
                await expect(events, CLOSED)


async def test_graceful_stop_takes_stop_delay(tmp_path: Path, mode: str) -> None:
    async with backend(tmp_path, mode=mode, boot_delay_s=0, stop_delay_s=0.3) as opened:
        vm, _ = new_vm(opened, tmp_path)
        await boot(vm)
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            started = trio.current_time()
            await vm.stop_vm(grace=HANG_S)
            assert 0.25 <= trio.current_time() - started < HANG_S  # the guest's shutdown, not the grace
            await expect(events, CLOSED)


async def test_stop_is_bounded_by_grace(tmp_path: Path, mode: str) -> None:
    async with backend(tmp_path, mode=mode, boot_delay_s=0, stop_delay_s=600) as opened:
        vm, _ = new_vm(opened, tmp_path)
        await boot(vm)
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            with trio.fail_after(HANG_S):  # the guest would take 600 s
                await vm.stop_vm(grace=0.2)
            await expect(events, CLOSED)


# ---------------------------------------------------------------------------------------------------------
# Failure injection


@pytest.mark.parametrize(
    ("phase", "code"), [("ensure", IMAGE_FAILURE), ("create", IMAGE_FAILURE), ("start", LAUNCH_FAILURE)]
)
async def test_injected_failure(tmp_path: Path, mode: str, phase: str, code: str) -> None:
    failures = [
        {"phase": phase, "match": "^u-", "probability": 0},  # never fires
        {"phase": phase, "match": "bad$"},
    ]
    async with backend(tmp_path, mode=mode, failures=failures, **FAST) as opened:
        good, _ = new_vm(opened, tmp_path, "u-good")
        await boot(good)
        await good.stop_vm(grace=1)
        bad, _ = new_vm(opened, tmp_path, "u-bad")
        with pytest.raises(VirtualizerError) as raised:
            await boot(bad)
        assert (raised.value.code, raised.value.instance_uuid) == (code, "u-bad")
        assert "simulation rule 1" in raised.value.reason


async def test_first_applicable_rule_wins(tmp_path: Path) -> None:
    failures = [{"phase": "start", "match": "x"}, {"phase": "ensure"}, {"phase": "start"}]
    async with backend(tmp_path, failures=failures) as opened:
        vm, _ = new_vm(opened, tmp_path, "u-x")
        with pytest.raises(VirtualizerError, match="rule 0"):
            await vm.start_vm()
        vm, _ = new_vm(opened, tmp_path, "u-y")
        with pytest.raises(VirtualizerError, match="rule 2"):
            await vm.start_vm()


@pytest.mark.parametrize("phase", ["ensure", "create", "start"])
async def test_injected_hang_is_cancellable(tmp_path: Path, mode: str, phase: str) -> None:
    async with backend(tmp_path, mode=mode, failures=[{"phase": phase, "action": "hang"}], **FAST) as opened:
        vm, _ = new_vm(opened, tmp_path)
        with trio.move_on_after(0.1) as scope:
            await boot(vm)
        assert scope.cancelled_caught


async def test_injected_crash(tmp_path: Path, mode: str) -> None:
    failures = [{"phase": "crash", "match": "doomed", "after_s": 0.3}]
    async with backend(tmp_path, mode=mode, failures=failures, boot_delay_s=0) as opened:
        vm, instance_dir = new_vm(opened, tmp_path, "u-doomed")
        # The crash comes after_s after the VM is up, which is after boot() began; when the monitor sees it
        # come up can lag under load, so the bound is taken from before the boot.
        booting = trio.current_time()
        await boot(vm)
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            vm.connected()
            await expect(events, CLOSED)
            assert trio.current_time() - booting >= 0.3
        vm.lost_vm()
        assert await vm.stats() == VmStats(disk_mb=-1 if mode == "memory" else 1)
        if mode == "process":
            assert "crashed" in (instance_dir / "vm-console.log").read_text()
        # Another instance is spared by the rule's regex.
        survivor, _ = new_vm(opened, tmp_path, "u-lucky")
        await boot(survivor)
        async with monitoring(survivor) as events:
            await expect(events, CONNECTED)
            await nothing_within(events, 0.5)
            await survivor.stop_vm(grace=1)


# ---------------------------------------------------------------------------------------------------------
# Memory mode


async def test_memory_stats_follow_the_spec(tmp_path: Path) -> None:
    async with backend(tmp_path, **FAST) as opened:
        vm, _ = new_vm(opened, tmp_path, vcpus=2, mem_mb=2048, disk_mb=10000)
        assert await vm.stats() == VmStats()
        await boot(vm)
        assert await vm.stats() == VmStats(memory_mb=204, cpu_percent=0, disk_mb=1000)
        unsized, _ = new_vm(opened, tmp_path, "u-2")
        await boot(unsized)
        assert await unsized.stats() == VmStats(memory_mb=25, cpu_percent=0, disk_mb=0)
        await vm.stop_vm(grace=1)
        assert await vm.stats() == VmStats()


async def test_memory_vms_end_with_the_launcher(tmp_path: Path) -> None:
    async with backend(tmp_path, **FAST) as opened:
        vm, _ = new_vm(opened, tmp_path)
        await boot(vm)
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
        # The same launcher reconnects to its VM...
        async with monitoring(vm, recover=True) as events:
            await expect(events, CONNECTED)
    # ...a restarted one finds it gone.
    async with backend(tmp_path, **FAST) as restarted:
        vm, _ = new_vm(restarted, tmp_path)
        async with monitoring(vm, recover=True) as events:
            await expect(events, CLOSED)


async def test_memory_vms_are_small(tmp_path: Path) -> None:
    """Each VM, with its virtualizer, spec and the monitor task an actor runs for it, costs a few KiB."""
    count = 2000
    delivered = 0

    class Inbox:
        async def send(self, event: MonitorEvent) -> None:
            nonlocal delivered
            delivered += event is CONNECTED

    tracemalloc.start()
    try:
        async with backend(tmp_path, boot_delay_s=0.01) as opened, trio.open_nursery() as nursery:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(count):
                vm = opened.new_virtualizer()
                vm.init(InstanceSpec(f"{i:08d}-0000-0000-0000-000000000000"), tmp_path / str(i), lambda: ())
                await vm.start_vm()
                nursery.start_soon(vm.monitor_vm, Inbox(), False)
            with trio.fail_after(HANG_S):
                while delivered < count:
                    await trio.sleep(0.01)
            per_vm = (tracemalloc.get_traced_memory()[0] - before) / count
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert per_vm < 8 * 1024, per_vm


# ---------------------------------------------------------------------------------------------------------
# Process mode


async def test_process_vm_files(tmp_path: Path) -> None:
    async with backend(tmp_path, mode="process", **FAST) as opened:
        vm, instance_dir = new_vm(opened, tmp_path)
        await vm.create_image("#cloud-config\n", '{"uuid": "u-1"}', None)
        disk = json.loads((instance_dir / "disk.img").read_text())
        assert disk == {"user_data": "#cloud-config\n", "meta_data": '{"uuid": "u-1"}', "network_config": None,
                        "disks": []}  # no image, no volumes: no disk (the plan: test_volumes.py)
        await vm.create_image("#cloud-config\nhostname: h\n", "{}", "version: 2\n")  # overwrites
        assert json.loads((instance_dir / "disk.img").read_text())["network_config"] == "version: 2\n"
        await vm.start_vm()
        pid = read_pid(instance_dir)
        process = psutil.Process(pid)
        assert process.ppid() != os.getpid()  # detached: not our child
        assert process.pid == os.getsid(pid)  # its own session
        assert "u-1" in process.cmdline()
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            assert (instance_dir / "vm.up").exists()
            await vm.stop_vm(grace=2)
            assert gone(pid)
            await expect(events, CLOSED)
        assert not (instance_dir / "vm.up").exists()
        console = (instance_dir / "vm-console.log").read_text()
        for line in ("booting", "up", "shutdown requested", "powered off"):
            assert line in console


async def test_process_kill_9_is_closed(tmp_path: Path) -> None:
    async with backend(tmp_path, mode="process", **FAST) as opened:
        vm, instance_dir = new_vm(opened, tmp_path)
        await boot(vm)
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            os.kill(read_pid(instance_dir), signal.SIGKILL)
            await expect(events, CLOSED)


async def test_process_vm_survives_a_launcher_restart(tmp_path: Path) -> None:
    async with backend(tmp_path, mode="process", **FAST) as opened:
        vm, instance_dir = new_vm(opened, tmp_path)
        await boot(vm)
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
        pid = read_pid(instance_dir)
        create_time = psutil.Process(pid).create_time()
    async with backend(tmp_path, mode="process", **FAST) as restarted:
        vm, _ = new_vm(restarted, tmp_path)
        async with monitoring(vm, recover=True) as events:
            await expect(events, CONNECTED)
            assert read_pid(instance_dir) == pid
            assert psutil.Process(pid).create_time() == create_time  # the same VM, not a new one
            await vm.stop_vm(grace=2)
            await expect(events, CLOSED)


async def test_process_recover_finds_a_dead_vm_closed(tmp_path: Path) -> None:
    async with backend(tmp_path, mode="process", **FAST) as opened:
        vm, instance_dir = new_vm(opened, tmp_path)
        await boot(vm)
        pid = read_pid(instance_dir)
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(HANG_S):
            while not gone(pid):
                await trio.sleep(0.01)
    async with backend(tmp_path, mode="process", **FAST) as restarted:
        vm, _ = new_vm(restarted, tmp_path)
        async with monitoring(vm, recover=True) as events:
            await expect(events, CLOSED)


async def test_process_pidfile_of_another_process_is_not_the_vm(tmp_path: Path) -> None:
    async with backend(tmp_path, mode="process", **FAST) as opened:
        vm, instance_dir = new_vm(opened, tmp_path)
        (instance_dir / "vm.pid").write_text(f"{os.getpid()}\n")  # pid reused by an unrelated process
        async with monitoring(vm, recover=True) as events:
            await expect(events, CLOSED)
        vm.connected()
        assert (await vm.stats()).memory_mb == -1
        await vm.stop_vm(grace=0.1)  # must not signal us
        await vm.start_vm()  # the stale pidfile does not block a start
        assert read_pid(instance_dir) != os.getpid()
        await vm.stop_vm(grace=1)


async def test_process_stats_are_measured(tmp_path: Path) -> None:
    async with backend(tmp_path, mode="process", **FAST) as opened:
        vm, _ = new_vm(opened, tmp_path, vcpus=2)
        await boot(vm)
        async with monitoring(vm) as events:
            await expect(events, CONNECTED)
            vm.connected()
            first = await vm.stats()
            assert first.cpu_percent == -1  # no earlier sample to compare with
            assert 0 < first.memory_mb < 200
            assert first.disk_mb == 1  # a few bytes, rounded up
            await trio.sleep(0.1)
            second = await vm.stats()
            assert 0 <= second.cpu_percent <= 100  # an idle VM
            vm.connected()
            assert (await vm.stats()).cpu_percent == -1  # connected() starts over
            await vm.stop_vm(grace=1)
            await expect(events, CLOSED)
        vm.lost_vm()
        assert await vm.stats() == VmStats(disk_mb=1)


async def test_process_start_failure_is_reported(tmp_path: Path) -> None:
    async with backend(tmp_path, mode="process", **FAST) as opened:
        vm = opened.new_virtualizer()
        vm.init(InstanceSpec("u-1"), tmp_path / "missing", lambda: ())
        with pytest.raises(VirtualizerError) as raised:
            await vm.start_vm()
        assert raised.value.code == LAUNCH_FAILURE
        assert "No such file or directory" in raised.value.reason
