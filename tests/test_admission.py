"""Admission (READY / FULL / MAINTENANCE) and evacuation, against the in-process supervisor."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import pytest
from harness import running_node

from launcher.core.commands import DeleteCommand, EvacuateCommand, RestoreCommand
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.spec import StorageEntry


async def test_burst_of_starts_is_counted_at_admission(tmp_path: Path) -> None:
    """No START waits for a refresh: the 4th of a burst is refused at once (ciao's stale check let it in)."""
    async with running_node(tmp_path, admission={"max_instances": 3}) as node:
        tickets = [node.start(f"aa-{n}") for n in range(3)]
        with pytest.raises(LauncherError) as info:
            node.start("aa-3")
        assert info.value.code == errors.FULL_CN and "limit is 3" in info.value.reason
        assert node.supervisor.status == "FULL"
        for t in tickets:
            await node.done(t)
        await node.done(node.dispatch(DeleteCommand("aa-0")))
        assert node.supervisor.status == "READY"
        assert (await node.done(node.start("aa-3"))).state == "running"
        statuses = [e["status"] for e in await node.events(type="node_status")]
        assert statuses == ["READY", "FULL", "READY", "FULL"]


async def test_vcpu_overcommit_limit(tmp_path: Path) -> None:
    cpus = os.cpu_count() or 1
    async with running_node(tmp_path, admission={"vcpu_overcommit": 1.0}) as node:
        await node.done(node.start("bb-1", vcpus=cpus))
        with pytest.raises(LauncherError) as info:
            node.start("bb-2", vcpus=1)
        assert info.value.code == errors.FULL_CN and "vCPUs" in info.value.reason
        assert node.supervisor.allocated.vcpus == cpus


async def test_memory_limit_and_defaults(tmp_path: Path) -> None:
    """The memory that may be promised is the host's (MiB) less keep_free_memory_mb, times memory_overcommit
    (`Capacity.measure`): settings chosen from this host's memory leave room for 24 MiB, one 16 MiB instance."""
    host_mb = psutil.virtual_memory().total // 2**20
    admission = {"keep_free_memory_mb": host_mb - 100, "memory_overcommit": 0.24}  # 100 MiB left, times 0.24
    async with running_node(tmp_path, admission=admission, defaults={"mem_mb": 16}) as node:
        assert node.supervisor.capacity.mem_mb == pytest.approx(24)
        with pytest.raises(LauncherError) as info:
            node.start("cc-1", mem_mb=25)
        assert info.value.code == errors.FULL_CN
        assert info.value.reason == "25 MiB of memory would be promised, the limit is 24 MiB"
        await node.done(node.start("cc-2"))  # defaults.mem_mb = 16 applies
        assert node.supervisor.actors["cc-2"].spec.mem_mb == 16
        with pytest.raises(LauncherError) as info:
            node.start("cc-3")  # a second 16 MiB: 32 MiB
        assert info.value.reason == "32 MiB of memory would be promised, the limit is 24 MiB"


async def test_local_volumes_count_against_the_disk(tmp_path: Path) -> None:
    """A local volume's size (GiB) is promised disk like an overlay's disk_mb; an instance that boots from a
    volume promises no overlay."""
    total_mb = shutil.disk_usage(tmp_path).total // 2**20
    admission = {"keep_free_disk_mb": 0, "disk_overcommit": 1536 / total_mb}  # room for 1.5 GiB
    async with running_node(tmp_path, admission=admission, defaults={"disk_mb": 100}) as node:
        assert 1500 < node.supervisor.capacity.disk_mb <= 1536
        too_big = (StorageEntry("0a1b-0001", local=True, size=2),)
        with pytest.raises(LauncherError) as info:
            node.start("dd-1", storage=too_big)
        assert info.value.code == errors.FULL_CN
        assert "2148 MiB of disk would be promised" in info.value.reason
        assert "includes 2048 MiB of local volumes" in info.value.reason
        await node.done(node.start("dd-2", storage=(StorageEntry("0a1b-0002", local=True, size=1),)))
        assert node.supervisor.allocated.disk_mb == 100 + 1024
        with pytest.raises(LauncherError) as info:
            node.start("dd-3", storage=(StorageEntry("0a1b-0003", local=True, size=1),))
        assert info.value.code == errors.FULL_CN and "local volumes" in info.value.reason
        await node.done(node.dispatch(DeleteCommand("dd-2")))
        assert node.supervisor.allocated.disk_mb == 0


async def test_evacuate_stops_everything_and_refuses_starts_until_restore(tmp_path: Path) -> None:
    async with running_node(tmp_path) as node:
        for n in range(3):
            await node.done(node.start(f"dd-{n}"))
        evacuate = await node.done(node.dispatch(EvacuateCommand()))
        assert evacuate.state == "MAINTENANCE"
        for n in range(3):
            await node.wait_state(f"dd-{n}", "exited")
        with pytest.raises(LauncherError) as info:
            node.start("dd-9")
        assert info.value.code == errors.NODE_MAINTENANCE
        assert (tmp_path / "maintenance").exists()  # survives a restart
        assert (await node.done(node.dispatch(RestoreCommand()))).state == "READY"
        assert (await node.done(node.start("dd-9"))).state == "running"
        statuses = [e["status"] for e in await node.events(type="node_status")]
        assert statuses[-2:] == ["MAINTENANCE", "READY"]


async def test_maintenance_survives_a_restart(tmp_path: Path) -> None:
    async with running_node(tmp_path) as node:
        await node.done(node.dispatch(EvacuateCommand()))
    async with running_node(tmp_path) as node:
        assert node.supervisor.status == "MAINTENANCE"


async def test_an_evacuate_that_cannot_be_kept_changes_nothing(tmp_path: Path) -> None:
    """The `maintenance` file is written in a worker thread before maintenance begins: a write the file system
    refuses (here: a non-empty directory where the file goes) fails the EVACUATE and leaves the node as it was."""
    async with running_node(tmp_path) as node:
        await node.done(node.start("de-1"))
        (tmp_path / "maintenance" / "in-the-way").mkdir(parents=True)
        evacuate = await node.done(node.dispatch(EvacuateCommand()))
        assert evacuate.error is not None and evacuate.error.code == errors.INTERNAL
        assert "maintenance" in evacuate.error.reason
        assert node.supervisor.status == "READY" and node.state("de-1") == "running"
        assert (await node.done(node.start("de-2"))).state == "running"
