"""The base of one instance's VM on libvirt (`vm_base.VmBase`, which `virtualizer.QemuVirtualizer` extends): what
an instance reads of its backend (`QemuParts`), its fields, the helpers its calls share (its domain's name, step
lines, failures) and the volume calls: ``attach_volume`` / ``detach_volume`` (virtualizer.py's module doc says how
each does it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import attrs
import libvirt
import trio

from launcher.plugin.errors import (
    ATTACH_FAILURE,
    DETACH_FAILURE,
    LAUNCH_FAILURE,
    NOT_FOUND,
    LauncherError,
    VirtualizerError,
)
from launcher.plugin.host import BackendHost
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.usage import CpuMeter
from launcher.plugin.volumes import PlannedDisk
from launcher.plugin.warm import WarmPools
from virtualizers.qemu import domain, domain_calls, preflight
from virtualizers.qemu.clones import Templates
from virtualizers.qemu.hypervisor import Hypervisor, Unavailable, error_text
from virtualizers.qemu.images import ImageInfo, ImageStore
from virtualizers.qemu.settings import QemuSettings
from virtualizers.qemu.slots import QemuSlots
from virtualizers.qemu.templates import Template
from virtualizers.qemu.volumes import VolumeStore

UNPLUG_POLL_S = 0.02  # how often a hot-unplug reads the live XML for the disk (one small libvirt call)


class QemuParts(Protocol):
    """What a QEMU instance reads of its backend (`backend.QemuBackend` is one): the shared libvirt connection,
    the stores, the settings and what the preflight found."""

    settings: QemuSettings
    host: BackendHost
    hypervisor: Hypervisor
    images: ImageStore
    kvm: bool
    volumes: VolumeStore | None  # None until the preflight has set the store up
    qemu_user: preflight.QemuUser | None
    slots: QemuSlots  # prepared slots, and which instances' domains are claimed ones
    warm: WarmPools  # the pools of `slots` (configured or not)
    templates: Templates  # booted templates and which instances' domains are their clones

    def domain_params(self, spec: InstanceSpec, instance_dir: Path) -> domain.DomainParams:
        """What the instance's domain XML is made from."""

@attrs.define(eq=False)
class VmBase:
    """What a `QemuVirtualizer` is made of: its fields, the helpers its calls share, and the volume calls
    (hot-plug). Not used alone."""

    _backend: QemuParts
    _spec: InstanceSpec = attrs.field(init=False)
    _dir: Path = attrs.field(init=False)
    _volumes: Callable[[], Sequence[str]] = attrs.field(init=False)  # the instance's, in disk order (init)
    _image: ImageInfo | None = attrs.field(default=None, init=False)
    _pid: int | None = attrs.field(default=None, init=False)  # QEMU's, found by stats()
    _cpu: CpuMeter = attrs.field(factory=CpuMeter, init=False)
    _paused_reported: bool = attrs.field(default=False, init=False)
    _taken: str | None = attrs.field(default=None, init=False)  # the slot taken in create_image, until start_vm
    _template: Template | None = attrs.field(default=None, init=False)  # the template cloned by create_image
    _seed_instance_id: str = attrs.field(default="", init=False)  # the instance-id in the seed create_image wrote

    @property
    def _name(self) -> str:
        return self._backend.slots.domain_name(self._spec.instance_uuid)

    @property
    def _uuid(self) -> str:
        return self._spec.instance_uuid

    def init(self, spec: InstanceSpec, instance_dir: Path, volumes: Callable[[], Sequence[str]]) -> None:
        self._spec = spec
        self._dir = instance_dir
        self._volumes = volumes

    def _step_done(self, step: str, started: float, what: str, note: str = "") -> None:
        """A part of a START went through: a "step <step>: <what> in <ms> ms<note>" line in the instance's log
        (bench/start_latency.py reads them) and an observation for /metrics."""
        seconds = time.monotonic() - started
        self._log(f"step {step}: {what} in {round(seconds * 1000)} ms{note}")
        self._backend.host.observe_step(step, seconds)

    def _log(self, message: str) -> None:
        self._backend.host.log(self._dir, message)

    def _fail(self, code: str, reason: str) -> VirtualizerError:
        return VirtualizerError(code, reason, self._uuid)

    # -- volumes -------------------------------------------------------------------------------------------

    def _volume_store(self, code: str) -> VolumeStore:
        if self._backend.volumes is None:
            raise self._fail(code, "this launcher's volume store is not open (qemu.volumes)")
        return self._backend.volumes

    async def _volume_disks(self, plan: tuple[PlannedDisk, ...]) -> tuple[domain.VolumeDisk, ...]:
        """The volumes of `disk_plan` as disks, in its order and with its boot orders; launch_failure if one is
        gone (it was there at the START or ATTACH) or the store cannot answer."""
        return tuple([await self._volume_disk(disk.volume_id, LAUNCH_FAILURE, disk.boot_order)
                      for disk in plan if not disk.is_overlay])

    async def _volume_disk(self, volume_id: str, code: str, boot_order: int | None = None) -> domain.VolumeDisk:
        """The volume as a `<disk type='file'>`: its path and format from the store; VirtualizerError `code` (with
        the store's reason) if the store cannot give them."""
        try:
            volume = await self._volume_store(code).get(volume_id)
        except LauncherError as exc:
            raise self._fail(code, f"volume {volume_id}: {exc.reason}") from exc
        return domain.VolumeDisk(Path(volume.path), volume.format, volume_id, boot_order)

    async def attach_volume(self, volume_id: str) -> None:
        store = self._volume_store(ATTACH_FAILURE)
        try:
            volume = await store.get(volume_id)
        except LauncherError as exc:  # no such volume is the caller's mistake (not_found), not the VM's
            code = NOT_FOUND if exc.code == NOT_FOUND else ATTACH_FAILURE
            raise self._fail(code, f"volume {volume_id}: {exc.reason}") from exc
        disk = domain.VolumeDisk(Path(volume.path), volume.format, volume_id)
        started = time.monotonic()
        try:
            attached = await self._backend.hypervisor.call(partial(domain_calls.hot_plug, name=self._name, disk=disk))
        except (Unavailable, libvirt.libvirtError) as exc:
            raise self._fail(ATTACH_FAILURE, f"cannot hot-plug volume {volume_id}: {error_text(exc)}") from exc
        if attached:
            self._log(f"volume {volume_id} hot-plugged as {attached} in {_since_ms(started)} ms")
        else:
            self._log(f"volume {volume_id} attached: a disk from the next start (the VM does not run)")

    async def detach_volume(self, volume_id: str) -> None:
        started = time.monotonic()
        timeout = self._backend.settings.volumes.detach_timeout_s
        hypervisor = self._backend.hypervisor
        try:
            requested = await hypervisor.call(partial(domain_calls.request_unplug, name=self._name,
                                                      volume_id=volume_id))
            with trio.move_on_after(timeout) as waited:
                while requested and await hypervisor.call(partial(domain_calls.has_disk, name=self._name,
                                                                  volume_id=volume_id)):
                    await trio.sleep(UNPLUG_POLL_S)
        except (Unavailable, libvirt.libvirtError) as exc:
            raise self._fail(DETACH_FAILURE, f"cannot hot-unplug volume {volume_id}: {error_text(exc)}") from exc
        if waited.cancelled_caught:
            raise self._fail(DETACH_FAILURE, f"the guest did not let go of volume {volume_id} within {timeout:g} s; "
                                             "it stays attached (the unplug request stays pending in QEMU)")
        if requested:
            self._log(f"volume {volume_id} hot-unplugged in {_since_ms(started)} ms")
        else:
            self._log(f"volume {volume_id} detached: gone from the next start (the VM does not run)")


def _since_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
