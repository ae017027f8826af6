"""The simulation backend: fake VMs for scale runs, demos and tests of the launcher's control path.

`open_backend` is the ``simulation`` entry point of ``launcher.virtualizers`` (an `OpenBackend`,
launcher/plugin/protocol.py, which holds the contract of every call). The simulation keeps that contract without
a hypervisor, in one of two modes chosen by ``simulation.mode`` (settings.py): fake VMs in memory
(memory_vm.py) or one real detached process per VM (process_vm.py). Unlike ciao's simulation (which never
reported its VMs as closed), the VMs here really boot, stop and crash; failure-injection rules make calls fail,
hang or crash for chosen instances. Prepared pools (``simulation.pools``) keep simulated slots (slots.py), so that
the core's admission, refill and recovery of warm pools are exercised at scale.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from launcher.plugin.host import BackendHost
from launcher.plugin.settings import parse_section
from launcher.plugin.spec import InstanceSpec, vm_image_problem
from launcher.plugin.warm import WarmPools
from virtualizers.simulation.memory_vm import MemoryVirtualizer
from virtualizers.simulation.process_vm import ProcessVirtualizer
from virtualizers.simulation.settings import SECTION, SimulationSettings
from virtualizers.simulation.slots import SLOTS_DIR, SimulatedSlots
from virtualizers.simulation.vm_table import VmTable
from virtualizers.simulation.volumes import VOLUMES_DIR, SimulatedVolumes

SLOT_MAKE_TIMEOUT_S = 60.0  # bound on making one slot (a `hang` rule of phase slot meets it)
SimulationVirtualizer = MemoryVirtualizer | ProcessVirtualizer  # what SimulationBackend.new_virtualizer gives


@attrs.define(eq=False)
class SimulationBackend:
    """The per-launcher part of the simulation: its settings, its volume store and, in memory mode, the fake VMs
    themselves (`vms`)."""

    settings: SimulationSettings
    limiter: trio.CapacityLimiter  # the launcher's shared limit on worker threads (BackendHost.limiter)
    volumes: SimulatedVolumes  # the volume store (VolumeCatalog), served at /v1/volumes
    warm: WarmPools  # the prepared pools (launcher.plugin.warm), none unless simulation.pools has some
    name: str = attrs.field(default="simulation", init=False)
    vms: VmTable = attrs.field(factory=VmTable, init=False)  # memory mode's "hypervisor"

    def new_virtualizer(self) -> SimulationVirtualizer:
        """A fresh virtualizer of the configured mode for one instance (`Backend.new_virtualizer`)."""
        if self.settings.mode == "process":
            return ProcessVirtualizer(self)
        return MemoryVirtualizer(self)

    def check_start(self, spec: InstanceSpec) -> str | None:
        """The simulated VMs follow the VMs' image rule (`Backend.check_start`)."""
        return vm_image_problem(spec)


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
    volumes = SimulatedVolumes(host.data_dir / VOLUMES_DIR, host.limiter)
    await volumes.open()
    warm = WarmPools(parsed.pools, SimulatedSlots(host.data_dir / SLOTS_DIR, parsed, host.limiter),
                     make_timeout_s=SLOT_MAKE_TIMEOUT_S, emit=host.emit)
    await warm.recover()
    backend = SimulationBackend(parsed, host.limiter, volumes, warm)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.vms.run_boot_clock)
        yield backend
        nursery.cancel_scope.cancel()
