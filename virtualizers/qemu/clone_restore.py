"""A clone of a booted template, restored (templates.py keeps the templates; clones.py decides when): its save file
of its own streamed through a pipe (save_image.py) and restored running; the wait for the guest's new identity on
its console log; then its NIC hot-plugged with the payload's MAC and the domain made persistent.

The guest learns that it is a clone from its VM generation ID, which libvirt changes on every restore (a kernel
>= 6.10 sends the NEW_VMGENID uevent; the test guest watches the ACPI event). For a guest that does not, the line
`reidentify` is typed on the serial console at once, and again after each KICK_AGAIN_S of silence; typed input
reaches the guest only once QEMU sees the console opened, which it checks once a second (its pty chardev), so that
path is up to a second slower. The NIC goes in only after the guest has its new identity: until then it is the
template's (hostname, instance-id), which it must not take onto the network (libvirt's dnsmasq, for one, puts
the hostname a DHCP client sends into DNS).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path

import attrs
import libvirt
import trio

from virtualizers.qemu import domain_calls, qemu_img, save_image
from virtualizers.qemu.hypervisor import Hypervisor
from virtualizers.qemu.templates import NVRAM, Template, TemplateBuildError, fields, wait_for_line

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0  # a clone's kick to its new guest-identity line
KICK = b"reidentify\r"  # "\r": the console's line discipline ends the line; "\n" plus an at-once finish lost it
KICK_AGAIN_S = 5.0  # type the kick again if the guest said nothing for this long


@attrs.frozen
class CloneResult:
    """What `restore_clone` did: the seconds from its start to the end of each step (restore, kick, nic, define)
    and to the guest's new guest-ready and guest-identity lines (ready, identity), and those two lines."""

    timings: dict[str, float]
    ready_line: str
    identity_line: str


async def make_clone_overlay(template: Template, overlay: Path) -> None:
    """`overlay`: a qcow2 child of the template's disk, of its size (made under a temp name, then renamed)."""
    tmp = overlay.with_name(overlay.name + ".tmp")
    await qemu_img.create_overlay(tmp, template.disk, "qcow2", template.disk_size)
    os.replace(tmp, overlay)


async def restore_clone(hypervisor: Hypervisor, template: Template, clone: save_image.CloneIdentity, *,
                        instance_id: str, mac: str, network_kind: str, network_source: str,
                        ready_timeout_s: float = READY_TIMEOUT_S) -> CloneResult:
    """Restore a clone of `template` as `clone` (its overlay on the template's disk and its seed already made, its
    console log absent), wait until its console says ``guest-identity instance-id=<instance_id> ... reidentified=N``
    (N >= 1; kicking it meanwhile), bounded by `ready_timeout_s` (TemplateBuildError), then hot-plug its NIC with
    `mac` (none if `network_kind` is "none") and define it (persistent). On any failure the clone's domain is
    removed."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    xml = save_image.clone_xml(template.header.xml, clone)
    if clone.nvram is not None and template.record["inputs"]["fw_type"] == "efi":
        await trio.to_thread.run_sync(shutil.copyfile, template.path / NVRAM, clone.nvram)
    fifo = clone.overlay.parent / "restore.fifo"
    try:
        async with save_image.clone_pipe(template.state, fifo, xml) as pipe:
            await hypervisor.call(partial(save_image.restore_running, path=fifo))
            with trio.move_on_after(5):
                await pipe.done.wait()
        timings["restore"] = time.monotonic() - started
        stream = await hypervisor.call(partial(_open_console, name=clone.name))
        try:
            await hypervisor.call(lambda c: stream.send(KICK))
            timings["kick"] = time.monotonic() - started
            ready, ready_at, identity, identity_at = await _await_identity(hypervisor, stream, clone, instance_id,
                                                                           ready_timeout_s)
        finally:
            with trio.CancelScope(shield=True):
                await hypervisor.call(lambda c: _finish_quietly(stream))
        timings["ready"], timings["identity"] = ready_at - started, identity_at - started
        await _plug_nic_and_define(hypervisor, clone.name, mac, network_kind, network_source, timings, started)
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await hypervisor.call(partial(domain_calls.remove_domain, name=clone.name))
            except Exception as exc:  # noqa: BLE001 - the first failure is the one to report
                log.warning("cannot remove the failed clone %s: %s", clone.name, exc)
        raise
    return CloneResult(timings, ready, identity)


async def _plug_nic_and_define(hypervisor: Hypervisor, name: str, mac: str, network_kind: str, network_source: str,
                               timings: dict[str, float], started: float) -> None:
    """Hot-plug the clone's NIC (none if `network_kind` is "none"), then make the domain persistent."""
    if network_kind != "none":
        await hypervisor.call(partial(domain_calls.plug_nic, name=name, kind=network_kind, source=network_source,
                                      mac=mac))
    timings["nic"] = time.monotonic() - started
    await hypervisor.call(partial(domain_calls.make_persistent, name=name))
    timings["define"] = time.monotonic() - started


async def _await_identity(hypervisor: Hypervisor, stream: libvirt.virStream, clone: save_image.CloneIdentity,
                          instance_id: str, timeout_s: float) -> tuple[str, float, str, float]:
    """Wait until the guest's new identity is on its console log, the console `stream` (on which KICK was typed)
    kept open meanwhile (finishing it at once can lose the input); KICK typed again every KICK_AGAIN_S of silence.
    Returns the new guest-ready line, when it was seen, the guest-identity line and when it was seen;
    TemplateBuildError after `timeout_s`."""
    with trio.move_on_after(timeout_s):
        while True:
            with trio.move_on_after(KICK_AGAIN_S):
                ready, ready_at = await wait_for_line(clone.console_log, lambda line: line.startswith(
                    "guest-ready ") and fields(line).get("instance-id") == instance_id, timeout_s)
                identity, identity_at = await wait_for_line(
                    clone.console_log, lambda line: _reidentified(line, instance_id), timeout_s)
                return ready, ready_at, identity, identity_at
            await hypervisor.call(lambda c: stream.send(KICK))
    raise TemplateBuildError(f"{clone.name} did not take its identity within {timeout_s:g} s")


def _reidentified(line: str, instance_id: str) -> bool:
    found = fields(line)
    return (line.startswith("guest-identity ") and found.get("instance-id") == instance_id
            and found.get("reidentified", "0").isdigit() and int(found["reidentified"]) >= 1)


def _open_console(conn: libvirt.virConnect, name: str) -> libvirt.virStream:
    stream = conn.newStream(0)
    conn.lookupByName(name).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    return stream


def _finish_quietly(stream: libvirt.virStream) -> None:
    try:
        stream.finish()
    except libvirt.libvirtError:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
