"""The pure storage rules of `launcher.plugin.volumes`: which disks an instance gets in which order, their boot
orders, tags and swap flags (`disk_plan`), the meta-data's `devices` (`devices_metadata`), what admission promises
(`promised_disk_mb`), and `storage_problem` on specs built in code (the parser's cases are in test_payloads.py)."""

from __future__ import annotations

import pytest

from launcher.plugin.spec import InstanceSpec, StorageEntry
from launcher.plugin.volumes import (
    PlannedDisk,
    StorageProblem,
    boot_index_of,
    devices_metadata,
    disk_plan,
    promised_disk_mb,
    storage_problem,
    uses_boot_orders,
    volume_format,
)

UUID = "ab-0001"


def spec(*storage: StorageEntry, image: str = "img", disk_mb: int = 0) -> InstanceSpec:
    return InstanceSpec(instance_uuid=UUID, image_uuid=image, storage=storage, disk_mb=disk_mb)


@pytest.mark.parametrize(("text", "value"), [("", None), ("none", None), ("None", None), ("-1", None),
                                             ("0", 0), ("3", 3), (" 7 ", 7), ("+2", 2)])
def test_boot_index_of(text: str, value: int | None) -> None:
    assert boot_index_of(text) == value


@pytest.mark.parametrize("text", ["first", "1.5", "0x1", "1 2"])
def test_boot_index_of_refuses_what_is_no_integer(text: str) -> None:
    with pytest.raises(ValueError):
        boot_index_of(text)


def test_an_image_instance_without_indexes_keeps_its_plain_boot() -> None:
    plan = disk_plan(spec(StorageEntry("d-1"), StorageEntry("d-2", tag="db")))
    assert plan == (PlannedDisk(""), PlannedDisk("d-1"), PlannedDisk("d-2", tag="db"))
    assert not uses_boot_orders(plan) and plan[0].is_overlay


def test_the_boot_volume_is_first_whatever_its_place_in_storage() -> None:
    plan = disk_plan(spec(StorageEntry("d-1", boot_index="none"), StorageEntry("b-1", boot=True, ephemeral=True),
                          StorageEntry("d-2", boot_index="2"), StorageEntry("d-3", boot_index="1"), image=""))
    assert [(d.volume_id, d.boot_order) for d in plan] == [("b-1", 1), ("d-1", None), ("d-2", 3), ("d-3", 2)]


def test_indexed_volumes_give_the_overlay_order_1_and_follow_by_index() -> None:
    plan = disk_plan(spec(StorageEntry("d-1", boot_index="5"), StorageEntry("d-2"),
                          StorageEntry("d-3", boot_index="2")))
    assert [(d.volume_id, d.boot_order) for d in plan] == [("", 1), ("d-1", 3), ("d-2", None), ("d-3", 2)]


def test_current_volume_ids_decide_the_data_disks() -> None:
    """Volumes attached later (no storage entry) are plain data disks after the START's; a detached one is gone."""
    instance = spec(StorageEntry("b-1", boot=True), StorageEntry("d-1", tag="logs"), image="")
    plan = disk_plan(instance, ["b-1", "x-9"])
    assert plan == (PlannedDisk("b-1", 1), PlannedDisk("x-9"))
    assert disk_plan(instance, ["x-9", "d-1", "b-1"]) == \
        (PlannedDisk("b-1", 1), PlannedDisk("x-9"), PlannedDisk("d-1", tag="logs"))


def test_swap_volumes_are_raw_and_tagged_swap_unless_tagged() -> None:
    plain = StorageEntry("s-1", local=True, swap=True, size=1)
    tagged = StorageEntry("s-2", local=True, swap=True, size=1, tag="fast-swap")
    plan = disk_plan(spec(plain, tagged, StorageEntry("d-1", local=True, size=2)))
    assert plan[1:] == (PlannedDisk("s-1", tag="swap", swap=True), PlannedDisk("s-2", tag="fast-swap", swap=True),
                        PlannedDisk("d-1"))
    assert [volume_format(entry) for entry in (plain, StorageEntry("d-1", local=True, size=2))] == ["raw", "qcow2"]


def test_devices_metadata_has_the_tagged_volumes_only() -> None:
    plan = disk_plan(spec(StorageEntry("b-1", boot=True, tag="root"), StorageEntry("d-1"),
                          StorageEntry("s-1", local=True, swap=True, size=1), image=""))
    assert devices_metadata(plan) == [
        {"type": "disk", "bus": "virtio", "serial": "b-1", "tags": ["root"]},
        {"type": "disk", "bus": "virtio", "serial": "s-1", "tags": ["swap"]},
    ]
    assert devices_metadata(disk_plan(spec(StorageEntry("d-1")))) == []


def test_promised_disk_counts_local_volumes_and_no_overlay_without_an_image() -> None:
    assert promised_disk_mb(spec(StorageEntry("d-1", local=True, size=2), StorageEntry("d-2"), disk_mb=500)) == \
        500 + 2048
    assert promised_disk_mb(spec(StorageEntry("b-1", boot=True), StorageEntry("s-1", local=True, swap=True, size=1),
                                 image="", disk_mb=500)) == 1024


@pytest.mark.parametrize(("instance", "problem"), [
    (spec(), None),
    (spec(image=""), None),  # the parser's rule (test_payloads.py); the simulation boots such specs built in code
    (spec(StorageEntry("b-1", boot=True)),
     StorageProblem("image_uuid", "must be empty when storage[0] has boot: true (the instance boots from that "
                                  "volume)")),
    (spec(StorageEntry("b-1", boot=True), StorageEntry("b-2", boot=True), image=""),
     StorageProblem("storage[1].boot", "only one storage entry may have boot: true (storage[0] has it)")),
    (spec(StorageEntry("d-1", boot_index="3"), StorageEntry("d-2", boot_index="3")),
     StorageProblem("storage[1].boot_index", "storage[0] has boot_index 3 too")),
])
def test_storage_problem_of_specs_built_in_code(instance: InstanceSpec, problem: StorageProblem | None) -> None:
    assert storage_problem(instance) == problem
