"""Warm starts with real QEMU (TCG here), the test guest and a real `launcher serve`: admission counts what the
pool's slots hold, and a host reboot with a pool and a template configured leaves nothing that nothing owns (what
`virsh list --all` and the data dir hold is what /v1/node and the instances account for)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psutil
from test_qemu import conn, new_uuid, start, state, wait_for, wait_guest_ready
from test_warm_pool_qemu import POOL, data_dir_domains, instance, pool_payload, wait_ready
from test_warm_template_qemu import TEMPLATE, template_state

from launcher.cli.client import Client, ClientError
from launcher.core.bootid import BOOT_ID_FILE


def test_admission_counts_what_the_slots_hold(qemu_factory: Any) -> None:
    """Memory for 700 MiB (computed from this host): two 256 MiB slots hold 512 of it."""
    host_mb = psutil.virtual_memory().total // 2**20
    admission = {"keep_free_memory_mb": host_mb - 700, "memory_overcommit": 1.0, "vcpu_overcommit": 64.0}
    launcher = qemu_factory({"pools": [POOL]}, admission=admission)
    client = launcher.client()
    wait_ready(client)
    node = client.request("GET", "/v1/node")
    assert node["capacity"]["mem_mb"] == 700 and node["held_by_slots"]["mem_mb"] == 512
    cold, pooled = new_uuid(), new_uuid()
    payload, _, _ = pool_payload(cold, mem_mb=300)
    try:
        start(client, payload)
        raise AssertionError("a 300 MiB START was admitted beside 512 MiB of slots in 700")
    except ClientError as exc:
        assert exc.code == "full_cn" and "812 MiB of memory would be promised, the limit is 700 MiB" in exc.reason
    payload, _, hostname = pool_payload(pooled)
    assert start(client, payload, wait=1, timeout=120)["state"] == "running"  # takes a slot: no new room needed
    assert instance(client, pooled)["start_path"] == "pool"
    assert wait_guest_ready(launcher, pooled)["hostname"] == hostname
    # 256 promised + 256 held by the other slot: one more slot (768 MiB) would not fit, so none is made.
    node = client.request("GET", "/v1/node")
    assert (node["allocated"]["mem_mb"], node["held_by_slots"]["mem_mb"]) == (256, 256)
    assert node["warm_pools"]["qemu"][0]["ready"] == 1 and node["status"] == "FULL"


def owned(client: Client, data_dir: Path) -> tuple[dict[str, Any], set[str], set[str]]:
    """What the launcher accounts for: its ready slots' ids (from the slot domains of /v1/node's count), the
    instances' domains, and the data dir's slot dirs and templates."""
    node = client.request("GET", "/v1/node")
    slot_dirs = {p.name for p in (data_dir / "slots").iterdir()} if (data_dir / "slots").is_dir() else set()
    templates = {p.name for p in (data_dir / "templates").iterdir()} if (data_dir / "templates").is_dir() else set()
    return node, slot_dirs, templates


def test_a_host_reboot_with_pools_and_templates_leaves_nothing_unowned(qemu_factory: Any) -> None:
    launcher = qemu_factory({"pools": [POOL], "templates": [{**TEMPLATE, "mem_mb": 192}]},
                            recovery={"restart_running": "always"})
    client = launcher.client()
    data_dir = launcher.data_dir
    wait_ready(client)
    key = wait_for("the template", lambda: (t := template_state(client))["built"] and t["key"], timeout=400,
                   every=1)
    pooled, cloned = new_uuid(), new_uuid()
    for uuid, mem_mb, path in ((pooled, 256, "pool"), (cloned, 192, "template")):
        payload, _, _ = pool_payload(uuid, mem_mb=mem_mb)
        assert start(client, payload, wait=1, timeout=180)["state"] == "running"
        assert instance(client, uuid)["start_path"] == path
    wait_guest_ready(launcher, pooled)

    # The host goes down: the launcher dies, every domain of the data dir is destroyed (the transient slots
    # vanish, the instances' persistent domains stay defined, shut off); the next boot has another boot id.
    launcher.kill(signal.SIGKILL)
    for dom in conn().listAllDomains():
        if dom.name() in data_dir_domains(data_dir) and dom.isActive():
            dom.destroy()
    (data_dir / BOOT_ID_FILE).write_text("00000000-0000-4000-8000-000000000000\n")

    client = launcher.start(timeout=60)
    for uuid in (pooled, cloned):
        wait_for(f"{uuid} restarted", lambda u=uuid: state(client, u) == "running", timeout=180)
        assert instance(client, uuid)["start_path"] == "cold"  # booted again from its disk
    assert wait_guest_ready(launcher, pooled, boots=2)["boots"] == "2"
    wait_ready(client)

    node, slot_dirs, templates = owned(client, data_dir)
    domains = data_dir_domains(data_dir)
    slot_domains = {name: slot for name, (owner, slot) in domains.items() if slot and not owner}
    assert len(slot_domains) == node["warm_pools"]["qemu"][0]["ready"] == 2
    assert set(slot_domains.values()) == slot_dirs  # each slot dir is a ready slot's, and each slot has its dir
    assert {owner for owner, _ in domains.values() if owner} == {pooled, cloned}
    assert {name for name, (owner, _) in domains.items() if owner} == {f"launcher-{pooled}", f"launcher-{cloned}"}
    assert templates == {key}  # the clone's disk still backs onto it; nothing half-built
    assert {p.name for p in (data_dir / "instances").iterdir()} == {pooled, cloned}
