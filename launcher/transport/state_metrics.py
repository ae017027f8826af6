"""The gauges of the live state on /metrics, read at scrape time: instances by state, node status, promised and
available resources, the newest event's seq, per-instance usage, the volume store's totals. The counters and
histograms are the core's (`launcher.core.metrics`); this reads the supervisor's table through its read-only
API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from launcher.core.metrics import MIB
from launcher.core.supervisor import Supervisor
from launcher.durable.events import EventJournal
from launcher.plugin.protocol import VolumeInfo


class StateCollector(Collector):
    """Gauges of the live state, read at scrape time (and once when registered, so that the registry checks
    their names against the others')."""

    def __init__(self, supervisor: Supervisor, journal: EventJournal,
                 volumes: Callable[[], Sequence[VolumeInfo]] = tuple) -> None:
        """Gauges of `supervisor`'s instances and node and of `journal`'s seqs; `volumes()` gives the volume
        store's volumes as the scrape last read them (none by default)."""
        self.supervisor = supervisor
        self.journal = journal
        self.volumes = volumes  # the volume store's volumes, as the scrape read them

    def collect(self) -> Iterator[Metric]:
        """The gauges as they are now; called by the registry at each scrape, on the event loop, so it
        must not block."""
        s = self.supervisor
        states = GaugeMetricFamily("launcher_instances", "Instances by public state", labels=["state"])
        for state, n in s.state_counts().items():
            states.add_metric([state], n)
        yield states
        by_virtualizer = GaugeMetricFamily("launcher_virtualizer_instances", "Instances by virtualizer (vm_type); "
                                           "unmanaged: those whose virtualizer is not enabled", labels=["virtualizer"])
        for name, n in s.virtualizer_counts().items():
            by_virtualizer.add_metric([name], n)
        yield by_virtualizer
        slots = GaugeMetricFamily("launcher_warm_slots", "Prepared slots of the warm pools, by virtualizer, image and "
                                  "state (making, ready, reserved for an instance)",
                                  labels=["virtualizer", "image_uuid", "state"])
        for name, pools in s.warm_pools().items():
            for (image, state), n in pools.slot_counts().items():
                slots.add_metric([name, image, state], n)
        yield slots
        status = GaugeMetricFamily("launcher_node_status", "1 for the node's current status, 0 for the others",
                                   labels=["status"])
        for name in ("READY", "FULL", "MAINTENANCE"):
            status.add_metric([name], 1 if s.status == name else 0)
        yield status
        a, c = s.allocated, s.capacity
        yield GaugeMetricFamily("launcher_allocated_vcpus", "vCPUs promised to admitted instances", value=a.vcpus)
        yield GaugeMetricFamily("launcher_capacity_vcpus", "vCPUs the node may promise", value=c.vcpus)
        yield GaugeMetricFamily("launcher_allocated_memory_bytes", "Memory promised to admitted instances",
                                value=a.mem_mb * MIB)
        yield GaugeMetricFamily("launcher_capacity_memory_bytes", "Memory the node may promise", value=c.mem_mb * MIB)
        yield GaugeMetricFamily("launcher_allocated_disk_bytes", "Disk promised to admitted instances",
                                value=a.disk_mb * MIB)
        yield GaugeMetricFamily("launcher_capacity_disk_bytes", "Disk the node may promise", value=c.disk_mb * MIB)
        yield GaugeMetricFamily("launcher_events_last_seq", "Sequence number of the newest event",
                                value=self.journal.last_seq)
        memory = GaugeMetricFamily("launcher_instance_memory_bytes", "PSS of the instance's VM",
                                   labels=["instance_uuid"])
        cpu = GaugeMetricFamily("launcher_instance_cpu_ratio", "CPU used by the instance's VM, as a fraction of "
                                "its vCPUs (1 = all busy), since the previous poll", labels=["instance_uuid"])
        disk = GaugeMetricFamily("launcher_instance_disk_bytes", "Disk allocated to the instance's own disk",
                                 labels=["instance_uuid"])
        for instance in s.instances():
            figures = instance.stats  # -1: cannot know, so no sample
            if figures.memory_mb >= 0:
                memory.add_metric([instance.uuid], figures.memory_mb * MIB)
            if figures.cpu_percent >= 0:
                cpu.add_metric([instance.uuid], figures.cpu_percent / 100)
            if figures.disk_mb >= 0:
                disk.add_metric([instance.uuid], figures.disk_mb * MIB)
        yield from (memory, cpu, disk)
        volumes = self.volumes()
        yield GaugeMetricFamily("launcher_volumes", "Volumes in the volume store",
                                value=len(volumes))
        yield GaugeMetricFamily("launcher_volume_capacity_bytes", "Total size of the volumes, as their guests see "
                                "them", value=sum(v.size_mb for v in volumes) * MIB)
        yield GaugeMetricFamily("launcher_volume_allocation_bytes", "Space the volumes take on the host",
                                value=sum(v.allocation_mb for v in volumes) * MIB)
