"""Usage figures of a VM (part of the plugin API, `launcher.plugin`): `CpuMeter`, the `cpu_percent` of `VmStats`.

A virtualizer reads a VM's cumulative CPU time at each `stats()` call; the meter turns two successive readings
into the share of the VM's vCPUs it used in between. Reset it when the VM comes up or goes down
(`Virtualizer.connected` / `lost_vm`): a reading of another run of the VM is nothing to compare with.
"""

from __future__ import annotations

import time

import attrs


@attrs.define
class CpuMeter:
    """CPU use between two readings, as a percentage of the VM's vCPUs (100 = all of them busy)."""

    _last: tuple[float, float] | None = None  # (CPU seconds, monotonic seconds) of the previous reading

    def percent(self, cpu_s: float, vcpus: int, now: float | None = None) -> int:
        """Record the reading `cpu_s` (the VM's CPU seconds so far) taken at `now` (time.monotonic(), by
        default the present) and return its use since the previous reading; -1 for the first reading since
        `reset` (or one no later than it)."""
        now = time.monotonic() if now is None else now
        last, self._last = self._last, (cpu_s, now)
        if last is None or now <= last[1]:
            return -1
        return max(-1, round(100 * (cpu_s - last[0]) / (now - last[1]) / max(vcpus, 1)))

    def reset(self) -> None:
        """Forget the previous reading: the next `percent` is -1."""
        self._last = None
