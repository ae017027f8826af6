"""One instance's VM on libvirt: `QemuVirtualizer`, the QEMU backend's `launcher.plugin.protocol.Virtualizer`.

The protocol's docstrings are the contract of each call; this says only how QEMU keeps it. The instance's files
are those of `instance_files`; every libvirt call is a bounded `Hypervisor.call` of a `domain_calls` function.

``ensure_backing_image``
    the image store's `ensure` (images.py): ``<data_dir>/images/<image_uuid>.img``, imported once from
    ``qemu.image_dirs`` or ``qemu.image_url`` if the store lacks it.
``create_image``
    the instance dir's name made durable (`instance_files.make_dir_durable`); local volumes through the volume
    store, swap ones formatted with mkswap (`VolumeStore.format_swap`); the overlay
    (`instance_files.make_overlay`), as large as the payload's disk size, or the image's if that is larger, unless
    the START takes the prepared slot the supervisor reserved for it (`WarmPools.take`: the slot has one); the
    seed (`cloudinit`: NoCloud or ConfigDrive, per ``qemu.seed_format``), its meta-data carrying the tagged
    volumes (`devices_metadata`).
``start_vm``
    claims the taken slot (claim.py: seed, NIC, resume; cold if that fails). Else defines the persistent domain
    (`domain`) with its disks in `disk_plan`'s order and boot orders, then starts it; a domain that already runs
    is adopted. A claimed slot's domain keeps its slot's name (`QemuSlots.domain_name`) until a cold start moves
    its files into the instance dir (`claim.converge`).
``monitor_vm``
    libvirt's lifecycle events (`hypervisor.DomainWatch`): the domain's state is re-read after each event and every
    ``qemu.state_poll_s`` as a backstop. A guest paused by an I/O error (a full disk) is reported with an
    ``instance_paused`` event and a log line, and left paused for the operator.
``stop_vm``
    the ACPI power button, then ``destroy`` once `grace` seconds have passed.
``delete_image``
    destroys the domain if it still runs and undefines it with its NVRAM (`domain_calls.remove_domain`).
``attach_volume`` / ``detach_volume``
    the volume as one more virtio disk (its serial the volume id): ``attachDeviceFlags``, live only (the domain
    is defined again at every start with the instance's volumes); ``detachDeviceAlias`` (which only sends the
    request), then the live XML is read every `UNPLUG_POLL_S` until the disk is gone, bounded by
    ``qemu.volumes.detach_timeout_s``. On a q35 machine each hot-plug takes one of ``qemu.hotplug_slots`` spare
    PCIe root ports.
``stats``
    PSS of the QEMU process (found through libvirtd's pidfile), CPU time from libvirt over the allotted vCPUs,
    MiB allocated to the overlay (0 for an instance that boots from a volume, as in ciao: the volume's figures
    are in /v1/volumes).

Parts of a START (image, overlay, seed, define, start) are ``step <name>: ... in <ms> ms`` lines in the
instance's log (bench/start_latency.py reads them) and observations for /metrics (`BackendHost.observe_step`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import attrs
import libvirt
import psutil
import trio

from launcher.plugin.errors import (
    ATTACH_FAILURE,
    DETACH_FAILURE,
    IMAGE_FAILURE,
    LAUNCH_FAILURE,
    NOT_FOUND,
    STOP_FAILURE,
    LauncherError,
    VirtualizerError,
)
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import MonitorEvent, MonitorInbox, VmStats
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.tools import ToolError
from launcher.plugin.usage import CpuMeter
from launcher.plugin.volumes import (
    PlannedDisk,
    boot_volume,
    check_storage,
    devices_metadata,
    disk_plan,
    make_local_volumes,
    remove_ephemeral_volumes,
)
from launcher.plugin.warm import WarmPools
from virtualizers.qemu import claim, cloudinit, domain, domain_calls, instance_files, preflight
from virtualizers.qemu.domain_calls import ACTIVE_STATES
from virtualizers.qemu.hypervisor import Disconnected, Hypervisor, Unavailable, Unresponsive, error_text
from virtualizers.qemu.images import ImageInfo, ImageStore
from virtualizers.qemu.instance_files import OVERLAY, SEED
from virtualizers.qemu.settings import QemuSettings
from virtualizers.qemu.slots import QemuSlots
from virtualizers.qemu.volumes import VolumeStore


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

    def domain_params(self, spec: InstanceSpec, instance_dir: Path) -> domain.DomainParams:
        """What the instance's domain XML is made from."""

UNPLUG_POLL_S = 0.02  # how often a hot-unplug reads the live XML for the disk (one small libvirt call)
MIB = 1 << 20
QEMU_PID_DIR = Path("/run/libvirt/qemu")  # where the system libvirtd writes <domain>.pid


@attrs.define(eq=False)
class QemuVirtualizer:
    """One instance's VM (module doc). Called by its actor only, one call at a time (`Virtualizer`)."""

    _backend: QemuParts
    _spec: InstanceSpec = attrs.field(init=False)
    _dir: Path = attrs.field(init=False)
    _volumes: Callable[[], Sequence[str]] = attrs.field(init=False)  # the instance's, in disk order (init)
    _image: ImageInfo | None = attrs.field(default=None, init=False)
    _pid: int | None = attrs.field(default=None, init=False)  # QEMU's, found by stats()
    _cpu: CpuMeter = attrs.field(factory=CpuMeter, init=False)
    _paused_reported: bool = attrs.field(default=False, init=False)
    _taken: str | None = attrs.field(default=None, init=False)  # the slot taken in create_image, until start_vm

    @property
    def _name(self) -> str:
        return self._backend.slots.domain_name(self._spec.instance_uuid)

    @property
    def start_path(self) -> str:
        """"pool" while the instance's domain is a claimed slot (claim.py), else "cold"."""
        return "pool" if self._uuid in self._backend.slots.bound else "cold"

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

    # -- images --------------------------------------------------------------------------------------------

    async def ensure_backing_image(self) -> None:
        try:
            await check_storage(self._backend.volumes, self._spec)
        except LauncherError as exc:
            raise self._fail(IMAGE_FAILURE, exc.reason) from exc
        if not self._spec.image_uuid:
            if boot_volume(self._spec) is None:
                raise self._fail(IMAGE_FAILURE, "the START names neither an image_uuid nor a storage entry with "
                                                "boot: true: the VM would have nothing to boot from")
            return  # it boots from its volume
        started = time.monotonic()
        image = await self._backend.images.ensure(self._spec.image_uuid)  # ImageError is an image_failure
        self._image = image
        self._step_done("image", started, f"{image.id} ({image.format}, {image.virtual_size / MIB:.0f} MiB virtual) "
                                          "ready")

    async def create_image(self, user_data: str, meta_data: str, network_config: str | None) -> None:
        """The START's local volumes, the overlay (unless it boots from a volume), then the seed. `network_config`,
        when given, replaces NoCloud's derived one."""
        try:
            await trio.to_thread.run_sync(instance_files.make_dir_durable, self._dir,
                                          limiter=self._backend.host.limiter)
        except OSError as exc:
            raise self._fail(IMAGE_FAILURE, f"cannot make {self._dir} durable: {exc}") from exc
        if any(entry.local for entry in self._spec.storage):
            await self._make_local_volumes()
        self._taken = self._take_reserved()
        if self._taken is not None:
            self._log(f"slot {self._taken} taken: its overlay is the instance's disk")
        elif self._spec.image_uuid:
            await self._make_overlay()
        started = time.monotonic()
        fmt = self._backend.settings.seed_format
        devices = devices_metadata(disk_plan(self._spec, self._volumes()))
        try:
            seed = cloudinit.make_seed(fmt, self._uuid, user_data, meta_data, self._spec.networking,
                                       self._backend.settings.guest_network, devices)
            if network_config is not None and fmt == "nocloud":
                seed = attrs.evolve(seed, files={**seed.files, "network-config": network_config.encode()})
            await trio.to_thread.run_sync(cloudinit.write_seed, seed, self._dir / SEED,
                                          limiter=self._backend.host.limiter)
        except (cloudinit.SeedError, OSError) as exc:
            raise self._fail(IMAGE_FAILURE, f"cannot write {SEED}: {exc}") from exc
        self._step_done("seed", started, f"{SEED} ({fmt}, instance-id {seed.instance_id}, hostname {seed.hostname})")

    async def _make_local_volumes(self) -> None:
        """Make the START's local volumes and format its swap ones (image_failure naming the volume otherwise)."""
        store = self._volume_store(IMAGE_FAILURE)
        try:
            made = await make_local_volumes(store, self._spec)
        except LauncherError as exc:
            raise self._fail(IMAGE_FAILURE, f"cannot make a local volume: {exc.reason}") from exc
        if made:
            self._log(f"local volumes made: {', '.join(made)}")
        for entry in self._spec.storage:
            if entry.swap:
                try:
                    formatted = await store.format_swap(entry.id)
                except LauncherError as exc:
                    raise self._fail(IMAGE_FAILURE, f"swap volume {entry.id}: {exc.reason}") from exc
                self._log(f"swap volume {entry.id} {'formatted (mkswap)' if formatted else 'is swap space already'}")

    def _take_reserved(self) -> str | None:
        """The id of the slot the supervisor reserved for this instance, now its own (`WarmPools.take`); or None."""
        if (taken := self._backend.warm.take(self._uuid)) is not None:
            self._backend.slots.taken(taken[0])
        return None if taken is None else taken[0]

    async def _make_overlay(self) -> None:
        """The cold path's disk: overlay.qcow2 in the instance dir (a stale slot binding forgotten)."""
        await claim.forget_stale(self._backend.slots, self._uuid, self._dir)
        image = self._image or await self._backend.images.ensure(self._spec.image_uuid)
        started = time.monotonic()
        size = await self._create_overlay(image)
        self._step_done("overlay", started, f"{OVERLAY} ({size / MIB:.0f} MiB on {image.id})")

    async def _create_overlay(self, image: ImageInfo) -> int:
        """overlay.qcow2 on `image` (`instance_files.make_overlay`); its size."""
        size = image.virtual_size
        if self._spec.disk_mb:
            wanted = self._spec.disk_mb * MIB
            if wanted < size:
                self._log(f"disk_mb {self._spec.disk_mb} is smaller than image {image.id}; "
                          f"using the image's {size / MIB:.0f} MiB")
            size = max(size, wanted)
        try:
            await instance_files.make_overlay(self._dir, image, size, self._backend.host.limiter)
        except (ToolError, OSError) as exc:
            raise self._fail(IMAGE_FAILURE, f"cannot create {OVERLAY}: {exc}") from exc
        return size

    async def delete_image(self) -> None:
        """Destroy the domain if it still runs, and undefine it with its NVRAM (a claimed slot's with its slot dir;
        a slot taken but never claimed is discarded); the actor removes the dir."""
        try:
            taken = self._taken or self._take_reserved()
            if taken is not None:  # taken in create_image, or still reserved by a START that failed before it
                await self._backend.warm.discard(taken)
                self._log(f"slot {taken} discarded (never claimed)")
                self._taken = None
            released = await claim.release(self._backend.slots, self._uuid, self._dir)
            if released is not None:
                self._log(f"domain {released} (a claimed slot) undefined, its slot dir removed")
            removed = await self._backend.hypervisor.call(partial(domain_calls.remove_domain, name=self._name))
        except (Unavailable, libvirt.libvirtError, OSError) as exc:
            self._log(f"cannot undefine domain {self._name}: {error_text(exc)}")
            raise self._fail(STOP_FAILURE, f"cannot undefine domain {self._name}: {error_text(exc)}") from exc
        if removed:
            self._log(f"domain {self._name} undefined")
        if any(entry.ephemeral for entry in self._spec.storage):
            try:
                deleted = await remove_ephemeral_volumes(self._volume_store(STOP_FAILURE), self._spec,
                                                         self._volumes())
            except LauncherError as exc:
                raise self._fail(STOP_FAILURE, f"cannot delete an ephemeral volume: {exc.reason}") from exc
            if deleted:
                self._log(f"ephemeral volumes deleted: {', '.join(deleted)}")

    # -- lifecycle -----------------------------------------------------------------------------------------

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

    async def start_vm(self) -> None:
        user = self._backend.qemu_user
        if user is not None:
            try:
                await trio.to_thread.run_sync(instance_files.let_group_search, self._dir, user.gid,
                                              limiter=self._backend.host.limiter)
            except OSError as exc:
                raise self._fail(LAUNCH_FAILURE, f"cannot let QEMU ({user.name}) into {self._dir}: {exc}") from exc
        if self._taken is not None and await self._claim(self._taken):
            self._paused_reported = False
            return
        try:
            if await claim.converge(self._backend.slots, self._uuid, self._dir):
                self._log(f"domain {self._name} (a claimed slot) runs already: adopted")
                return
        except (Unavailable, libvirt.libvirtError, OSError) as exc:
            raise self._fail(LAUNCH_FAILURE, f"cannot move claimed slot {self._name}'s files: "
                                             f"{error_text(exc)}") from exc
        # The overlay or the boot volume first, then the instance's other volumes, those attached later too.
        plan = disk_plan(self._spec, self._volumes())
        overlay_order = plan[0].boot_order if plan and plan[0].is_overlay else None
        params = attrs.evolve(self._backend.domain_params(self._spec, self._dir),
                              volumes=await self._volume_disks(plan), overlay_boot_order=overlay_order)
        xml = domain.domain_xml(params)
        started = time.monotonic()
        try:
            dom = await self._backend.hypervisor.call(lambda conn: conn.defineXML(xml))
            self._step_done("define", started, f"domain {self._name}")
            started = time.monotonic()
            await self._backend.hypervisor.call(lambda conn: domain_calls.start_domain(dom))
        except Unavailable as exc:
            raise self._fail(LAUNCH_FAILURE, str(exc)) from exc
        except libvirt.libvirtError as exc:
            raise self._fail(LAUNCH_FAILURE, f"libvirt could not start {self._name}: {error_text(exc)}") from exc
        self._paused_reported = False
        self._step_done("start", started, f"domain {self._name} started", f" ({'kvm' if self._backend.kvm else 'tcg'})")

    async def _claim(self, slot_id: str) -> bool:
        """Claim the taken slot; False (the slot discarded, the overlay made for a cold start) if that fails."""
        self._taken = None
        try:
            await claim.claim(self._backend.slots, slot_id, self._spec, self._dir, self._step_done)
            return True
        except claim.ClaimFailed as exc:
            self._log(f"cannot claim {exc}; slot discarded, starting cold")
        await self._make_overlay()
        return False

    async def monitor_vm(self, inbox: MonitorInbox, recover: bool) -> None:
        hypervisor = self._backend.hypervisor
        poll_s = self._backend.settings.state_poll_s
        sent_connected = False
        with hypervisor.watch(self._name) as watch:
            while True:
                try:
                    state, reason = await self._state()
                except Disconnected:
                    await hypervisor.wait_connected()  # the VM does not stop because libvirtd did
                    continue
                except Unresponsive:
                    await watch.wait(poll_s)  # no answer is not "down": ask again
                    continue
                if state not in ACTIVE_STATES:
                    await inbox.send(MonitorEvent.CLOSED)
                    return
                if not sent_connected:
                    await inbox.send(MonitorEvent.CONNECTED)
                    sent_connected = True
                self._check_paused(state, reason)
                await watch.wait(poll_s)

    def _check_paused(self, state: int, reason: int) -> None:
        """Report a guest that QEMU paused on an I/O error (e.g. ENOSPC), once per pause."""
        paused = state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
        if paused and not self._paused_reported:
            detail = "QEMU paused the guest after a disk I/O error (is the data dir's file system full?)"
            self._log(f"VM paused: {detail}")
            self._backend.host.emit("instance_paused", instance_uuid=self._uuid, reason="io_error", detail=detail)
        self._paused_reported = paused

    async def _state(self) -> tuple[int, int]:
        """(libvirt state, reason); VIR_DOMAIN_SHUTOFF if the domain does not exist. Unavailable passes."""
        return await self._backend.hypervisor.call(partial(domain_calls.domain_state, name=self._name))

    async def stop_vm(self, grace: float) -> None:
        """ACPI power button; after `grace` seconds (at once if 0) destroy. Returns once the domain is off."""
        hypervisor = self._backend.hypervisor
        with hypervisor.watch(self._name) as watch:
            try:
                if await self._is_active() and grace > 0:
                    await hypervisor.call(partial(domain_calls.press_power_button, name=self._name))
                    self._log(f"ACPI shutdown sent; forced off after {grace:g} s")
                    with trio.move_on_after(grace):
                        while await self._is_active():
                            await watch.wait(min(self._backend.settings.state_poll_s, 0.5))
                if await self._is_active():
                    await hypervisor.call(partial(domain_calls.destroy_domain, name=self._name))
                    self._log("domain destroyed" + (" (the guest did not power off in time)" if grace > 0 else ""))
                else:
                    self._log("guest powered off")
            except (Unavailable, libvirt.libvirtError) as exc:
                raise self._fail(STOP_FAILURE, f"cannot stop {self._name}: {error_text(exc)}") from exc

    async def _is_active(self) -> bool:
        state, _ = await self._state()
        return state in ACTIVE_STATES

    # -- figures -------------------------------------------------------------------------------------------

    async def stats(self) -> VmStats:
        disk_mb = 0  # no overlay: it boots from a volume (module docstring)
        if self._spec.image_uuid:
            slot_id = self._backend.slots.bound.get(self._uuid)
            files_dir = self._dir if slot_id is None else self._backend.slots.slot_dir(slot_id)
            disk_mb = await trio.to_thread.run_sync(instance_files.allocated_mb, files_dir / OVERLAY,
                                                    limiter=self._backend.host.limiter)
        try:
            info = await self._backend.hypervisor.call(lambda conn: conn.lookupByName(self._name).info())
        except (Unavailable, libvirt.libvirtError):
            return VmStats(disk_mb=disk_mb)
        state, _max_kib, _kib, vcpus, cpu_ns = info
        if state not in ACTIVE_STATES:
            return VmStats(disk_mb=disk_mb)
        cpu_percent = self._cpu.percent(cpu_ns / 1e9, vcpus)
        memory_mb = await trio.to_thread.run_sync(self._pss_mb, limiter=self._backend.host.limiter)
        return VmStats(memory_mb=memory_mb, cpu_percent=cpu_percent, disk_mb=disk_mb)

    def _pss_mb(self) -> int:
        """PSS of the QEMU process in MiB, -1 if it cannot be found (worker thread)."""
        if self._pid is None:
            self._pid = _qemu_pid(self._name)
        if self._pid is None:
            return -1
        try:
            return int(psutil.Process(self._pid).memory_full_info().pss) // MIB
        except (psutil.Error, OSError):
            self._pid = None
            return -1

    def connected(self) -> None:
        self._pid = None
        self._cpu.reset()

    def lost_vm(self) -> None:
        self._pid = None
        self._cpu.reset()


def _since_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _qemu_pid(name: str) -> int | None:
    """The pid of domain `name`'s QEMU: libvirtd's pidfile, checked against the process's command line. Blocks."""
    try:
        pid = int((QEMU_PID_DIR / f"{name}.pid").read_text().strip())
        if f"guest={name}," in " ".join(psutil.Process(pid).cmdline()):
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None
