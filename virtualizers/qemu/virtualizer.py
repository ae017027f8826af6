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
    request), then the live XML is read every `vm_base.UNPLUG_POLL_S` until the disk is gone, bounded by
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
from functools import partial
from pathlib import Path

import attrs
import libvirt
import psutil
import trio

from launcher.plugin.errors import (
    IMAGE_FAILURE,
    LAUNCH_FAILURE,
    STOP_FAILURE,
    LauncherError,
)
from launcher.plugin.protocol import MonitorEvent, MonitorInbox, VmStats
from launcher.plugin.tools import ToolError
from launcher.plugin.volumes import (
    boot_volume,
    check_storage,
    devices_metadata,
    disk_plan,
    make_local_volumes,
    remove_ephemeral_volumes,
)
from virtualizers.qemu import claim, clone_restore, clones, cloudinit, domain, domain_calls, instance_files
from virtualizers.qemu.domain_calls import ACTIVE_STATES
from virtualizers.qemu.hypervisor import Disconnected, Unavailable, Unresponsive, error_text
from virtualizers.qemu.images import ImageInfo
from virtualizers.qemu.instance_files import OVERLAY, SEED
from virtualizers.qemu.templates import Template, TemplateBuildError
from virtualizers.qemu.vm_base import VmBase

MIB = 1 << 20
QEMU_PID_DIR = Path("/run/libvirt/qemu")  # where the system libvirtd writes <domain>.pid


@attrs.define(eq=False)
class QemuVirtualizer(VmBase):
    """One instance's VM (module doc). Called by its actor only, one call at a time (`Virtualizer`)."""

    @property
    def start_path(self) -> str:
        """"pool" while the instance's domain is a claimed slot (claim.py), "template" while it is a restored clone
        (clones.py), else "cold"."""
        if self._uuid in self._backend.slots.bound:
            return "pool"
        return "template" if self._uuid in self._backend.templates.clones else "cold"


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
        self._seed_instance_id = seed.instance_id  # a clone's guest takes this identity (the meta-data's, if any)
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

    async def _make_overlay(self, *, clone: bool = True) -> None:
        """The instance's disk in its dir (a stale slot binding forgotten): a child of the built template of its
        shape if there is one and `clone` (start_vm then restores a clone of it), else of the image (cold)."""
        await claim.forget_stale(self._backend.slots, self._uuid, self._dir)
        image = self._image or await self._backend.images.ensure(self._spec.image_uuid)
        templates = self._backend.templates
        template = await templates.template_for(self._spec, image) if clone and templates.configured else None
        if template is not None:
            started = time.monotonic()
            try:
                await clone_restore.make_clone_overlay(template, self._dir / OVERLAY)
            except (ToolError, OSError) as exc:
                raise self._fail(IMAGE_FAILURE, f"cannot create {OVERLAY} on template {template.key[:12]}: "
                                                f"{exc}") from exc
            self._template = template
            self._step_done("overlay", started, f"{OVERLAY} (on template {template.key[:12]} of {image.id})")
            return
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
        a slot taken but never claimed is discarded; one still only reserved is the supervisor's to release, as for
        any virtualizer); the actor removes the dir."""
        try:
            if self._taken is not None:  # taken in create_image, never claimed
                await self._backend.warm.discard(self._taken)
                self._log(f"slot {self._taken} discarded (never claimed)")
                self._taken = None
            self._backend.templates.clones.discard(self._uuid)
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
        if self._template is not None and await self._start_clone(self._template):
            self._paused_reported = False
            return
        self._backend.templates.clones.discard(self._uuid)  # defined again below: a cold domain from now on
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
        await self._make_overlay(clone=False)
        return False

    async def _start_clone(self, template: Template) -> bool:
        """Restore a clone of the template create_image made the disk on (clones.start_clone); False (its domain
        removed, the disk made again on the image for a cold start) if that fails."""
        self._template = None
        started = time.monotonic()
        s = self._backend.settings
        try:
            timings = await clones.start_clone(self._backend.hypervisor, template, self._spec, self._seed_instance_id,
                                               self._dir, self._backend.host.data_dir,
                                               (s.network.kind, s.network.source), s.clone_ready_timeout_s)
        except (Unavailable, libvirt.libvirtError, OSError, ValueError, TemplateBuildError) as exc:
            self._log(f"cannot start a clone of template {template.key[:12]}: {error_text(exc)}; starting cold")
            await self._make_overlay(clone=False)
            return False
        self._backend.templates.cloned(self._uuid, template)
        parts = ", ".join(f"{name} {round(seconds * 1000)}" for name, seconds in timings.items())
        self._step_done("clone", started, f"domain {self._name} restored from template {template.key[:12]} and "
                        f"re-identified (ms since the restore began: {parts})")
        return True

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


def _qemu_pid(name: str) -> int | None:
    """The pid of domain `name`'s QEMU: libvirtd's pidfile, checked against the process's command line. Blocks."""
    try:
        pid = int((QEMU_PID_DIR / f"{name}.pid").read_text().strip())
        if f"guest={name}," in " ".join(psutil.Process(pid).cmdline()):
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None
