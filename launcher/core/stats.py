"""Node and instance statistics, in ciao's STATS shape (reference §5).

Every `stats_snapshot_s` the reporter reads the node's figures (psutil, in a worker thread) and the latest
figures each actor holds, and keeps the result as the snapshot that `GET /v1/stats` serves (and its follow
stream); snapshots are not events (`StatsReporter`). Every `instance_stats_s` it asks each running actor to
refresh its figures, spread evenly over the interval; the actor makes the vm.stats() call itself (only an actor
calls its virtualizer). One poller posting messages costs far less than 10 000 per-actor timers, each of which
wakes by a cancellation.

Differences from ciao, on purpose: disk figures are MiB like memory (ciao mixed decimal MB and MiB), and the
instance state strings are ours (`running`, not ciao's `active`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import trio

from launcher.core.lifecycle import State
from launcher.core.supervisor import Supervisor
from launcher.core.view import InstanceView
from launcher.durable.events import utc_timestamp
from launcher.plugin import files
from launcher.plugin.spec import InstanceSpec

NODE_ID_FILE = "node-id"


def node_uuid(data_dir: Path) -> str:
    """This node's persistent identity, created at first start (blocking)."""
    path = data_dir / NODE_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = str(uuid.uuid4())
        files.atomic_write(path, value.encode(), mode=0o644)
        return value


def node_figures(data_dir: Path) -> dict[str, Any]:
    """ciao's READY fields for this host (blocking: reads /proc). -1 where a figure cannot be read."""
    figures: dict[str, Any] = {"hostname": socket.gethostname(), "cpus_online": psutil.cpu_count() or -1}
    try:
        vm = psutil.virtual_memory()
        figures.update(mem_total_mb=vm.total // 2**20, mem_available_mb=vm.available // 2**20)
    except OSError:
        figures.update(mem_total_mb=-1, mem_available_mb=-1)
    try:
        du = psutil.disk_usage(str(data_dir))
        figures.update(disk_total_mb=du.total // 2**20, disk_available_mb=du.free // 2**20)
    except OSError:
        figures.update(disk_total_mb=-1, disk_available_mb=-1)
    figures["load"] = int(os.getloadavg()[0])
    figures["networks"] = _networks()
    return figures


def _networks() -> list[dict[str, str]]:
    """(IPv4, MAC) of each interface that has both and is not loopback."""
    result = []
    for addrs in psutil.net_if_addrs().values():
        mac = next((a.address for a in addrs if a.family == psutil.AF_LINK), "")
        for a in addrs:
            if a.family == socket.AF_INET and mac and not ipaddress.ip_address(a.address).is_loopback:
                result.append({"ip": a.address, "mac": mac})
    return result


def ssh_port(spec: InstanceSpec) -> int:
    """ciao's derived SSH port: 33000 + (ip[2] << 8) + ip[3] of the private IPv4, 0 when not applicable."""
    if spec.network_node or not spec.networking.private_ip:
        return 0
    try:
        ip = ipaddress.IPv4Address(spec.networking.private_ip).packed
    except ValueError:
        return 0
    port = 33000 + (ip[2] << 8) + ip[3]
    return port if port < 65535 else 0


def instance_figures(instance: InstanceView) -> dict[str, Any]:
    """One instance's entry of a STATS snapshot (ciao's shape, reference §5.2), also part of `GET /v1/instances`."""
    spec = instance.spec
    return {
        "instance_uuid": instance.uuid,
        "state": instance.public_state,
        "ssh_ip": spec.networking.concentrator_ip,
        "ssh_port": ssh_port(spec),
        "memory_usage_mb": instance.stats.memory_mb,
        "disk_usage_mb": instance.stats.disk_mb,
        "cpu_usage": instance.stats.cpu_percent,
        "volumes": list(instance.volumes),
    }


class StatsReporter:
    """Keeps the latest STATS snapshot, taken every `stats_snapshot_s`, for `GET /v1/stats` (and its follow
    stream) and `/metrics`.

    Snapshots are served live and never go into the event journal: at 10 000 instances each is 1.6 MB, and
    the journal keeps state changes, which a controller must be able to catch up on after a day away."""

    def __init__(self, supervisor: Supervisor, limiter: trio.CapacityLimiter, node_id: str) -> None:
        """A reporter for `supervisor`'s instances; `node_id` names the node in each snapshot. Not running yet."""
        self.supervisor = supervisor
        self.limiter = limiter
        self.node_id = node_id
        self.snapshot: dict[str, Any] = {}
        self._encoded: tuple[dict[str, Any], bytes] | None = None  # (snapshot, its JSON), made on demand
        self._taken = trio.Event()  # set (and replaced) each time a snapshot is taken

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the first snapshot, report started, then take one every `stats_snapshot_s` and poll the running
        instances every `instance_stats_s`, until cancelled."""
        await self.refresh()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll_instances)
            task_status.started()
            interval = self.supervisor.config.intervals.stats_snapshot_s
            while True:
                await trio.sleep(interval)
                await self.refresh()

    async def _poll_instances(self) -> None:
        """Ask every running instance for fresh figures once per `instance_stats_s`, evenly spread."""
        interval = self.supervisor.config.intervals.instance_stats_s
        while True:
            actors = [a for a in self.supervisor.actors.values() if a.state is State.RUNNING]
            if not actors:
                await trio.sleep(interval)
                continue
            step = max(1, len(actors) // 100)  # about 100 wake-ups per interval, whatever the count
            for start in range(0, len(actors), step):
                for actor in actors[start : start + step]:
                    actor.poll_stats()
                await trio.sleep(interval * step / len(actors))

    async def refresh(self) -> None:
        """Take a snapshot now (node figures in a worker thread, instance figures as the actors last had them)."""
        node = await trio.to_thread.run_sync(node_figures, self.supervisor.config.data_dir, limiter=self.limiter)
        self.snapshot = {
            "taken_at": utc_timestamp(),
            "node_uuid": self.node_id,
            "status": self.supervisor.status,
            **node,
            "instances": [instance_figures(a) for a in list(self.supervisor.actors.values())],
        }
        self._taken.set()
        self._taken = trio.Event()

    async def taken(self) -> None:
        """Wait until the next snapshot is taken."""
        await self._taken.wait()

    async def follow(self) -> AsyncIterator[bytes]:
        """The current snapshot, then each new one as it is taken, as NDJSON lines, until cancelled."""
        while True:
            taken = self._taken
            yield self.snapshot_json + b"\n"
            await taken.wait()

    @property
    def snapshot_json(self) -> bytes:
        """The snapshot as JSON, encoded at most once per snapshot and only if someone asks (it is 1.6 MB
        at 10 000 instances)."""
        if self._encoded is None or self._encoded[0] is not self.snapshot:
            self._encoded = (self.snapshot, json.dumps(self.snapshot, separators=(",", ":")).encode())
        return self._encoded[1]
