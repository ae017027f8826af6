"""An instance's side of a prepared slot (slots.py): `claim` makes a taken slot its domain, `converge` brings a
claimed domain back to the cold layout at its next cold start, `release` removes it with the instance.

`claim`, in start_vm, the instance's seed already in its dir:

1. bind, durably, before any libvirt call: the instance dir's ``slot`` file names the slot, ``console.log`` there
   becomes a symlink to the slot's, and `QemuSlots.bound` maps the instance to it;
2. instance metadata on the live domain (setMetadata), the seed into its empty cdrom (updateDeviceFlags), the NIC
   with the payload's MAC (attachDeviceFlags; none for ``network.kind: none``): step ``claim``;
3. resume, once QMP says the domain is still in prelaunch: step ``resume``; from here the domain is the instance's;
4. defined from its own XML (step ``persist``), so that it powers off into "shut off" and stays defined.

Any failure before the resume (or a cancellation) undoes the binding and discards the slot (never back to a
pool); a failure raises `ClaimFailed`, and the caller starts the instance cold. A failure to define is only logged:
the domain runs as the instance's, and the next open makes it persistent (slots.py) or, should it die meanwhile,
`converge` takes its files.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import libvirt
import trio

from launcher.plugin import files
from launcher.plugin.spec import InstanceSpec
from virtualizers.qemu import domain, domain_calls, slot_calls
from virtualizers.qemu.hypervisor import Unavailable, error_text
from virtualizers.qemu.instance_files import CONSOLE_LOG, NVRAM, OVERLAY, SEED
from virtualizers.qemu.slots import SLOT_FILE, QemuSlots

T = TypeVar("T")
StepDone = Callable[[str, float, str], None]  # (step, monotonic start, what): a "step ..." line and an observation
MOVED_FILES = (OVERLAY, NVRAM, CONSOLE_LOG)  # what converge moves from the slot dir into the instance dir


class ClaimFailed(Exception):
    """The slot could not be made the instance's before its first instruction; nothing of the instance is in it."""


async def claim(slots: QemuSlots, slot_id: str, spec: InstanceSpec, instance_dir: Path, step: StepDone) -> None:
    """Make the taken slot `slot_id` the domain of `spec`'s instance and let it run (module doc); ClaimFailed."""
    name, hypervisor = domain.slot_domain_name(slot_id), slots.hypervisor
    try:
        await _claim(slots, slot_id, name, spec, instance_dir, step)
        started = time.monotonic()
        try:
            await hypervisor.call(partial(domain_calls.make_persistent, name=name))
        except (Unavailable, libvirt.libvirtError) as exc:
            slots.host.log(instance_dir, f"domain {name} runs but could not be defined (the next launcher start "
                                         f"does): {error_text(exc)}")
            return
        step("persist", started, f"domain {name} defined")
    finally:
        slots.settled(slot_id)  # the refill may start its next QEMU


async def _claim(slots: QemuSlots, slot_id: str, name: str, spec: InstanceSpec, instance_dir: Path,
                 step: StepDone) -> None:
    """Steps 1 to 3 of `claim`."""
    hypervisor, network = slots.hypervisor, slots.settings.network
    started = time.monotonic()
    parts: list[str] = []  # each part's time, for the claim's step line
    try:
        await _timed(parts, "bind", _run(slots, _bind, instance_dir, slot_id, slots.slot_dir(slot_id)))
        slots.bound[spec.instance_uuid] = slot_id
        await _timed(parts, "metadata", hypervisor.call(partial(
            slot_calls.set_instance_metadata, name=name, instance_uuid=spec.instance_uuid,
            data_dir=slots.host.data_dir)))
        await _timed(parts, "seed", hypervisor.call(partial(slot_calls.insert_seed, name=name,
                                                            seed=instance_dir / SEED)))
        if network.kind != "none":
            await _timed(parts, f"NIC {spec.networking.vnic_mac}", hypervisor.call(partial(
                domain_calls.plug_nic, name=name, kind=network.kind, source=network.source,
                mac=spec.networking.vnic_mac)))
        step("claim", started, f"slot {slot_id} ({name}) is the instance's domain ({', '.join(parts)})")
        started = time.monotonic()
        await hypervisor.call(partial(slot_calls.resume_if_prelaunch, name=name))
    except BaseException as exc:  # cancelled too: a slot that may have seen an identity never stays
        slots.bound.pop(spec.instance_uuid, None)
        with trio.CancelScope(shield=True):
            await _run(slots, _unbind, instance_dir)
            await slots.discard_slot(slot_id)
        if isinstance(exc, (OSError, Unavailable, libvirt.libvirtError)):
            raise ClaimFailed(f"slot {slot_id}: {error_text(exc)}") from exc
        raise
    step("resume", started, f"domain {name} resumed")


async def converge(slots: QemuSlots, instance_uuid: str, instance_dir: Path) -> bool:
    """Before a cold start: if the instance's domain is a claimed slot that is down (or gone), undefine it keeping
    its NVRAM, move its files into the instance dir and forget the slot, so that the cold define finds the
    normal layout. True if the claimed domain runs (the start adopts it). OSError, Unavailable, libvirtError."""
    slot_id = await _run(slots, _slot_file_id, instance_dir)
    if slot_id is None:
        return False
    name = domain.slot_domain_name(slot_id)
    active = await _is_active(slots, name)
    if active and slots.bound.get(instance_uuid) == slot_id:
        return True
    if not active:  # else a stale slot file: a claim cut short before the slot was touched; the slot is a pool's
        if active is not None:
            await slots.hypervisor.call(partial(domain_calls.remove_domain, name=name, keep_nvram=True))
        await _run(slots, _move_files, slots.slot_dir(slot_id), instance_dir)
    slots.bound.pop(instance_uuid, None)
    await _run(slots, _unbind, instance_dir)
    slots.host.log(instance_dir, f"domain {name} (a claimed slot) undefined; its files moved into the instance dir"
                   if not active else f"stale slot file for {name} removed")
    return False


async def release(slots: QemuSlots, instance_uuid: str, instance_dir: Path) -> str | None:
    """Remove the instance's claimed domain and its slot dir (DELETE); the domain's name, or None if its domain is
    no claimed slot. Unavailable or libvirtError if the domain cannot be removed."""
    slot_id = slots.bound.get(instance_uuid) or await _run(slots, _slot_file_id, instance_dir)
    if slot_id is None:
        return None
    name = domain.slot_domain_name(slot_id)
    if slots.bound.get(instance_uuid) != slot_id and await _is_active(slots, name):
        return None  # a stale slot file: that slot is a pool's
    await slots.hypervisor.call(partial(domain_calls.remove_domain, name=name))
    await _run(slots, shutil.rmtree, slots.slot_dir(slot_id), True)
    slots.bound.pop(instance_uuid, None)
    return name


async def forget_stale(slots: QemuSlots, instance_uuid: str, instance_dir: Path) -> None:
    """A cold create_image: an instance dir whose ``slot`` file is left from a claim cut short (its domain is not
    the instance's) forgets it."""
    if instance_uuid not in slots.bound:
        await _run(slots, _unbind, instance_dir)


async def _timed(parts: list[str], what: str, call: Awaitable[object]) -> None:
    """Await `call`; "<what> <ms> ms" appended to `parts`."""
    started = time.monotonic()
    await call
    parts.append(f"{what} {round((time.monotonic() - started) * 1000)} ms")


async def _is_active(slots: QemuSlots, name: str) -> bool | None:
    active: bool | None = await slots.hypervisor.call(partial(slot_calls.is_active, name=name))
    return active


async def _run(slots: QemuSlots, fn: Callable[..., T], *args: object) -> T:
    return await trio.to_thread.run_sync(fn, *args, limiter=slots.host.limiter)


def _bind(instance_dir: Path, slot_id: str, slot_dir: Path) -> None:
    files.atomic_write(instance_dir / SLOT_FILE, slot_id.encode())
    console = instance_dir / CONSOLE_LOG
    console.unlink(missing_ok=True)
    console.symlink_to(slot_dir / CONSOLE_LOG)
    files.fsync_dir(instance_dir)


def _unbind(instance_dir: Path) -> None:
    for name in (SLOT_FILE, CONSOLE_LOG):
        path = instance_dir / name
        if name == SLOT_FILE or path.is_symlink():
            path.unlink(missing_ok=True)
    files.fsync_dir(instance_dir)


def _slot_file_id(instance_dir: Path) -> str | None:
    try:
        return (instance_dir / SLOT_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def _move_files(slot_dir: Path, instance_dir: Path) -> None:
    for name in MOVED_FILES:
        if (slot_dir / name).exists():
            os.replace(slot_dir / name, instance_dir / name)
    files.fsync_dir(instance_dir)
    shutil.rmtree(slot_dir, ignore_errors=True)
