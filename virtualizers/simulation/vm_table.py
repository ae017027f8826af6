"""Memory mode's "hypervisor": the table of fake VMs the backend holds (`VmTable`), keyed by instance uuid, and
its one boot clock (`VmTable.run_boot_clock`, a task of the backend) that marks every booting VM up at its time.
A fake VM is a few hundred bytes and no task of its own, so tens of thousands fit in one launcher; they die with
the launcher process. Only actors, their monitor sessions and the clock touch the table, from the Trio thread.
"""

from __future__ import annotations

import collections

import attrs
import trio


@attrs.define(eq=False)
class FakeVm:
    """A running VM of memory mode: two deadlines and two events. Deliberately tiny (see the module doc)."""

    up_at: float  # trio.current_time() from which it counts as up
    crash_at: float  # when it dies on its own; math.inf if it does not
    down: trio.Event = attrs.Factory(trio.Event)
    settled: trio.Event = attrs.Factory(trio.Event)  # set at up_at by the backend's boot clock, or once down



@attrs.define(eq=False)
class VmTable:
    """Memory mode's "hypervisor": the fake VMs that run, and the boot clock."""

    _vms: dict[str, FakeVm] = attrs.field(factory=dict, init=False)
    _booting: collections.deque[FakeVm] = attrs.field(factory=collections.deque, init=False)  # by up_at
    _boot_wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)

    def get(self, instance_uuid: str) -> FakeVm | None:
        """The instance's fake VM if it runs, else None."""
        return self._vms.get(instance_uuid)

    def power_on(self, instance_uuid: str, vm: FakeVm) -> None:
        """Run `vm` for the instance; the boot clock sets its `settled` at its up_at."""
        self._vms[instance_uuid] = vm
        # Every VM boots in boot_delay_s, so appending keeps the queue in up_at order.
        self._booting.append(vm)
        self._boot_wakeup.set()

    def power_off(self, instance_uuid: str, vm: FakeVm) -> None:
        """Take `vm` down (idempotent) and wake whoever waits for that."""
        if self._vms.get(instance_uuid) is vm:
            del self._vms[instance_uuid]
        vm.down.set()
        vm.settled.set()

    async def run_boot_clock(self) -> None:
        """Set each booting VM's `settled` at its up_at. One timer for all of them: a deadline per VM costs
        ~40 us of the event loop when it fires (it is a cancellation); one sleep here serves every VM that is due
        by then."""
        while True:
            if not self._booting:
                await self._boot_wakeup.wait()
                self._boot_wakeup = trio.Event()
                continue
            await trio.sleep_until(self._booting[0].up_at)
            now = trio.current_time()
            while self._booting and self._booting[0].up_at <= now:
                self._booting.popleft().settled.set()
