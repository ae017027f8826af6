"""The simulation's prepared slots (`launcher.plugin.warm`): `SimulatedSlots`, its `SlotMaker`.

A simulated slot is a file ``<data_dir>/sim-slots/<slot id>.json`` holding its shape, made after
``simulation.slot_delay_s`` (the ``slot`` failure rules apply, matched against the slot id). It survives a launcher
restart as a qemu slot does, so that adoption and discarding are exercised; a claim (the instance's start_vm)
removes it: its "VM" is the instance's from then on. Both modes use the same files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import attrs
import trio

from launcher.plugin import files
from launcher.plugin.warm import SlotShape
from virtualizers.simulation.settings import SimulationSettings, inject

log = logging.getLogger(__name__)

SLOTS_DIR = "sim-slots"


@attrs.define(eq=False)
class SimulatedSlots:
    """Slots as files in `directory` (module doc)."""

    directory: Path
    settings: SimulationSettings
    limiter: trio.CapacityLimiter

    async def make_slot(self, slot_id: str, shape: SlotShape) -> None:
        """Wait slot_delay_s, apply the `slot` failure rules, then write the slot's file (atomically)."""
        await trio.sleep(self.settings.slot_delay_s)
        await inject(self.settings, "slot", slot_id)
        await trio.to_thread.run_sync(files.atomic_write, self._path(slot_id), json.dumps(attrs.asdict(shape)).encode(),
                                      limiter=self.limiter)

    async def discard_slot(self, slot_id: str) -> None:
        """Remove the slot's file; nothing if it is gone."""
        await trio.to_thread.run_sync(_unlink, self._path(slot_id), limiter=self.limiter)

    async def surviving_slots(self) -> list[tuple[str, SlotShape]]:
        """The slots whose files an earlier launcher left; an unreadable file (a half-made slot) is removed."""
        return await trio.to_thread.run_sync(self._read_all, limiter=self.limiter)

    def _path(self, slot_id: str) -> Path:
        return self.directory / f"{slot_id}.json"

    def _read_all(self) -> list[tuple[str, SlotShape]]:
        files.make_dirs(self.directory)
        found = []
        for path in sorted(self.directory.iterdir()):
            try:
                found.append((path.name.removesuffix(".json"), SlotShape(**json.loads(path.read_bytes()))))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("simulated slot %s is unreadable (%s): removed", path, exc)
                _unlink(path)
        return found


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
