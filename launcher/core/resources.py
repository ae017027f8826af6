"""`Resources`: vCPUs, memory and disk, as admission promises them to instances and counts them for warm slots and
auction bids."""

from __future__ import annotations

import attrs

from launcher.plugin.spec import InstanceSpec
from launcher.plugin.volumes import promised_disk_mb


@attrs.frozen
class Resources:
    """vCPUs, memory and disk, as promised to instances (admission adds and subtracts them)."""

    vcpus: int = 0
    mem_mb: int = 0
    disk_mb: int = 0

    def __add__(self, other: Resources) -> Resources:
        """Both together."""
        return Resources(self.vcpus + other.vcpus, self.mem_mb + other.mem_mb, self.disk_mb + other.disk_mb)

    def __sub__(self, other: Resources) -> Resources:
        """What is left once `other` is given back."""
        return Resources(self.vcpus - other.vcpus, self.mem_mb - other.mem_mb, self.disk_mb - other.disk_mb)

    @classmethod
    def of(cls, spec: InstanceSpec) -> Resources:
        """What admission promises the instance; its disk is its overlay's plus its local volumes'
        (`launcher.plugin.volumes.promised_disk_mb`)."""
        return cls(spec.vcpus, spec.mem_mb, promised_disk_mb(spec))
