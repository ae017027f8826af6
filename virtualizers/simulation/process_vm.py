"""Process mode of the simulation: a fake VM is a real detached process (``python -m
virtualizers.simulation.simvm``, see that module) with a pidfile, a console log and a disk file in the instance
directory. It outlives the launcher, so recovery after a restart, pid verification and real usage figures are
exercised too. `ProcessVirtualizer` is one instance's virtualizer in this mode.

The VM process is found through its pidfile and verified by its command line (`_live_vm_pid`), and watched with
a pidfd (`_ProcessWatch`; polled where the kernel has none), which also makes signalling immune to pid reuse.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import TracebackType

import attrs
import psutil
import trio

from launcher.plugin import files
from launcher.plugin.errors import IMAGE_FAILURE, LAUNCH_FAILURE, STOP_FAILURE, VirtualizerError
from launcher.plugin.protocol import MonitorEvent, MonitorInbox, VmStats
from launcher.plugin.tools import ToolError, run_tool
from launcher.plugin.usage import CpuMeter
from launcher.plugin.volumes import disk_plan
from virtualizers.simulation import simvm
from virtualizers.simulation.instance import SimulatedInstance
from virtualizers.simulation.settings import crash_after

SIMVM_MODULE = "virtualizers.simulation.simvm"
DISK_IMAGE = "disk.img"
SPAWN_TIMEOUT_S = 10.0  # for `python -m virtualizers.simulation.simvm` to daemonize
KILL_WAIT_S = 5.0  # for a SIGKILLed VM process to disappear
UP_POLL_S = 0.05  # how often monitor_vm looks for vm.up while the VM boots
PROCESS_POLL_S = 0.1  # how often to check a process without pidfds
MIB = 1024 * 1024


@attrs.define(eq=False)
class ProcessVirtualizer(SimulatedInstance):
    """A simulated instance whose VM is a detached `virtualizers.simulation.simvm` process."""

    _pid: int | None = attrs.field(default=None, init=False)  # set by connected()
    _cpu: CpuMeter = attrs.field(factory=CpuMeter, init=False)

    async def create_image(self, user_data: str, meta_data: str, network_config: str | None) -> None:
        """Write `disk.img`: the cloud-init data and the instance's disks (`disk_plan`: volume id, "" for the
        image's disk, boot order, tag, swap), as JSON, replaced atomically; make the START's local volumes (swap
        ones raw, not formatted: there is no guest to use them)."""
        await self._inject("create")
        await self._make_local_volumes()
        self._take_slot()
        disk = {"user_data": user_data, "meta_data": meta_data, "network_config": network_config,
                "disks": [attrs.asdict(planned) for planned in disk_plan(self._spec, self._volumes())]}
        try:
            await trio.to_thread.run_sync(files.atomic_write, self._dir / DISK_IMAGE, json.dumps(disk).encode(),
                                          limiter=self._backend.limiter)
        except OSError as exc:
            raise VirtualizerError(IMAGE_FAILURE, f"cannot write {DISK_IMAGE}: {exc}", self._uuid) from exc

    async def start_vm(self) -> None:
        """Run simvm, which daemonizes; return once the VM process has written its pidfile.

        launch_failure if a VM process of this instance already runs or simvm fails or takes too long."""
        await self._inject("start")
        if _live_vm_pid(self._dir, self._uuid) is not None:
            raise VirtualizerError(LAUNCH_FAILURE, "a simulated VM already runs for this instance", self._uuid)
        await self._claim_slot()
        # The process run here only waits for the VM to detach (stdout to /dev/null: the VM keeps no pipe of
        # ours), so killing it on a timeout or cancellation (e.g. the launcher shutting down) is harmless.
        try:
            await run_tool(self._simvm_argv(crash_after(self._backend.settings, self._uuid)), timeout_s=SPAWN_TIMEOUT_S,
                           name=SIMVM_MODULE, capture_stdout=False)
        except ToolError as exc:
            raise VirtualizerError(LAUNCH_FAILURE, f"the simulated VM did not start: {exc}", self._uuid) from exc

    def _simvm_argv(self, crash_after: float | None) -> list[str]:
        settings = self._backend.settings
        argv = [sys.executable, "-m", SIMVM_MODULE, "--uuid", self._uuid, "--dir", str(self._dir.absolute())]
        argv += ["--boot-delay", repr(settings.boot_delay_s), "--stop-delay", repr(settings.stop_delay_s)]
        if crash_after is not None:
            argv += ["--crash-after", repr(crash_after)]
        return argv

    async def monitor_vm(self, inbox: MonitorInbox, recover: bool) -> None:
        """CONNECTED once the VM process has touched vm.up, CLOSED once the process is gone.

        The process is found through the pidfile and verified (see `_live_vm_pid`), so `recover` needs no
        special case: a VM that survived a launcher restart is found running, a dead one (or a pidfile whose
        pid now belongs to another process) gives CLOSED at once.
        """
        pid = _live_vm_pid(self._dir, self._uuid)
        if pid is not None:
            with _ProcessWatch(pid) as watch:
                if await self._wait_until_up(watch):
                    await inbox.send(MonitorEvent.CONNECTED)
                    await watch.exited_within(math.inf)
        await inbox.send(MonitorEvent.CLOSED)

    async def _wait_until_up(self, watch: _ProcessWatch) -> bool:
        """True once vm.up exists, False if the process ended before that."""
        up_file = self._dir / simvm.UP_FILE
        while not up_file.exists():
            if await watch.exited_within(UP_POLL_S):
                return False
        return True

    async def stop_vm(self, grace: float) -> None:
        """SIGTERM (the power button); SIGKILL after `grace` s; return once the process is gone.

        A VM that is already gone is fine. stop_failure if the process outlives SIGKILL by KILL_WAIT_S."""
        pid = _live_vm_pid(self._dir, self._uuid)
        if pid is None:
            await trio.lowlevel.checkpoint()
            return
        with _ProcessWatch(pid) as watch:
            watch.send_signal(signal.SIGTERM)
            if await watch.exited_within(max(0.0, grace)):
                return
            watch.send_signal(signal.SIGKILL)
            if not await watch.exited_within(KILL_WAIT_S):
                reason = f"the simulated VM (pid {pid}) is still there {KILL_WAIT_S:g} s after SIGKILL"
                raise VirtualizerError(STOP_FAILURE, reason, self._uuid)

    async def stats(self) -> VmStats:
        """Measured figures: PSS, CPU use since the previous call (-1 the first time) and disk.img's size."""
        sample = await trio.to_thread.run_sync(_measure, self._pid, self._dir / DISK_IMAGE,
                                               limiter=self._backend.limiter)
        cpu_percent = -1
        if sample.cpu_s is None:
            self._cpu.reset()
        else:
            cpu_percent = self._cpu.percent(sample.cpu_s, self._spec.vcpus, now=sample.wall_s)
        return VmStats(
            memory_mb=-1 if sample.memory_bytes is None else sample.memory_bytes // MIB,
            cpu_percent=cpu_percent,
            disk_mb=-1 if sample.disk_bytes is None else -(-sample.disk_bytes // MIB),  # rounded up
        )

    def connected(self) -> None:
        """Remember the VM's pid for stats(); the next CPU figure starts a new measurement."""
        self._pid = _live_vm_pid(self._dir, self._uuid)
        self._cpu.reset()

    def lost_vm(self) -> None:
        """Forget the VM's pid and CPU readings."""
        self._pid = None
        self._cpu.reset()




def _live_vm_pid(instance_dir: Path, instance_uuid: str) -> int | None:
    """The pid in the instance's pidfile, if that process is alive and is this instance's simvm.

    Checking the command line guards against a pid reused by an unrelated process after the VM died."""
    try:
        pid = int((instance_dir / simvm.PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = process.cmdline()
    except psutil.Error:
        return None
    return pid if SIMVM_MODULE in cmdline and instance_uuid in cmdline else None


class _ProcessWatch:
    """Waits for, and signals, a process that is not our child (the VM was reparented to init).

    Uses a pidfd, which also makes signalling immune to pid reuse; without pidfd support it polls psutil.
    A context manager: leaving it closes the pidfd.
    """

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._fd: int | None = None
        self._exited = False
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited = True
        except OSError:  # no pidfds in this kernel: poll
            pass

    def __enter__(self) -> _ProcessWatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)

    async def exited_within(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end; True if it has."""
        if self._exited:
            await trio.lowlevel.checkpoint()
            return True
        with trio.move_on_after(timeout):
            await self._wait()
            self._exited = True
        return self._exited

    async def _wait(self) -> None:
        if self._fd is not None:
            # A pidfd becomes readable when the process exits (zombie or reaped).
            await trio.lowlevel.wait_readable(self._fd)
            return
        while _is_running(self._pid):
            await trio.sleep(PROCESS_POLL_S)

    def send_signal(self, signum: signal.Signals) -> None:
        """Send `signum` unless the process is already gone."""
        try:
            if self._fd is not None:
                signal.pidfd_send_signal(self._fd, signum)
            else:
                os.kill(self._pid, signum)
        except ProcessLookupError:
            pass


def _is_running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@attrs.frozen
class _Sample:
    """One measurement for stats(); None where it could not be taken."""

    wall_s: float
    cpu_s: float | None
    memory_bytes: int | None
    disk_bytes: int | None


def _measure(pid: int | None, disk: Path) -> _Sample:
    """Read the VM process's CPU time and PSS (RSS where PSS is unreadable) and the disk's size. Blocking."""
    wall_s = time.monotonic()
    try:
        disk_bytes: int | None = disk.stat().st_size
    except OSError:
        disk_bytes = None
    if pid is None:
        return _Sample(wall_s, None, None, disk_bytes)
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            times = process.cpu_times()
            try:
                memory_bytes = process.memory_full_info().pss
            except psutil.AccessDenied:  # PSS comes from /proc/<pid>/smaps, which may be off limits
                memory_bytes = process.memory_info().rss
    except psutil.Error:
        return _Sample(wall_s, None, None, disk_bytes)
    return _Sample(wall_s, times.user + times.system, memory_bytes, disk_bytes)
