"""Memory mode of the simulation: `MemoryVirtualizer`, one instance's virtualizer, whose VM is an entry in the
backend's table of fake VMs (`vm_table.VmTable`, with its boot clock). Such VMs die with the launcher process.
"""

from __future__ import annotations

import math

import attrs
import trio

from launcher.plugin.errors import LAUNCH_FAILURE, VirtualizerError
from launcher.plugin.protocol import MonitorEvent, MonitorInbox, VmStats
from launcher.plugin.volumes import boot_volume
from virtualizers.simulation.instance import SimulatedInstance
from virtualizers.simulation.settings import crash_after
from virtualizers.simulation.vm_table import FakeVm


@attrs.define(eq=False)
class MemoryVirtualizer(SimulatedInstance):
    """A simulated instance whose VM is an entry in the backend's table."""

    async def create_image(self, user_data: str, meta_data: str, network_config: str | None) -> None:
        """There is no disk in memory mode, only the START's local volumes; the `create` failure rules apply."""
        await self._inject("create")
        await self._make_local_volumes()
        self._take_slot()

    async def start_vm(self) -> None:
        """Register a fake VM that is up after boot_delay_s. launch_failure if one already runs."""
        await self._inject("start")
        if self._backend.vms.get(self._uuid) is not None:
            raise VirtualizerError(LAUNCH_FAILURE, "a simulated VM already runs for this instance", self._uuid)
        await self._claim_slot()
        up_at = trio.current_time() + self._backend.settings.boot_delay_s
        crash_s = crash_after(self._backend.settings, self._uuid)
        crash_at = math.inf if crash_s is None else up_at + crash_s
        self._backend.vms.power_on(self._uuid, FakeVm(up_at, crash_at))

    async def monitor_vm(self, inbox: MonitorInbox, recover: bool) -> None:
        """CONNECTED once the fake VM is up, CLOSED once it is stopped or crashes.

        With no fake VM (never started, or the launcher restarted: memory VMs die with it) CLOSED at once,
        whatever `recover` says.
        """
        vm = self._backend.vms.get(self._uuid)
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
            self._backend.vms.power_off(self._uuid, vm)
        await inbox.send(MonitorEvent.CLOSED)

    async def stop_vm(self, grace: float) -> None:
        """The fake VM goes down after min(stop_delay_s, grace) (sooner if it crashes meanwhile).

        If cancelled before then, the VM keeps running."""
        vm = self._backend.vms.get(self._uuid)
        if vm is None:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(max(0.0, min(self._backend.settings.stop_delay_s, grace))):
            await vm.down.wait()
        self._backend.vms.power_off(self._uuid, vm)

    async def stats(self) -> VmStats:
        """ciao's figures, derived from the spec: a tenth of the memory and disk (0 for an instance that boots
        from a volume: it has no disk of its own, as with qemu), an idle CPU."""
        await trio.lowlevel.checkpoint()
        if self._backend.vms.get(self._uuid) is None:
            return VmStats()
        disk_mb = self._spec.disk_mb // 10 if boot_volume(self._spec) is None else 0
        return VmStats(memory_mb=self._spec.mem_mb // 10, cpu_percent=0, disk_mb=disk_mb)
