"""Host reboot, simulated: every process-mode VM and the launcher are killed (`kill -9`), the boot id the data dir
remembers is changed to another boot's, and a launcher starts again. The `recovery:` policy decides which
instances come back `running`; an instance STOPped by a command, or whose VM had crashed, stays `exited`."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from conftest import LauncherProcess, simvm_processes
from test_api import YAML, start_yaml
from test_interrupted import journal_seq, set_settings
from test_recovery import all_events, states, wait_until

from launcher.core.bootid import BOOT_ID_FILE, KERNEL_BOOT_ID
from launcher.durable.records import InstanceRecord

PROCESS = {"mode": "process", "boot_delay_s": 0.2, "stop_delay_s": 0.0}
OTHER_BOOT = "00000000-0000-4000-8000-000000000000"


def start_with_restart_flag(uuid: str) -> bytes:
    """A START whose payload says `restart: true`."""
    return start_yaml(uuid) + b"  restart: true\n"


def host_reboot(launcher: LauncherProcess, *, new_boot: bool = True) -> int:
    """Everything on the host dies at once; with `new_boot`, the kernel's boot id is another one afterwards.
    The last seq in the journal: the next launcher's events come after it."""
    launcher.kill(signal.SIGKILL)
    for proc in simvm_processes(launcher.data_dir):
        proc.kill()
        proc.wait(5)
    if new_boot:
        (launcher.data_dir / BOOT_ID_FILE).write_text(OTHER_BOOT + "\n")
    return journal_seq(launcher.data_dir)


def recovered_events(client: Any, seq: int) -> dict[str, list[tuple[str, str | None]]]:
    """Per instance, (state, reason) of each instance_state event after `seq`."""
    found: dict[str, list[tuple[str, str | None]]] = {}
    for event in all_events(client):
        if event["seq"] > seq and event["type"] == "instance_state":
            found.setdefault(event["instance_uuid"], []).append((event["state"], event.get("reason")))
    return found


def settled_events(client: Any, seq: int, expected: dict[str, str]) -> dict[str, list[tuple[str, str | None]]]:
    """recovered_events once each instance's last event is its expected state; else {}."""
    found = recovered_events(client, seq)
    settled = all(found.get(uuid, [("", None)])[-1][0] == state for uuid, state in expected.items())
    return found if settled else {}


def this_boot() -> str:
    return KERNEL_BOOT_ID.read_text().strip()


def four_instances(launcher: LauncherProcess) -> Any:
    """b1: running; b2: running, START with restart: true; b3: STOPped; b4: its VM crashed. The client."""
    client = launcher.client()
    client.request("POST", "/v1/instances", start_yaml("b1-0001"), YAML, wait=True)
    client.request("POST", "/v1/instances", start_with_restart_flag("b2-0001"), YAML, wait=True)
    client.request("POST", "/v1/instances", start_yaml("b3-0001"), YAML, wait=True)
    client.request("POST", "/v1/instances", start_yaml("b4-0001"), YAML, wait=True)
    client.request("POST", "/v1/instances/b3-0001/stop", wait=True)
    pid = int((launcher.data_dir / "instances" / "b4-0001" / "vm.pid").read_text())
    [victim] = [p for p in simvm_processes(launcher.data_dir) if p.pid == pid]
    victim.kill()
    assert wait_until(lambda: states(client)["b4-0001"] == "exited", timeout=10)
    # The crash is recorded (goal exited) just after it is reported; the host goes down after that.
    record = launcher.data_dir / "instances" / "b4-0001" / "instance.json"
    assert wait_until(lambda: InstanceRecord.from_json(record.read_bytes()).goal == "exited", timeout=10)
    assert (launcher.data_dir / BOOT_ID_FILE).read_text().strip() == this_boot()
    return client


@pytest.mark.parametrize("policy, restarted", [
    ("always", {"b1-0001", "b2-0001"}),
    ("requested", {"b2-0001"}),
    ("never", set()),
])
def test_host_reboot_policy(launcher_factory: Any, policy: str, restarted: set[str]) -> None:
    launcher = launcher_factory({"simulation": PROCESS, "recovery": {"restart_running": policy}})
    four_instances(launcher)
    seq = host_reboot(launcher)

    client = launcher.start()
    expected = {uuid: "running" if uuid in restarted else "exited"
                for uuid in ("b1-0001", "b2-0001", "b3-0001", "b4-0001")}
    assert wait_until(lambda: states(client) == expected, timeout=30), states(client)
    assert len(simvm_processes(launcher.data_dir)) == len(restarted)
    events = wait_until(lambda: settled_events(client, seq, expected))
    for uuid in ("b1-0001", "b2-0001"):
        if uuid in restarted:
            assert events[uuid] == [("pending", "host_restart"), ("running", None)]
        else:
            assert events[uuid] == [("exited", "host_restart")]
    # Stopped by a command, or crashed: not running when the host went down, so never restarted.
    assert events["b3-0001"] == [("exited", None)]
    assert events["b4-0001"] == [("exited", None)]
    assert all(e.get("recovered") for e in all_events(client)
               if e["seq"] > seq and e["type"] == "instance_state" and e["state"] != "running")
    # Recovery has settled: the data dir now remembers this boot, so a second launcher restart is no reboot.
    assert wait_until(lambda: (launcher.data_dir / BOOT_ID_FILE).read_text().strip() == this_boot(), timeout=10)


def test_vms_gone_without_a_reboot_are_crashes_not_restarted(launcher_factory: Any) -> None:
    """Same boot id: the VMs died while the launcher was down, which is a crash (`vm_exited`), whatever the policy."""
    launcher = launcher_factory({"simulation": PROCESS, "recovery": {"restart_running": "always"}})
    client = launcher.client()
    client.request("POST", "/v1/instances", start_with_restart_flag("b5-0001"), YAML, wait=True)
    seq = host_reboot(launcher, new_boot=False)

    client = launcher.start()
    assert wait_until(lambda: states(client) == {"b5-0001": "exited"}, timeout=20)
    assert wait_until(lambda: recovered_events(client, seq).get("b5-0001")) == [("exited", "vm_exited")]
    assert not simvm_processes(launcher.data_dir)


def test_host_restarts_are_bounded_by_max_parallel(launcher_factory: Any) -> None:
    launcher = launcher_factory({"simulation": PROCESS, "recovery": {"restart_running": "always", "max_parallel": 1}})
    client = launcher.client()
    uuids = [f"b6-{n:04}" for n in range(4)]
    for uuid in uuids:
        client.request("POST", "/v1/instances", start_yaml(uuid), YAML, wait=True)
    seq = host_reboot(launcher)

    client = launcher.start()
    assert wait_until(lambda: states(client) == dict.fromkeys(uuids, "running"), timeout=30)
    events = [e for e in all_events(client) if e["seq"] > seq and e["type"] == "instance_state"]
    # One boot at a time: each restart's `pending` (its boot begins) comes after the previous one's `running`.
    booting: set[str] = set()
    for event in events:
        if event["state"] == "pending":
            assert event["reason"] == "host_restart"
            assert not booting, f"{event['instance_uuid']} began booting while {booting} still booted"
            booting.add(event["instance_uuid"])
        else:
            assert event["state"] == "running"
            booting.discard(event["instance_uuid"])
    assert sorted(e["instance_uuid"] for e in events if e["state"] == "running") == uuids


def test_launcher_killed_during_host_restarts_carries_on(launcher_factory: Any) -> None:
    """The boot id is recorded only once recovery has settled: a launcher killed before that (here one VM's
    start hangs) still knows, when it starts again, that the host rebooted, and restarts what is left."""
    launcher = launcher_factory({"simulation": PROCESS})
    client = launcher.client()
    for uuid in ("bad0-0001", "b7-0001"):
        client.request("POST", "/v1/instances", start_yaml(uuid), YAML, wait=True)
    host_reboot(launcher)
    set_settings(launcher, {"simulation": {**PROCESS, "failures": [{"phase": "start", "match": "^bad",
                                                                     "action": "hang"}]}})
    client = launcher.start()
    assert wait_until(lambda: states(client) == {"bad0-0001": "pending", "b7-0001": "running"}, timeout=20)
    assert (launcher.data_dir / BOOT_ID_FILE).read_text().strip() == OTHER_BOOT  # not settled: not recorded

    launcher.kill(signal.SIGKILL)
    set_settings(launcher, {"simulation": PROCESS})
    client = launcher.start()
    assert wait_until(lambda: states(client) == {"bad0-0001": "running", "b7-0001": "running"}, timeout=20)
    assert wait_until(lambda: (launcher.data_dir / BOOT_ID_FILE).read_text().strip() == this_boot(), timeout=10)


def test_boot_id_is_recorded_at_first_start(launcher: LauncherProcess) -> None:
    assert wait_until(lambda: (launcher.data_dir / BOOT_ID_FILE).exists(), timeout=10)
    assert (launcher.data_dir / BOOT_ID_FILE).read_text().strip() == this_boot()
