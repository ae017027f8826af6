"""The QEMU/KVM virtualizer: real VMs through libvirt.

Per instance (all files in the instance dir, docs/architecture.md §4.3):

``ensure_backing_image``
    the image store (`images`) provides `<data_dir>/images/<image_uuid>.img`, importing it once
    from a configured directory or URL if needed. The START's volumes must exist (`check_storage`). An
    instance that boots from a volume (no image_uuid, a `boot: true` storage entry) has no image.
``create_image``
    the START's `local` volumes (swap ones formatted with mkswap: `VolumeStore.format_swap`);
    ``overlay.qcow2``: a qcow2 overlay on the backing image, backing file and backing format explicit; its
    size is the payload's disk size (raised to the image's size if smaller), else the image's (none without an
    image); ``seed.iso``: the cloud-init seed (`cloudinit`), NoCloud or ConfigDrive, its meta-data carrying the
    tagged volumes (`devices_metadata`).
``start_vm``
    defines the persistent domain (`domain`) with its disks in `disk_plan`'s order and boot orders, and starts
    it.
``monitor_vm``
    follows the domain's state through libvirt's lifecycle events (`hypervisor`): CONNECTED once
    the domain is active, CLOSED once it is shut off or gone. A guest paused by an I/O error (a full disk) is
    reported with an `instance_paused` event and a log line, and stays paused for the operator.
``stop_vm(grace)``
    ACPI power button, then destroy once `grace` seconds have passed.
``delete_image``
    destroys the domain if it still runs and undefines it with its NVRAM, and deletes the START's ephemeral
    volumes still attached. The backing image and the other volumes (a boot volume too) stay.
``attach_volume`` / ``detach_volume``
    a volume of the store as one more virtio disk (its serial the volume id): hot-plugged into a domain that
    runs (libvirt `attachDeviceFlags`, live only: the domain is defined again at every start with the
    instance's volumes), and hot-unplugged once the guest lets go of it (`detachDeviceFlags`, then the live XML
    is read until the disk is gone, bounded by ``qemu.volumes.detach_timeout_s``). On a q35 machine each hot-plug
    takes one of ``qemu.hotplug_slots`` spare PCIe root ports.
``stats``
    PSS of the QEMU process, CPU time from libvirt normalised to the allotted vCPUs, bytes allocated to the
    overlay (0 for an instance that boots from a volume, as in ciao: the volume's figures are in /v1/volumes).

Backend-wide: one libvirt connection, the image store, the volume store (`volumes`, volumes.py: volumes of
a libvirt storage pool, by default the launcher's own dir pool at ``<data_dir>/volumes``; set up by the
preflight, so not by `launcher hard-reset`), and at start-up the
orphan scan: a domain carrying our metadata for this data dir but without an instance dir is reported
(`orphan_domain` event) and destroyed only when `destroy_orphans` is set.

Settings (the `qemu:` config section, every key optional; see `QemuSettings`).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

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
    SetupError,
    VirtualizerError,
)
from launcher.plugin.files import INSTANCE_DIR_MODE, fsync_dir
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import MonitorEvent, MonitorInbox, VmStats
from launcher.plugin.settings import at_least, at_most, one_of, parse_section
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.tools import ToolError
from launcher.plugin.volumes import (
    MAX_VOLUMES,
    PlannedDisk,
    boot_volume,
    check_storage,
    devices_metadata,
    disk_plan,
    make_local_volumes,
    remove_ephemeral_volumes,
)
from virtualizers.qemu import cloudinit, domain, preflight, qemu_img
from virtualizers.qemu.hypervisor import (
    Disconnected,
    Hypervisor,
    Unavailable,
    Unresponsive,
    error_text,
    open_hypervisor,
)
from virtualizers.qemu.images import DEFAULT_MAX_BYTES, ImageError, ImageInfo, ImageStore, ImportProgress
from virtualizers.qemu.import_policy import ImportPolicy
from virtualizers.qemu.volumes import COPY_TIMEOUT_S, VOLUMES_DIR, VolumeStore

log = logging.getLogger(__name__)

SECTION = "qemu"
ACCELS = ("auto", "kvm", "tcg")
IMAGES_DIR = "images"  # the image store, under the data dir
IMPORT_DIR = "import"  # under the data dir: where an operator stages files for `launcher images import`
OVERLAY = "overlay.qcow2"
SEED = "seed.iso"
NVRAM = "nvram.fd"
CONSOLE_LOG = "console.log"
UNPLUG_POLL_S = 0.02  # how often a hot-unplug reads the live XML for the disk (one small libvirt call)
STATE_POLL_S = 5.0  # re-read a domain's state this often even without events (a backstop, see hypervisor.py)
MIB = 1 << 20
QEMU_PID_DIR = Path("/run/libvirt/qemu")  # where the system libvirtd writes <domain>.pid

# Domain states in which QEMU runs (the VM is "up" for the launcher).
_ACTIVE_STATES = frozenset({
    libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_PMSUSPENDED,
})


# ---------------------------------------------------------------------------------------------------------
# Settings


@attrs.frozen
class NetworkSettings:
    """Where each VM's NIC is plugged: a libvirt network, a host bridge, or nowhere (`kind: none`)."""

    kind: str = attrs.field(default="network", validator=one_of(*domain.NETWORK_KINDS))
    source: str = "default"  # the network's or the bridge's name


@attrs.frozen
class VolumeSettings:
    """Where volumes live (virtualizers/qemu/volumes.py): "" is the launcher's own dir pool at
    <data_dir>/volumes; any other name is a libvirt storage pool the operator defined and started (RBD, LVM,
    NFS, ...; not tested here), in which the launcher creates and deletes volumes named <volume id>.<fmt> only."""

    pool: str = ""
    copy_timeout_s: float = attrs.field(default=COPY_TIMEOUT_S, validator=at_least(1))  # one full copy of an image
    # How long a hot-unplug waits for the guest to let go of the disk (the test guest does in about 0.1 s; a
    # guest that ignores the request never does).
    detach_timeout_s: float = attrs.field(default=30.0, validator=at_least(1))


@attrs.frozen
class QemuSettings:
    """The `qemu:` section of the launcher config."""

    uri: str = "qemu:///system"
    accel: str = attrs.field(default="auto", validator=one_of(*ACCELS))  # auto: kvm when it really works
    machine: str = "q35"
    hotplug_slots: int = attrs.field(default=8, validator=[at_least(0), at_most(MAX_VOLUMES)])
    seed_format: str = attrs.field(default="nocloud", validator=one_of(*cloudinit.SEED_FORMATS))
    network: NetworkSettings = NetworkSettings()
    guest_network: cloudinit.GuestNetwork = cloudinit.GuestNetwork()  # gateway, DNS, MTU written into the seed
    volumes: VolumeSettings = VolumeSettings()
    image_dirs: tuple[Path, ...] = ()  # searched for <image_uuid>[.img|.qcow2|.raw] before image_url
    image_url: str = ""  # e.g. https://images.example/{id}.qcow2 (also file://); "" for none
    # Where `launcher images import` may also read from: absolute dirs, file:// dirs, http(s):// URL prefixes.
    import_sources: tuple[str, ...] = ()
    image_max_bytes: int = DEFAULT_MAX_BYTES  # no import may be larger (64 GiB)
    image_gc_age_s: float = 7 * 86400.0  # `launcher images gc` removes unused images older than this
    ovmf_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    ovmf_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    destroy_orphans: bool = False  # destroy domains of ours that have no instance dir (else report only)
    libvirt_threads: int = 8  # worker threads in libvirt calls at once (hypervisor.py: hung calls keep theirs)
    libvirt_timeout_s: float = 60.0  # bound on any one libvirt call (commands are also bound by their phase)

    def __attrs_post_init__(self) -> None:
        ImportPolicy.from_settings(self.image_dirs, self.image_url or None, self.import_sources)  # ValueError


def resolve_accel(accel: str) -> bool:
    """True for KVM, False for TCG. `auto` is KVM where it really works (`preflight.kvm_problem`)."""
    return accel == "kvm" or (accel == "auto" and preflight.kvm_problem() is None)


# ---------------------------------------------------------------------------------------------------------
# The backend


@attrs.define(eq=False)
class QemuBackend:
    """What the QEMU instances of one launcher share."""

    settings: QemuSettings
    host: BackendHost
    hypervisor: Hypervisor
    images: ImageStore
    kvm: bool
    # The volume store, once `open_volumes` (which the preflight calls) has set it up; None until then, so that
    # `launcher hard-reset`, which opens the backend without a preflight, works even where the pool cannot.
    volumes: VolumeStore | None = None
    name: str = attrs.field(default="qemu", init=False)
    # Whom QEMU runs as, found by the preflight: its group may search instance dirs (which are 0700 otherwise).
    qemu_user: preflight.QemuUser | None = attrs.field(default=None, init=False)

    def new_virtualizer(self) -> QemuVirtualizer:
        return QemuVirtualizer(self)

    def domain_params(self, spec: InstanceSpec, instance_dir: Path) -> domain.DomainParams:
        s = self.settings
        return domain.DomainParams(
            instance_uuid=spec.instance_uuid,
            data_dir=self.host.data_dir,
            vcpus=spec.vcpus,
            mem_mb=spec.mem_mb,
            kvm=self.kvm,
            machine=s.machine,
            firmware=domain.Firmware(efi=not spec.legacy_boot, ovmf_code=s.ovmf_code, ovmf_vars_template=s.ovmf_vars),
            overlay=instance_dir / OVERLAY if spec.image_uuid else None,  # none when it boots from a volume
            seed=instance_dir / SEED,
            network_kind=s.network.kind,
            network_source=s.network.source,
            mac=spec.networking.vnic_mac,
            console_log=instance_dir / CONSOLE_LOG,
            nvram=instance_dir / NVRAM,
            hotplug_slots=s.hotplug_slots,
        )

    async def preflight(self) -> None:
        """SetupError, with what to do, if this host cannot run the VMs as configured (`preflight`)."""
        s = self.settings
        preflight.check_accel(s.accel)
        preflight.check_firmware({f"{SECTION}.ovmf_code": s.ovmf_code, f"{SECTION}.ovmf_vars": s.ovmf_vars})
        await preflight.check_capabilities(self.hypervisor, s.machine, self.kvm)
        data_dir = self.host.data_dir
        # Before the volume store defines its pool: a data dir QEMU cannot reach leaves no pool behind.
        self.qemu_user = await preflight.check_reachable(self.hypervisor, [data_dir / "instances",
                                                                          data_dir / IMAGES_DIR])
        await self.open_volumes()
        if not s.volumes.pool:  # the own pool's volumes are files in its directory, which the pool made
            await preflight.check_reachable(self.hypervisor, [data_dir / VOLUMES_DIR])
        if self.qemu_user is not None:
            self.images.share_with_group(self.qemu_user.gid)  # QEMU reads the images even without libvirt's chown

    async def open_volumes(self) -> VolumeStore:
        """Set the volume store up (its pool, its records: volumes.py) and make it the backend's `volumes`;
        SetupError with what to do if that fails. Once only."""
        if self.volumes is None:
            s = self.settings.volumes
            store = VolumeStore(self.hypervisor, self.images, data_dir=self.host.data_dir, pool=s.pool,
                                limiter=self.host.limiter, copy_timeout_s=s.copy_timeout_s)
            await store.open()
            self.volumes = store
        return self.volumes

    async def our_domains(self) -> list[domain.DomainMetadata]:
        """The launcher metadata of every domain that belongs to this data dir."""
        data_dir = str(self.host.data_dir.absolute())

        def scan(conn: libvirt.virConnect) -> list[domain.DomainMetadata]:
            found = []
            for dom in conn.listAllDomains():
                try:
                    meta = domain.read_metadata(dom.XMLDesc(0))
                except libvirt.libvirtError:
                    continue  # undefined meanwhile
                if meta is not None and meta.data_dir == data_dir:
                    found.append(meta)
            return found

        return await self.hypervisor.call(scan)

    async def destroy_all(self) -> list[str]:
        """Destroy and undefine every domain of this data dir (`launcher hard-reset`); their names."""
        names = [domain.domain_name(meta.instance_uuid) for meta in await self.our_domains()]
        for name in names:
            await self.hypervisor.call(partial(remove_domain, name=name))
            log.warning("hard reset: domain %s destroyed and undefined", name)
        return names

    async def handle_orphans(self) -> None:
        """Report (and, if configured, destroy) our domains whose instance dir is gone."""
        for meta in await self.our_domains():
            if self.host.instance_dir(meta.instance_uuid).exists():
                continue
            destroy = self.settings.destroy_orphans
            name = domain.domain_name(meta.instance_uuid)
            log.warning("orphan domain %s: no instance dir for %s; %s", name, meta.instance_uuid,
                        "destroying it" if destroy else "left alone (qemu.destroy_orphans is false)")
            self.host.emit("orphan_domain", instance_uuid=meta.instance_uuid, domain=name, destroyed=destroy)
            if destroy:
                await self.hypervisor.call(partial(remove_domain, name=name))


def report_progress(host: BackendHost, progress: ImportProgress) -> None:
    """An import's progress as an `image_progress` event and a launcher log line."""
    host.emit("image_progress", image_uuid=progress.image_id, done_bytes=progress.done_bytes,
              total_bytes=progress.total_bytes, source=progress.source, finished=progress.finished)
    total = "?" if progress.total_bytes is None else f"{progress.total_bytes / MIB:.1f}"
    log.info("image %s: %.1f of %s MiB from %s%s", progress.image_id, progress.done_bytes / MIB, total,
             progress.source, " (done)" if progress.finished else "")


def remove_domain(conn: libvirt.virConnect, name: str) -> bool:
    """Destroy (if active) and undefine domain `name` with its NVRAM; False if there was none. Blocking."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            raise  # else it went down (or away) meanwhile
    try:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    return True


@asynccontextmanager
async def open_backend(raw: Mapping[str, Any], host: BackendHost) -> AsyncIterator[QemuBackend]:
    """Open the QEMU backend (the `qemu` entry point of `launcher.virtualizers`).

    SetupError if the settings are invalid or libvirt cannot be reached (hypervisor.Unreachable, with libvirt's
    reason). Whether the host can run the VMs as configured is `QemuBackend.preflight`'s job, which
    `launcher serve` calls (`launcher hard-reset` does not: it must clean up even a host that cannot run VMs)."""
    settings: QemuSettings = parse_section(QemuSettings, dict(raw), f"{SECTION}.")
    images = ImageStore(host.data_dir / IMAGES_DIR, search_dirs=settings.image_dirs,
                        url_template=settings.image_url or None, limiter=host.limiter,
                        on_progress=lambda progress: report_progress(host, progress),
                        gc_age_s=settings.image_gc_age_s,
                        import_sources=(*settings.import_sources, str(host.data_dir / IMPORT_DIR)),
                        max_bytes=settings.image_max_bytes)
    (host.data_dir / IMPORT_DIR).mkdir(mode=0o700, exist_ok=True)
    try:
        await images.open()
    except ImageError as exc:
        raise SetupError(f"{SECTION}: {exc}") from exc
    async with open_hypervisor(settings.uri, threads=settings.libvirt_threads,
                               call_timeout_s=settings.libvirt_timeout_s) as hypervisor:
        backend = QemuBackend(settings, host, hypervisor, images, resolve_accel(settings.accel))
        log.info("qemu virtualizer: libvirt %s, accel %s, seed %s, network %s:%s", settings.uri,
                 "kvm" if backend.kvm else "tcg", settings.seed_format, settings.network.kind,
                 settings.network.source)
        await backend.handle_orphans()
        yield backend


# ---------------------------------------------------------------------------------------------------------
# One instance


@attrs.define(eq=False)
class QemuVirtualizer:
    """One instance's VM. Called by its actor only, one call at a time (launcher/plugin/protocol.py)."""

    _backend: QemuBackend
    _spec: InstanceSpec = attrs.field(init=False)
    _dir: Path = attrs.field(init=False)
    _volumes: Callable[[], Sequence[str]] = attrs.field(init=False)  # the instance's, in disk order (init)
    _image: ImageInfo | None = attrs.field(default=None, init=False)
    _pid: int | None = attrs.field(default=None, init=False)  # QEMU's, found by stats()
    _cpu_sample: tuple[int, float] | None = attrs.field(default=None, init=False)  # (cpu ns, monotonic s)
    _paused_reported: bool = attrs.field(default=False, init=False)

    @property
    def _name(self) -> str:
        return domain.domain_name(self._spec.instance_uuid)

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
        if any(entry.local for entry in self._spec.storage):
            await self._make_local_volumes()
        if self._spec.image_uuid:
            image = self._image or await self._backend.images.ensure(self._spec.image_uuid)
            started = time.monotonic()
            size = await self._create_overlay(image)
            self._step_done("overlay", started, f"{OVERLAY} ({size / MIB:.0f} MiB on {image.id})")
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

    async def _create_overlay(self, image: ImageInfo) -> int:
        """overlay.qcow2 (via a temp name, so a half-made overlay never has the real name); its size."""
        size = image.virtual_size
        if self._spec.disk_mb:
            wanted = self._spec.disk_mb * MIB
            if wanted < size:
                self._log(f"disk_mb {self._spec.disk_mb} is smaller than image {image.id}; "
                          f"using the image's {size / MIB:.0f} MiB")
            size = max(size, wanted)
        overlay = self._dir / OVERLAY
        tmp = overlay.with_name(OVERLAY + ".tmp")
        try:
            await qemu_img.create_overlay(tmp, image.path, image.format, size)
            await trio.to_thread.run_sync(_commit_file, tmp, overlay, limiter=self._backend.host.limiter)
        except (ToolError, OSError) as exc:
            raise self._fail(IMAGE_FAILURE, f"cannot create {OVERLAY}: {exc}") from exc
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink_quietly, tmp, limiter=self._backend.host.limiter)
        return size

    async def delete_image(self) -> None:
        """Destroy the domain if it still runs, and undefine it with its NVRAM; the actor removes the dir."""
        try:
            removed = await self._backend.hypervisor.call(lambda conn: remove_domain(conn, self._name))
        except (Unavailable, libvirt.libvirtError) as exc:
            message = str(exc) if isinstance(exc, Unavailable) else error_text(exc)
            self._log(f"cannot undefine domain {self._name}: {message}")
            raise self._fail(STOP_FAILURE, f"cannot undefine domain {self._name}: {message}") from exc
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
            attached = await self._backend.hypervisor.call(lambda conn: _hot_plug(conn, self._name, disk))
        except (Unavailable, libvirt.libvirtError) as exc:
            message = str(exc) if isinstance(exc, Unavailable) else error_text(exc)
            raise self._fail(ATTACH_FAILURE, f"cannot hot-plug volume {volume_id}: {message}") from exc
        if attached:
            self._log(f"volume {volume_id} hot-plugged as {attached} in {_since_ms(started)} ms")
        else:
            self._log(f"volume {volume_id} attached: a disk from the next start (the VM does not run)")

    async def detach_volume(self, volume_id: str) -> None:
        started = time.monotonic()
        timeout = self._backend.settings.volumes.detach_timeout_s
        hypervisor = self._backend.hypervisor
        try:
            requested = await hypervisor.call(lambda conn: _request_unplug(conn, self._name, volume_id))
            with trio.move_on_after(timeout) as waited:
                while requested and await hypervisor.call(lambda conn: _has_disk(conn, self._name, volume_id)):
                    await trio.sleep(UNPLUG_POLL_S)
        except (Unavailable, libvirt.libvirtError) as exc:
            message = str(exc) if isinstance(exc, Unavailable) else error_text(exc)
            raise self._fail(DETACH_FAILURE, f"cannot hot-unplug volume {volume_id}: {message}") from exc
        if waited.cancelled_caught:
            raise self._fail(DETACH_FAILURE, f"the guest did not let go of volume {volume_id} within {timeout:g} s; "
                                             "it stays attached (the unplug request stays pending in QEMU)")
        if requested:
            self._log(f"volume {volume_id} hot-unplugged in {_since_ms(started)} ms")
        else:
            self._log(f"volume {volume_id} detached: gone from the next start (the VM does not run)")

    async def start_vm(self) -> None:
        # The overlay or the boot volume first, then the instance's other volumes, those attached later too.
        plan = disk_plan(self._spec, self._volumes())
        overlay_order = plan[0].boot_order if plan and plan[0].is_overlay else None
        params = attrs.evolve(self._backend.domain_params(self._spec, self._dir),
                              volumes=await self._volume_disks(plan), overlay_boot_order=overlay_order)
        xml = domain.domain_xml(params)
        user = self._backend.qemu_user
        if user is not None:
            try:
                await trio.to_thread.run_sync(_let_group_search, self._dir, user.gid,
                                              limiter=self._backend.host.limiter)
            except OSError as exc:
                raise self._fail(LAUNCH_FAILURE, f"cannot let QEMU ({user.name}) into {self._dir}: {exc}") from exc
        started = time.monotonic()
        try:
            dom = await self._backend.hypervisor.call(lambda conn: conn.defineXML(xml))
            self._step_done("define", started, f"domain {self._name}")
            started = time.monotonic()
            await self._backend.hypervisor.call(lambda conn: _create(dom))
        except Unavailable as exc:
            raise self._fail(LAUNCH_FAILURE, str(exc)) from exc
        except libvirt.libvirtError as exc:
            raise self._fail(LAUNCH_FAILURE, f"libvirt could not start {self._name}: {error_text(exc)}") from exc
        self._paused_reported = False
        self._step_done("start", started, f"domain {self._name} started", f" ({'kvm' if self._backend.kvm else 'tcg'})")

    async def monitor_vm(self, inbox: MonitorInbox, recover: bool) -> None:
        hypervisor = self._backend.hypervisor
        sent_connected = False
        with hypervisor.watch(self._name) as watch:
            while True:
                try:
                    state, reason = await self._state()
                except Disconnected:
                    await hypervisor.wait_connected()  # the VM does not stop because libvirtd did
                    continue
                except Unresponsive:
                    await watch.wait(STATE_POLL_S)  # no answer is not "down": ask again
                    continue
                if state not in _ACTIVE_STATES:
                    await inbox.send(MonitorEvent.CLOSED)
                    return
                if not sent_connected:
                    await inbox.send(MonitorEvent.CONNECTED)
                    sent_connected = True
                self._check_paused(state, reason)
                await watch.wait(STATE_POLL_S)

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
        def read(conn: libvirt.virConnect) -> tuple[int, int]:
            try:
                state, reason = conn.lookupByName(self._name).state()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return libvirt.VIR_DOMAIN_SHUTOFF, 0
                raise
            return state, reason

        return await self._backend.hypervisor.call(read)

    async def stop_vm(self, grace: float) -> None:
        """ACPI power button; after `grace` seconds (at once if 0) destroy. Returns once the domain is off."""
        hypervisor = self._backend.hypervisor
        with hypervisor.watch(self._name) as watch:
            try:
                if await self._is_active() and grace > 0:
                    await hypervisor.call(lambda conn: _press_power_button(conn, self._name))
                    self._log(f"ACPI shutdown sent; forced off after {grace:g} s")
                    with trio.move_on_after(grace):
                        while await self._is_active():
                            await watch.wait(min(STATE_POLL_S, 0.5))
                if await self._is_active():
                    await hypervisor.call(lambda conn: _destroy(conn, self._name))
                    self._log("domain destroyed" + (" (the guest did not power off in time)" if grace > 0 else ""))
                else:
                    self._log("guest powered off")
            except (Unavailable, libvirt.libvirtError) as exc:
                message = str(exc) if isinstance(exc, Unavailable) else error_text(exc)
                raise self._fail(STOP_FAILURE, f"cannot stop {self._name}: {message}") from exc

    async def _is_active(self) -> bool:
        state, _ = await self._state()
        return state in _ACTIVE_STATES

    # -- figures -------------------------------------------------------------------------------------------

    async def stats(self) -> VmStats:
        disk_mb = 0  # no overlay: it boots from a volume (module docstring)
        if self._spec.image_uuid:
            disk_mb = await trio.to_thread.run_sync(_allocated_mb, self._dir / OVERLAY,
                                                    limiter=self._backend.host.limiter)
        try:
            info = await self._backend.hypervisor.call(lambda conn: conn.lookupByName(self._name).info())
        except (Unavailable, libvirt.libvirtError):
            return VmStats(disk_mb=disk_mb)
        state, _max_kib, _kib, vcpus, cpu_ns = info
        if state not in _ACTIVE_STATES:
            return VmStats(disk_mb=disk_mb)
        now = time.monotonic()
        cpu_percent = -1
        if self._cpu_sample is not None:
            prev_ns, prev_s = self._cpu_sample
            if now > prev_s:
                cpu_percent = round(100 * (cpu_ns - prev_ns) / 1e9 / (now - prev_s) / max(vcpus, 1))
        self._cpu_sample = (cpu_ns, now)
        memory_mb = await trio.to_thread.run_sync(self._pss_mb, limiter=self._backend.host.limiter)
        return VmStats(memory_mb=memory_mb, cpu_percent=max(cpu_percent, -1), disk_mb=disk_mb)

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
        self._cpu_sample = None

    def lost_vm(self) -> None:
        self._pid = None
        self._cpu_sample = None


# ---------------------------------------------------------------------------------------------------------
# Blocking helpers (worker threads)


def _let_group_search(directory: Path, gid: int) -> None:
    """QEMU's group may enter the instance dir, nobody else: its files stay the launcher's user's only, and
    libvirt hands QEMU the disks it needs (dynamic_ownership) while the VM runs."""
    os.chown(directory, -1, gid)
    os.chmod(directory, INSTANCE_DIR_MODE | stat.S_IXGRP)


def _commit_file(tmp: Path, final: Path) -> None:
    """fsync `tmp`, make it private (it holds the guest's disk) and rename it to `final`."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _create(dom: libvirt.virDomain) -> None:
    """Boot the defined domain. One that already runs counts as started: an earlier start_vm that overran its
    timeout may have started it after all (its abandoned thread's call went through), and a RESTART adopts it."""
    if not dom.isActive():
        dom.create()


def _press_power_button(conn: libvirt.virConnect, name: str) -> None:
    try:
        conn.lookupByName(name).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            raise  # else it went down meanwhile


def _destroy(conn: libvirt.virConnect, name: str) -> None:
    try:
        conn.lookupByName(name).destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            raise


def _since_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _hot_plug(conn: libvirt.virConnect, name: str, disk: domain.VolumeDisk) -> str | None:
    """Attach `disk` to the running domain on its first free target; that target, or None if the domain does not
    run (the disk is then one from its next start, which defines the domain again)."""
    dom = conn.lookupByName(name)
    if not dom.isActive():
        return None
    target = domain.free_target(dom.XMLDesc(0))
    if target is None:
        raise libvirt.libvirtError(f"every disk target of {name} is taken")
    dom.attachDeviceFlags(domain.volume_disk_xml(disk, target), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return target


def _request_unplug(conn: libvirt.virConnect, name: str, volume_id: str) -> bool:
    """Ask the running domain's guest to let go of the volume's disk; False if the domain does not run or has no
    such disk (then there is nothing to wait for)."""
    dom = conn.lookupByName(name)
    if not dom.isActive():
        return False
    disk = domain.find_volume_disk(dom.XMLDesc(0), volume_id)
    if disk is None:
        return False
    dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return True


def _has_disk(conn: libvirt.virConnect, name: str, volume_id: str) -> bool:
    """Whether the running domain still has the volume's disk."""
    dom = conn.lookupByName(name)
    return bool(dom.isActive()) and domain.find_volume_disk(dom.XMLDesc(0), volume_id) is not None


def _allocated_mb(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512 // MIB
    except OSError:
        return -1


def _qemu_pid(name: str) -> int | None:
    """The pid of domain `name`'s QEMU: libvirtd's pidfile, checked against the process's command line."""
    try:
        pid = int((QEMU_PID_DIR / f"{name}.pid").read_text().strip())
        if f"guest={name}," in " ".join(psutil.Process(pid).cmdline()):
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None

