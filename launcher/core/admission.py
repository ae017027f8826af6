"""Admission: what the node has promised (`Resources`), what it may promise (`Capacity`), and why one more instance
or one more warm slot would not fit (`Admission.no_room`).

Admission counts what admitted instances were *promised* (vCPUs, memory, disk), updated at the moment a START is
admitted or an instance is gone, so a burst of STARTs can never overcommit the node (ciao checked a value refreshed
every 6 s; reference §18), and what the virtualizers' prepared slots hold (`launcher.plugin.warm`): a slot holds its
memory from the moment it is made, and what the fleet's auction bids reserve (`launcher.core.bids`). The live
free space of the data dir is checked as well (by the caller, which reads it once per START).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import attrs
import psutil

from launcher.core.bids import Bids
from launcher.core.config import Config
from launcher.core.resources import Resources
from launcher.plugin.warm import SlotShape, WarmPools


@attrs.frozen
class Capacity:
    """What the node can promise to VMs, from the host's size and the admission settings."""

    instances: int
    vcpus: float
    mem_mb: float
    disk_mb: float

    @classmethod
    def measure(cls, config: Config) -> Capacity:
        """The host's CPUs, memory and the data dir's disk, less what the admission settings keep free, times
        their overcommit ratios (blocking: a few reads)."""
        a = config.admission
        total_mem_mb = psutil.virtual_memory().total // 2**20
        disk_total_mb = psutil.disk_usage(str(config.data_dir)).total // 2**20
        return cls(
            instances=a.max_instances,
            vcpus=(os.cpu_count() or 1) * a.vcpu_overcommit,
            mem_mb=max(0, total_mem_mb - a.keep_free_memory_mb) * a.memory_overcommit,
            disk_mb=max(0, disk_total_mb - a.keep_free_disk_mb) * a.disk_overcommit,
        )


class Admission:
    """The node's promises and limits: `allocated` (the instances'), the pools' slots, the auction bids, and
    `capacity`."""

    def __init__(self, config: Config, pools: Mapping[str, WarmPools]) -> None:
        """Nothing promised yet; `pools`: the enabled virtualizers' prepared pools, by virtualizer name."""
        self.config = config
        self.capacity = Capacity.measure(config)
        self.allocated = Resources()
        self.pools = dict(pools)
        self.bids = Bids()  # auction bids' reservations (launcher.core.bids)

    def held_by_slots(self) -> Resources:
        """What the pools' slots hold (those set aside for an instance are counted in its `allocated`)."""
        held = Resources()
        for pools in self.pools.values():
            vcpus, mem_mb = pools.held()
            held += Resources(vcpus, mem_mb)
        return held

    def no_room(self, need: Resources, free_mb: int, instances: int, *, slot: SlotShape | None = None,
                new_instance: bool = True) -> str:
        """Why `need` cannot be promised now, or "" if it can. `free_mb`: the free space in the data dir;
        `instances`: how many instances there are; `slot`: the shape of the ready slot the START would take (its
        resources are then no longer the slot's but the instance's); `new_instance` False for a slot being made.
        The live auction bids count as instances already promised (a START consuming one takes it first)."""
        cap = self.capacity
        bids = self.bids.held()
        after = self.allocated + self.held_by_slots() + bids + need
        if slot is not None:
            after -= Resources(slot.vcpus, slot.mem_mb)
        if new_instance and instances + len(self.bids) + 1 > cap.instances:
            return f"{instances} instances and {len(self.bids)} bids, the limit is {cap.instances}"
        if after.vcpus > cap.vcpus:
            return f"{after.vcpus} vCPUs would be promised, the limit is {cap.vcpus:g}"
        if after.mem_mb > cap.mem_mb:
            return f"{after.mem_mb} MiB of memory would be promised, the limit is {cap.mem_mb:g} MiB"
        if after.disk_mb > cap.disk_mb:
            return f"{after.disk_mb} MiB of disk would be promised, the limit is {cap.disk_mb:g} MiB"
        if free_mb - bids.disk_mb - need.disk_mb < self.config.admission.keep_free_disk_mb:
            return f"only {free_mb} MiB free in {self.config.data_dir}" + (
                f", {bids.disk_mb} MiB of it held by bids" if bids.disk_mb else "")
        return ""
