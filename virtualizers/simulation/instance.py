"""What both modes' simulated virtualizers share (`SimulatedInstance`): the instance's identity, its volumes and
the failure injection of the phases that do not depend on the mode.

The volume calls follow the rules every virtualizer follows (`launcher.plugin.volumes`), on the simulation's
volume store (volumes.py). A simulated guest takes a hot-plugged disk at once and lets go of one at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import attrs
import trio

from launcher.plugin.errors import IMAGE_FAILURE, STOP_FAILURE, LauncherError, VirtualizerError
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.volumes import check_storage, make_local_volumes, remove_ephemeral_volumes
from launcher.plugin.warm import WarmPools
from virtualizers.simulation.settings import SimulationSettings, inject
from virtualizers.simulation.vm_table import VmTable
from virtualizers.simulation.volumes import SimulatedVolumes


class SimulationParts(Protocol):
    """What a simulated instance reads of its backend (`backend.SimulationBackend` is one)."""

    settings: SimulationSettings
    limiter: trio.CapacityLimiter  # the launcher's shared limit on worker threads
    volumes: SimulatedVolumes
    vms: VmTable  # memory mode's fake VMs
    warm: WarmPools  # the prepared pools


@attrs.define(eq=False)
class SimulatedInstance:
    """What both modes' virtualizers share: the instance's identity and the image phases' failure injection."""

    _backend: SimulationParts
    _spec: InstanceSpec = attrs.field(init=False)
    _dir: Path = attrs.field(init=False)
    _volumes: Callable[[], Sequence[str]] = attrs.field(init=False)  # the instance's (Virtualizer.init)
    _slot: str | None = attrs.field(default=None, init=False)  # the prepared slot taken by create_image
    start_path: str = attrs.field(default="cold", init=False)  # Virtualizer.start_path

    def _take_slot(self) -> None:
        """Take the prepared slot the supervisor set aside for this START, if any (create_image)."""
        taken = self._backend.warm.take(self._uuid)
        if taken is not None:
            self._slot = taken[0]

    async def _claim_slot(self) -> None:
        """start_vm: the taken slot's "VM" becomes the instance's (its file goes), so the start path is pool;
        without one, cold."""
        slot, self._slot = self._slot, None
        self.start_path = "cold" if slot is None else "pool"
        if slot is not None:
            await self._backend.warm.discard(slot)

    @property
    def _uuid(self) -> str:
        return self._spec.instance_uuid

    async def _inject(self, phase: str) -> None:
        """The failure rules of `phase` for this instance (`settings.inject`)."""
        await inject(self._backend.settings, phase, self._uuid)

    def init(self, spec: InstanceSpec, instance_dir: Path, volumes: Callable[[], Sequence[str]]) -> None:
        self._spec = spec
        self._dir = instance_dir
        self._volumes = volumes

    async def attach_volume(self, volume_id: str) -> None:
        """The volume must exist in the store (not_found); the `attach` failure rules apply. A simulated guest
        takes a hot-plugged disk at once."""
        await self._inject("attach")
        try:
            await self._backend.volumes.get(volume_id)
        except LauncherError as exc:
            raise VirtualizerError(exc.code, f"volume {volume_id}: {exc.reason}", self._uuid) from exc

    async def detach_volume(self, volume_id: str) -> None:
        """The `detach` failure rules apply (`hang` is a guest that never lets go); else a simulated guest lets go
        at once."""
        await self._inject("detach")

    async def ensure_backing_image(self) -> None:
        """There is no backing image to fetch. The START's storage follows the rules every virtualizer follows
        (`launcher.plugin.volumes`: an instance with no image boots from its `boot: true` volume) and its volumes
        must exist in the store (as for qemu); then only the `ensure` failure rules can make this fail."""
        try:
            await check_storage(self._backend.volumes, self._spec)
        except LauncherError as exc:
            raise VirtualizerError(IMAGE_FAILURE, exc.reason, self._uuid) from exc
        await self._inject("ensure")

    async def delete_image(self) -> None:
        """Discard a slot taken and never claimed; delete the START's ephemeral volumes. A simulated instance keeps
        nothing else outside its directory."""
        await trio.lowlevel.checkpoint()
        slot, self._slot = self._slot, None
        if slot is not None:
            await self._backend.warm.discard(slot)
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

