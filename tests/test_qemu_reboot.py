"""A host reboot with the qemu virtualizer, simulated: the launcher is killed, libvirt destroys every domain (as a
host going down leaves them: defined, shut off), the data dir's boot id is another boot's, and the launcher starts
again. The recovery policy is the launcher's, not libvirt's: no domain is marked autostart."""

from __future__ import annotations

import signal
from typing import Any

from test_qemu import domain_of, events, new_uuid, payload_for, start, state, wait_for, wait_guest_ready

from launcher.core.bootid import BOOT_ID_FILE


def test_qemu_host_reboot_restarts_the_running_instance_only(qemu_factory: Any) -> None:
    launcher = qemu_factory(recovery={"restart_running": "always"})
    client = launcher.client()
    running, stopped = new_uuid(), new_uuid()
    for uuid in (running, stopped):
        assert start(client, payload_for("start_legacy.yaml", uuid), wait=True)["state"] == "running"
    assert client.request("POST", f"/v1/instances/{stopped}/stop", grace=0, wait=True)["state"] == "exited"
    wait_guest_ready(launcher, running)

    launcher.kill(signal.SIGKILL)
    for uuid in (running, stopped):
        dom = domain_of(uuid)
        assert dom is not None and dom.autostart() == 0  # libvirt would not bring it back by itself
        if dom.isActive():
            dom.destroy()
    (launcher.data_dir / BOOT_ID_FILE).write_text("00000000-0000-4000-8000-000000000000\n")

    client = launcher.start(timeout=60)
    wait_for("the running instance restarted", lambda: state(client, running) == "running", timeout=120)
    assert wait_guest_ready(launcher, running, boots=2)["boots"] == "2"  # the same disk, booted again
    assert state(client, stopped) == "exited"
    assert not domain_of(stopped).isActive()  # type: ignore[union-attr]
    assert [e.get("reason") for e in events(client, type="instance_state", instance_uuid=running)
            if e.get("recovered")] == ["host_restart"]
    assert [(e["state"], e.get("reason")) for e in events(client, type="instance_state", instance_uuid=stopped)
            if e.get("recovered")] == [("exited", None)]
