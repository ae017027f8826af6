"""The simulation virtualizer: fake VMs for scale runs, demos and tests of the launcher's control path.

It implements the whole Virtualizer contract (launcher/plugin/protocol.py) without a hypervisor, in one of two modes
chosen by the `simulation:` section of the launcher config:

``memory`` (default)
    A fake VM is an entry in a table held by the backend, keyed by instance uuid: a few hundred bytes and no
    task of its own, so tens of thousands fit in one launcher. Such VMs die with the launcher process.

``process``
    A fake VM is a real detached process (``python -m virtualizers.simulation.simvm``, see that module) with a pidfile,
    a console log and a disk file in the instance directory. It outlives the launcher, so recovery after a
    restart, pid verification and real usage figures are exercised too.

Unlike ciao's simulation (which never reported its VMs as closed), the VMs here really boot, stop and crash.

Settings (unknown keys or bad values raise ConfigError naming the key, from `parse_section`):

``mode``: ``memory`` | ``process``
``boot_delay_s`` (0.05): time from start_vm until the VM is up (monitor_vm sends CONNECTED).
``stop_delay_s`` (0.0): how long a graceful shutdown takes in the guest.
``failures``: a list of failure-injection rules, tried in order; the first whose ``phase`` is the current
    one, whose ``match`` regex (default: anything) is found in the instance uuid and whose random draw
    succeeds (``probability``, default 1.0) applies. For ``ensure`` / ``create`` / ``start`` / ``attach`` /
    ``detach`` (attach_volume, detach_volume) its ``action`` is ``fail`` (the call raises VirtualizerError with
    the phase's code) or ``hang`` (the call never returns, so the launcher's timeouts and cancellation are
    exercised). For ``crash`` the VM dies ``after_s``
    seconds after it came up.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import psutil
import trio

from launcher.plugin import files
from launcher.plugin.errors import (
    ATTACH_FAILURE,
    DETACH_FAILURE,
    IMAGE_FAILURE,
    LAUNCH_FAILURE,
    STOP_FAILURE,
    LauncherError,
    VirtualizerError,
)
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import MonitorEvent, MonitorInbox, VmStats
from launcher.plugin.settings import at_most, one_of, parse_section
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.tools import ToolError, run_tool
from launcher.plugin.volumes import (
    boot_volume,
    check_storage,
    disk_plan,
    make_local_volumes,
    remove_ephemeral_volumes,
)
from virtualizers.simulation import simvm
from virtualizers.simulation.volumes import VOLUMES_DIR, SimulatedVolumes

SECTION = "simulation"  # the config section these settings come from; error messages name keys under it
MODES = ("memory", "process")
PHASES = ("ensure", "create", "start", "crash", "attach", "detach")
_PHASE_CODES = {"ensure": IMAGE_FAILURE, "create": IMAGE_FAILURE, "start": LAUNCH_FAILURE, "attach": ATTACH_FAILURE,
                "detach": DETACH_FAILURE}

SIMVM_MODULE = "virtualizers.simulation.simvm"
DISK_IMAGE = "disk.img"
SPAWN_TIMEOUT_S = 10.0  # for `python -m virtualizers.simulation.simvm` to daemonize
KILL_WAIT_S = 5.0  # for a SIGKILLed VM process to disappear
UP_POLL_S = 0.05  # how often monitor_vm looks for vm.up while the VM boots
PROCESS_POLL_S = 0.1  # how often to check a process without pidfds
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# Settings


def _regular_expression(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{attribute.name}: invalid regular expression {value!r}: {exc}") from None


@attrs.frozen
class FailureRule:
    """One entry of `simulation.failures`: make calls of `phase` fail (or hang) for matching instances."""

    phase: str = attrs.field(validator=one_of(*PHASES))
    match: str = attrs.field(default="", validator=_regular_expression)  # searched in the instance uuid
    probability: float = attrs.field(default=1.0, validator=at_most(1))
    action: str = attrs.field(default="fail", validator=one_of("fail", "hang"))  # "fail" only for phase crash
    after_s: float = 0.0  # crash only: how long after coming up the VM dies

    def __attrs_post_init__(self) -> None:
        if self.phase == "crash" and self.action != "fail":
            raise ValueError(f"action: must be fail for phase crash, got {self.action!r}")
        if self.after_s and self.phase != "crash":
            raise ValueError("after_s: only allowed for phase crash")

    def applies(self, phase: str, instance_uuid: str) -> bool:
        """Whether this rule fires now for `instance_uuid` in `phase` (draws a random number if it could)."""
        return (
            phase == self.phase and re.search(self.match, instance_uuid) is not None
            and random.random() < self.probability
        )


@attrs.frozen
class SimulationSettings:
    """The `simulation:` section of the launcher config, checked by `launcher.plugin.settings.parse_section`."""

    mode: str = attrs.field(default="memory", validator=one_of(*MODES))
    boot_delay_s: float = 0.05
    stop_delay_s: float = 0.0
    failures: tuple[FailureRule, ...] = ()

    def rule_for(self, phase: str, instance_uuid: str) -> tuple[int, FailureRule] | None:
        """The failure rule that applies to this call, if any, with its index in `failures`."""
        return next(((i, rule) for i, rule in enumerate(self.failures) if rule.applies(phase, instance_uuid)), None)


# ---------------------------------------------------------------------------------------------------------
# The backend


@attrs.define(eq=False)
class _FakeVm:
    """A running VM of memory mode: two deadlines and two events. Deliberately tiny (see the module doc)."""

    up_at: float  # trio.current_time() from which it counts as up
    crash_at: float  # when it dies on its own; math.inf if it does not
    down: trio.Event = attrs.Factory(trio.Event)
    settled: trio.Event = attrs.Factory(trio.Event)  # set at up_at by the backend's boot clock, or once down


@attrs.define(eq=False)
class SimulationBackend:
    """The per-launcher part of the simulation: its settings and, in memory mode, the fake VMs themselves."""

    settings: SimulationSettings
    limiter: trio.CapacityLimiter  # the launcher's shared limit on worker threads (BackendHost.limiter)
    volumes: SimulatedVolumes  # the volume store (VolumeCatalog), served at /v1/volumes
    name: str = attrs.field(default="simulation", init=False)
    _vms: dict[str, _FakeVm] = attrs.field(factory=dict, init=False)  # memory mode's "hypervisor"
    _booting: collections.deque[_FakeVm] = attrs.field(factory=collections.deque, init=False)  # by up_at
    _boot_wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)

    def new_virtualizer(self) -> SimulationVirtualizer:
        if self.settings.mode == "process":
            return ProcessVirtualizer(self)
        return MemoryVirtualizer(self)

    async def inject(self, phase: str, instance_uuid: str) -> None:
        """Apply the failure rules of `phase`: raise or hang if one fires, else just checkpoint."""
        found = self.settings.rule_for(phase, instance_uuid)
        if found is None:
            await trio.lowlevel.checkpoint()
            return
        index, rule = found
        if rule.action == "hang":
            await trio.sleep_forever()
        reason = f"{phase} failure injected by simulation rule {index} ({SECTION}.failures[{index}])"
        raise VirtualizerError(_PHASE_CODES[phase], reason, instance_uuid)

    def crash_after(self, instance_uuid: str) -> float | None:
        """Seconds after coming up at which a VM being started now will crash, or None if it will not."""
        found = self.settings.rule_for("crash", instance_uuid)
        return None if found is None else found[1].after_s

    # Memory mode's table. Only actors and their monitor sessions touch it, from the Trio thread.

    def fake_vm(self, instance_uuid: str) -> _FakeVm | None:
        return self._vms.get(instance_uuid)

    def power_on(self, instance_uuid: str, vm: _FakeVm) -> None:
        self._vms[instance_uuid] = vm
        # Every VM boots in boot_delay_s, so appending keeps the queue in up_at order.
        self._booting.append(vm)
        self._boot_wakeup.set()

    def power_off(self, instance_uuid: str, vm: _FakeVm) -> None:
        """Take `vm` down (idempotent) and wake whoever waits for that."""
        if self._vms.get(instance_uuid) is vm:
            del self._vms[instance_uuid]
        vm.down.set()
        vm.settled.set()

    async def run_boot_clock(self) -> None:
        """Memory mode: set each booting VM's `settled` at its up_at. One timer for all of them: a deadline per
        VM costs ~40 us of the event loop when it fires (it is a cancellation); one sleep here serves every VM
        that is due by then."""
        while True:
            if not self._booting:
                await self._boot_wakeup.wait()
                self._boot_wakeup = trio.Event()
                continue
            await trio.sleep_until(self._booting[0].up_at)
            now = trio.current_time()
            while self._booting and self._booting[0].up_at <= now:
                self._booting.popleft().settled.set()


@asynccontextmanager
async def open_backend(settings: Mapping[str, Any], host: BackendHost) -> AsyncIterator[SimulationBackend]:
    """Open the simulation backend (the `simulation` entry point of `launcher.virtualizers`).

    `settings` is the `simulation:` config section; SetupError (naming the key) if it is invalid. Of `host`
    the worker-thread limiter and the data dir are used: the simulation keeps nothing outside the instance
    directories but its volumes (`volumes.py`), and reports nothing of its own. Closing
    the backend leaves process-mode VMs running (a restarted launcher recovers them); memory-mode VMs live in
    the backend and end with it.
    """
    parsed: SimulationSettings = parse_section(SimulationSettings, dict(settings), f"{SECTION}.")
    backend = SimulationBackend(parsed, host.limiter, SimulatedVolumes(host.data_dir / VOLUMES_DIR, host.limiter))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.run_boot_clock)
        yield backend
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------------------
# Virtualizers


@attrs.define(eq=False)
class _SimulatedInstance:
    """What both modes' virtualizers share: the instance's identity and the image phases' failure injection."""

    _backend: SimulationBackend
    _spec: InstanceSpec = attrs.field(init=False)
    _dir: Path = attrs.field(init=False)
    _volumes: Callable[[], Sequence[str]] = attrs.field(init=False)  # the instance's (Virtualizer.init)

    @property
    def _uuid(self) -> str:
        return self._spec.instance_uuid

    def init(self, spec: InstanceSpec, instance_dir: Path, volumes: Callable[[], Sequence[str]]) -> None:
        self._spec = spec
        self._dir = instance_dir
        self._volumes = volumes

    async def attach_volume(self, volume_id: str) -> None:
        """The volume must exist in the store (not_found); the `attach` failure rules apply. A simulated guest
        takes a hot-plugged disk at once."""
        await self._backend.inject("attach", self._uuid)
        try:
            await self._backend.volumes.get(volume_id)
        except LauncherError as exc:
            raise VirtualizerError(exc.code, f"volume {volume_id}: {exc.reason}", self._uuid) from exc

    async def detach_volume(self, volume_id: str) -> None:
        """The `detach` failure rules apply (`hang` is a guest that never lets go); else a simulated guest lets go
        at once."""
        await self._backend.inject("detach", self._uuid)

    async def ensure_backing_image(self) -> None:
        """There is no backing image to fetch. The START's storage follows the rules every virtualizer follows
        (`launcher.plugin.volumes`: an instance with no image boots from its `boot: true` volume) and its volumes
        must exist in the store (as for qemu); then only the `ensure` failure rules can make this fail."""
        try:
            await check_storage(self._backend.volumes, self._spec)
        except LauncherError as exc:
            raise VirtualizerError(IMAGE_FAILURE, exc.reason, self._uuid) from exc
        await self._backend.inject("ensure", self._uuid)

    async def delete_image(self) -> None:
        """Delete the START's ephemeral volumes; a simulated instance keeps nothing else outside its directory."""
        await trio.lowlevel.checkpoint()
        try:
            await remove_ephemeral_volumes(self._backend.volumes, self._spec, self._volumes())
        except LauncherError as exc:
            raise VirtualizerError(STOP_FAILURE, f"cannot delete an ephemeral volume: {exc.reason}", self._uuid) \
                from exc

    async def _make_local_volumes(self) -> None:
        try:
            await make_local_volumes(self._backend.volumes, self._spec)
        except LauncherError as exc:
            raise VirtualizerError(IMAGE_FAILURE, f"cannot make a local volume: {exc.reason}", self._uuid) from exc

    def connected(self) -> None:
        pass

    def lost_vm(self) -> None:
        pass


@attrs.define(eq=False)
class MemoryVirtualizer(_SimulatedInstance):
    """A simulated instance whose VM is an entry in the backend's table."""

    async def create_image(self, user_data: str, meta_data: str, network_config: str | None) -> None:
        """There is no disk in memory mode, only the START's local volumes; the `create` failure rules apply."""
        await self._backend.inject("create", self._uuid)
        await self._make_local_volumes()

    async def start_vm(self) -> None:
        """Register a fake VM that is up after boot_delay_s. launch_failure if one already runs."""
        await self._backend.inject("start", self._uuid)
        if self._backend.fake_vm(self._uuid) is not None:
            raise VirtualizerError(LAUNCH_FAILURE, "a simulated VM already runs for this instance", self._uuid)
        up_at = trio.current_time() + self._backend.settings.boot_delay_s
        crash_after = self._backend.crash_after(self._uuid)
        crash_at = math.inf if crash_after is None else up_at + crash_after
        self._backend.power_on(self._uuid, _FakeVm(up_at, crash_at))

    async def monitor_vm(self, inbox: MonitorInbox, recover: bool) -> None:
        """CONNECTED once the fake VM is up, CLOSED once it is stopped or crashes.

        With no fake VM (never started, or the launcher restarted: memory VMs die with it) CLOSED at once,
        whatever `recover` says.
        """
        vm = self._backend.fake_vm(self._uuid)
        if vm is None:
            await inbox.send(MonitorEvent.CLOSED)
            return
        await vm.settled.wait()  # up, or down before that
        if not vm.down.is_set():
            await inbox.send(MonitorEvent.CONNECTED)
            if vm.crash_at == math.inf:
                await vm.down.wait()  # no cancel scope for a deadline that never comes
            else:
                with trio.move_on_at(vm.crash_at):
                    await vm.down.wait()
            # Down, or the crash deadline passed. Taking the VM down here is the simulated guest dying, not a
            # change of virtualizer state (which monitors must not make).
            self._backend.power_off(self._uuid, vm)
        await inbox.send(MonitorEvent.CLOSED)

    async def stop_vm(self, grace: float) -> None:
        """The fake VM goes down after min(stop_delay_s, grace) (sooner if it crashes meanwhile).

        If cancelled before then, the VM keeps running."""
        vm = self._backend.fake_vm(self._uuid)
        if vm is None:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(max(0.0, min(self._backend.settings.stop_delay_s, grace))):
            await vm.down.wait()
        self._backend.power_off(self._uuid, vm)

    async def stats(self) -> VmStats:
        """ciao's figures, derived from the spec: a tenth of the memory and disk (0 for an instance that boots
        from a volume: it has no disk of its own, as with qemu), an idle CPU."""
        await trio.lowlevel.checkpoint()
        if self._backend.fake_vm(self._uuid) is None:
            return VmStats()
        disk_mb = self._spec.disk_mb // 10 if boot_volume(self._spec) is None else 0
        return VmStats(memory_mb=self._spec.mem_mb // 10, cpu_percent=0, disk_mb=disk_mb)


@attrs.define(eq=False)
class ProcessVirtualizer(_SimulatedInstance):
    """A simulated instance whose VM is a detached `virtualizers.simulation.simvm` process."""

    _pid: int | None = attrs.field(default=None, init=False)  # set by connected()
    _cpu_sample: tuple[float, float] | None = attrs.field(default=None, init=False)  # (cpu s, wall s)

    async def create_image(self, user_data: str, meta_data: str, network_config: str | None) -> None:
        """Write `disk.img`: the cloud-init data and the instance's disks (`disk_plan`: volume id, "" for the
        image's disk, boot order, tag, swap), as JSON, replaced atomically; make the START's local volumes (swap
        ones raw, not formatted: there is no guest to use them)."""
        await self._backend.inject("create", self._uuid)
        await self._make_local_volumes()
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
        await self._backend.inject("start", self._uuid)
        if _live_vm_pid(self._dir, self._uuid) is not None:
            raise VirtualizerError(LAUNCH_FAILURE, "a simulated VM already runs for this instance", self._uuid)
        # The process run here only waits for the VM to detach (stdout to /dev/null: the VM keeps no pipe of
        # ours), so killing it on a timeout or cancellation (e.g. the launcher shutting down) is harmless.
        try:
            await run_tool(self._simvm_argv(self._backend.crash_after(self._uuid)), timeout_s=SPAWN_TIMEOUT_S,
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
        if sample.cpu_s is not None and self._cpu_sample is not None:
            cpu_s, wall_s = self._cpu_sample
            vcpus = self._spec.vcpus
            if sample.wall_s > wall_s:
                cpu_percent = round((sample.cpu_s - cpu_s) / (sample.wall_s - wall_s) / vcpus * 100)
        self._cpu_sample = None if sample.cpu_s is None else (sample.cpu_s, sample.wall_s)
        return VmStats(
            memory_mb=-1 if sample.memory_bytes is None else sample.memory_bytes // MIB,
            cpu_percent=cpu_percent,
            disk_mb=-1 if sample.disk_bytes is None else -(-sample.disk_bytes // MIB),  # rounded up
        )

    def connected(self) -> None:
        """Remember the VM's pid for stats(); the next CPU figure starts a new measurement."""
        self._pid = _live_vm_pid(self._dir, self._uuid)
        self._cpu_sample = None

    def lost_vm(self) -> None:
        self._pid = None
        self._cpu_sample = None


SimulationVirtualizer = MemoryVirtualizer | ProcessVirtualizer  # what SimulationBackend.new_virtualizer gives


# ---------------------------------------------------------------------------------------------------------
# Process mode helpers


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
