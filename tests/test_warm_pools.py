"""Prepared pools (`launcher.plugin.warm`) through the core, on the simulation's slots: a matching START claims a
slot and reports start_path pool, the pools refill, admission counts what slots hold, slots survive a restart or
go, a slot that cannot be made is retried and reported, and a slot set aside for a START that is deleted is
discarded, never handed to another instance."""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from harness import Node, running_node
from test_api import YAML, start_yaml, wait_until

from launcher.core.commands import DeleteCommand
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.warm import PoolSettings, check_pools
from virtualizers.simulation.slots import SLOTS_DIR

POOL = {"image_uuid": "test-image", "vcpus": 1, "mem_mb": 64, "fw_type": "legacy"}


def pool_state(node: Node) -> dict[str, Any]:
    [pool] = node.supervisor.warm_pools()["simulation"].describe()
    return pool


async def wait_pool(node: Node, timeout: float = 10.0, **expected: int) -> dict[str, Any]:
    """The pool's description once the fields in `expected` have those values (bounded: a hang stops the test)."""
    with trio.fail_after(timeout):
        while any(pool_state(node)[key] != value for key, value in expected.items()):
            await trio.sleep(0.01)
    return pool_state(node)


def slot_files(data_dir: Path) -> set[str]:
    return {path.name.removesuffix(".json") for path in (data_dir / SLOTS_DIR).iterdir()}


async def test_a_matching_start_claims_a_slot_and_the_pool_refills(tmp_path: Path) -> None:
    async with running_node(tmp_path, simulation={"pools": [{**POOL, "size": 2}]}) as node:
        await wait_pool(node, ready=2)
        before = slot_files(tmp_path)
        assert len(before) == 2
        ticket = node.start("aa-1", vcpus=1, mem_mb=64, fw_type="legacy")
        assert pool_state(node)["reserved"] == 1  # set aside at dispatch, before the actor ran
        assert (await node.done(ticket)).state == "running"
        assert node.supervisor.actors["aa-1"].start_path == "pool"
        [running] = [e for e in await node.events(type="instance_state", instance_uuid="aa-1")
                     if e["state"] == "running"]
        assert running["start_path"] == "pool"
        pool = await wait_pool(node, ready=2)
        assert (pool["made"], pool["claimed"], pool["reserved"]) == (3, 1, 0)
        after = slot_files(tmp_path)
        assert len(after) == 2 and len(before - after) == 1  # the claimed slot's file went, one new one came

        # Another shape (memory, firmware, a volume) takes the cold path, and leaves the pool alone.
        await node.done(node.start("aa-2", vcpus=1, mem_mb=128, fw_type="legacy"))
        await node.done(node.start("aa-3", vcpus=1, mem_mb=64, fw_type="efi"))
        for uuid in ("aa-2", "aa-3"):
            assert node.supervisor.actors[uuid].start_path == "cold"
        assert pool_state(node)["claimed"] == 1 and slot_files(tmp_path) == after


async def test_admission_counts_what_slots_hold(tmp_path: Path) -> None:
    """Memory for 64 MiB (computed from this host): a pool of two 16 MiB slots holds 32 of it."""
    host_mb = psutil.virtual_memory().total // 2**20
    admission = {"keep_free_memory_mb": host_mb - 100, "memory_overcommit": 0.64}  # 100 MiB left, times 0.64
    pools = [{**POOL, "mem_mb": 16, "size": 2}]
    async with running_node(tmp_path, admission=admission, defaults={"mem_mb": 16},
                            simulation={"pools": pools}) as node:
        assert node.supervisor.capacity.mem_mb == pytest.approx(64)
        await wait_pool(node, ready=2)
        assert node.supervisor.admission.held_by_slots().mem_mb == 32
        with pytest.raises(LauncherError) as info:
            node.start("bb-1", mem_mb=48, fw_type="legacy")  # no slot of its shape: 32 + 48 > 64
        assert info.value.code == errors.FULL_CN
        assert info.value.reason == "80 MiB of memory would be promised, the limit is 64 MiB"
        # A START of the slots' shape takes one: its 16 MiB move from the slot to the instance.
        await node.done(node.start("bb-2", mem_mb=16, fw_type="legacy"))
        await wait_pool(node, ready=2)  # 16 promised + 32 held: room for the refill
        assert node.supervisor.allocated.mem_mb == 16 and node.supervisor.admission.held_by_slots().mem_mb == 32
        with pytest.raises(LauncherError) as info:
            node.start("bb-3", mem_mb=32, fw_type="legacy")  # 16 + 32 + 32 > 64
        assert info.value.reason == "80 MiB of memory would be promised, the limit is 64 MiB"
        await node.done(node.start("bb-4", mem_mb=16, fw_type="legacy"))  # claims: 32 promised, 16 held
        await node.done(node.start("bb-5", mem_mb=16, fw_type="legacy"))  # claims the last: 48 promised
        # The refill stops where admission would: one slot fits (48 + 16 = 64), a second would not.
        pool = await wait_pool(node, ready=1)
        assert not node.supervisor._room_for_slot(1, 16)  # what stops the refill: 48 + 16 + 16 > 64
        assert pool["failures"] == 0 and pool["making"] == 0
        assert node.supervisor.admission.held_by_slots().mem_mb == 16  # one slot, none being made beyond it
        assert node.supervisor.status == "FULL"
        await node.done(node.dispatch(DeleteCommand("bb-5")))
        await wait_pool(node, ready=2)  # room freed: the pool fills up again


async def test_slots_survive_a_restart_and_unwanted_ones_go(tmp_path: Path) -> None:
    async with running_node(tmp_path, simulation={"pools": [{**POOL, "size": 2}]}) as node:
        await wait_pool(node, ready=2)
    made = slot_files(tmp_path)
    async with running_node(tmp_path, simulation={"pools": [{**POOL, "size": 2}]}) as node:
        assert pool_state(node)["ready"] == 2 and pool_state(node)["made"] == 0  # adopted, none made
        assert slot_files(tmp_path) == made
    async with running_node(tmp_path, simulation={"pools": [{**POOL, "size": 1}]}) as node:
        assert pool_state(node)["ready"] == 1  # one adopted, the other discarded: its pool wants one
        assert len(slot_files(tmp_path)) == 1 and slot_files(tmp_path) < made
    async with running_node(tmp_path, simulation={"pools": [{**POOL, "mem_mb": 32, "size": 1}]}) as node:
        pool = await wait_pool(node, ready=1)
        assert pool["made"] == 1 and not slot_files(tmp_path) & made  # no pool of their shape: discarded
    async with running_node(tmp_path) as node:
        assert node.supervisor.warm_pools() == {} and slot_files(tmp_path) == set()


async def test_a_slot_that_cannot_be_made_is_reported_and_the_start_goes_cold(tmp_path: Path) -> None:
    simulation = {"pools": [{**POOL, "size": 1}], "failures": [{"phase": "slot", "action": "fail"}]}
    async with running_node(tmp_path, simulation=simulation) as node:
        pool = await wait_pool(node, failures=1)
        assert pool["ready"] == 0 and "slot failure injected" in pool["last_error"]
        [failed] = await node.events(type="warm_slot_failed")
        assert failed["image_uuid"] == "test-image"
        await node.done(node.start("cc-1", mem_mb=64, fw_type="legacy"))
        assert node.supervisor.actors["cc-1"].start_path == "cold"
        assert pool_state(node)["failures"] == 1  # retried later (2 s, then doubling), not in a loop
        assert slot_files(tmp_path) == set()


async def test_a_slot_set_aside_for_a_deleted_start_is_discarded(tmp_path: Path) -> None:
    """A START deleted before its claim, in both places it can be: before its virtualizer took the slot (its
    create phase hangs) and after (its start phase hangs, until start_vm's bound): the slot is gone, never
    handed to another instance."""
    failures = [{"phase": "create", "match": "^dd-1$", "action": "hang"},
                {"phase": "start", "match": "^dd-2$", "action": "hang"}]
    simulation = {"pools": [{**POOL, "size": 1}], "failures": failures}
    async with running_node(tmp_path, simulation=simulation, timeouts={"start_vm_s": 1}) as node:
        for uuid in ("dd-1", "dd-2"):
            await wait_pool(node, ready=1)
            [reserved] = slot_files(tmp_path)
            node.start(uuid, mem_mb=64, fw_type="legacy")
            assert pool_state(node)["reserved"] == 1
            if uuid == "dd-2":
                await wait_pool(node, claimed=1)  # its virtualizer took the slot: its start phase hangs
            await node.done(node.dispatch(DeleteCommand(uuid)), timeout=30)
            pool = await wait_pool(node, ready=1, reserved=0, discarding=0)
            assert reserved not in slot_files(tmp_path) and len(slot_files(tmp_path)) == 1
            assert pool["claimed"] == (0 if uuid == "dd-1" else 1)  # dd-2's virtualizer had taken it


def test_pool_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"pools\[1\]: the same shape as pools\[0\]"):
        check_pools([PoolSettings("img"), PoolSettings("img", size=3)])
    with pytest.raises(ValueError, match="fw_type"):
        PoolSettings("img", fw_type="bios")


def test_pools_in_node_metrics_and_instances(launcher_factory: Any) -> None:
    """GET /v1/node lists the pools, /metrics counts their slots, GET /v1/instances/{uuid} says start_path."""
    launcher = launcher_factory({"simulation": {"pools": [{**POOL, "size": 2}]}})
    client = launcher.client()
    node = wait_until(lambda: (n := client.request("GET", "/v1/node"))["warm_pools"]["simulation"][0]["ready"] == 2
                      and n)
    assert node, client.request("GET", "/v1/node")
    [pool] = node["warm_pools"]["simulation"]
    assert {k: pool[k] for k in ("image_uuid", "vcpus", "mem_mb", "fw_type", "disk_mb", "size")} == {**POOL,
                                                                                                   "disk_mb": 0,
                                                                                                   "size": 2}
    client.request("POST", "/v1/instances", start_yaml("ee-01"), YAML, wait=True)
    client.request("POST", "/v1/instances", start_yaml("ee-02", mem_mb=96), YAML, wait=True)
    assert client.request("GET", "/v1/instances/ee-01")["start_path"] == "pool"
    assert client.request("GET", "/v1/instances/ee-02")["start_path"] == "cold"
    assert wait_until(lambda: client.request("GET", "/v1/node")["warm_pools"]["simulation"][0]["ready"] == 2)
    conn = http.client.HTTPConnection(client.host, client.port)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {client.token}"})
    text = conn.getresponse().read().decode()
    assert 'launcher_warm_slots{image_uuid="test-image",state="ready",virtualizer="simulation"} 2.0' in text
    assert 'launcher_warm_slots{image_uuid="test-image",state="reserved",virtualizer="simulation"} 0.0' in text
