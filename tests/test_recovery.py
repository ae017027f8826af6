"""Recovery: a `kill -9`'d launcher restarts and finds its instances, against real processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil
from conftest import simvm_processes
from test_api import YAML, start_yaml, wait_until

PROCESS_MODE = {"simulation": {"mode": "process", "boot_delay_s": 0.2, "stop_delay_s": 0.1}}


def pidfile_pids(data_dir: Path) -> set[int]:
    return {int(path.read_text()) for path in (data_dir / "instances").glob("*/vm.pid")}


def states(client: Any) -> dict[str, str]:
    return {i["instance_uuid"]: i["state"] for i in client.request("GET", "/v1/instances")["instances"]}


def all_events(client: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in b"".join(client.stream("/v1/events")).splitlines()]


def test_kill_9_with_20_running_instances(launcher_factory: Any) -> None:
    launcher = launcher_factory(PROCESS_MODE)
    client = launcher.client()
    uuids = [f"ac-{n:04}" for n in range(20)]
    for uuid in uuids:
        client.request("POST", "/v1/instances", start_yaml(uuid), YAML)
    assert wait_until(lambda: set(states(client).values()) == {"running"} and len(states(client)) == 20)
    pids_before = pidfile_pids(launcher.data_dir)
    assert len(pids_before) == 20
    # No VM process but these (the intermediate processes of the daemonizing double fork have exited).
    assert wait_until(lambda: {p.pid for p in simvm_processes(launcher.data_dir)} == pids_before)

    launcher.kill(signal.SIGKILL)
    client = launcher.start()

    assert wait_until(lambda: states(client) == dict.fromkeys(uuids, "running"))
    assert {p.pid for p in simvm_processes(launcher.data_dir)} == pids_before  # reconnected, none restarted
    events = all_events(client)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))  # no event lost across the kill
    recovered = [e for e in events if e.get("recovered")]
    assert sorted(e["instance_uuid"] for e in recovered) == uuids
    assert all(e["state"] == "running" for e in recovered)
    assert not [e for e in events if e.get("state") == "exited"]

    # The recovered instances are fully controllable: stop one, delete all; no VM process is left.
    assert client.request("POST", f"/v1/instances/{uuids[0]}/stop", wait=True)["state"] == "exited"
    for uuid in uuids:
        client.request("DELETE", f"/v1/instances/{uuid}", wait=True)
    assert wait_until(lambda: not simvm_processes(launcher.data_dir))


def test_vm_killed_while_launcher_down_is_reported_exited(launcher_factory: Any) -> None:
    launcher = launcher_factory(PROCESS_MODE)
    client = launcher.client()
    for uuid in ("ad-01", "ad-02"):
        client.request("POST", "/v1/instances", start_yaml(uuid), YAML, wait=True)
    launcher.kill(signal.SIGKILL)
    victim = psutil.Process(int((launcher.data_dir / "instances" / "ad-01" / "vm.pid").read_text()))
    victim.kill()
    victim.wait(30)
    client = launcher.start()
    assert wait_until(lambda: states(client) == {"ad-01": "exited", "ad-02": "running"})
    assert client.request("POST", "/v1/instances/ad-01/restart", wait=True)["state"] == "running"


def test_vm_crash_is_an_exited_event(launcher_factory: Any) -> None:
    launcher = launcher_factory(PROCESS_MODE)
    client = launcher.client()
    client.request("POST", "/v1/instances", start_yaml("ae-01"), YAML, wait=True)
    pid = int((launcher.data_dir / "instances" / "ae-01" / "vm.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: states(client) == {"ae-01": "exited"})
    # The table changes first; the event is served once its journal commit is durable, a moment later.
    exited = wait_until(lambda: [e for e in all_events(client) if e.get("state") == "exited"])
    [event] = exited
    assert event["reason"] == "vm_exited"


def test_unreadable_instance_dir_is_moved_aside_and_reported(launcher_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    broken = data_dir / "instances" / "badd-0001"
    broken.mkdir(parents=True)
    (broken / "instance.json").write_text("{ torn")
    launcher = launcher_factory(name="data")
    client = launcher.client()
    assert not broken.exists()
    assert (data_dir / "corrupt" / "badd-0001" / "instance.json").read_text() == "{ torn"
    [event] = [e for e in all_events(client) if e["type"] == "instance_corrupt"]
    assert event["instance_uuid"] == "badd-0001" and event["detail"]
    # The uuid is not blocked: a START of it works.
    assert client.request("POST", "/v1/instances", start_yaml("badd-0001"), YAML, wait=True)["state"] == "running"
