"""Admission (READY / FULL / MAINTENANCE) and evacuation, against the in-process supervisor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import running_node

from launcher.payloads import DeleteCommand, EvacuateCommand, RestoreCommand
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError


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
    async with running_node(tmp_path, admission={"keep_free_memory_mb": 0, "memory_overcommit": 0.001},
                            defaults={"mem_mb": 16}) as node:
        capacity = node.supervisor.capacity.mem_mb
        assert 16 <= capacity < 32  # room for one 16 MiB instance, not two
        with pytest.raises(LauncherError) as info:
            node.start("cc-1", mem_mb=int(capacity) + 1)
        assert info.value.code == errors.FULL_CN and "memory" in info.value.reason
        await node.done(node.start("cc-2"))  # defaults.mem_mb = 16 applies
        assert node.supervisor.instances["cc-2"].spec.mem_mb == 16


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
