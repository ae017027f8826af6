"""The QEMU/KVM backend: real VMs through libvirt. `open_backend` is the ``qemu`` entry point of
``launcher.virtualizers`` (an `OpenBackend`, launcher/plugin/protocol.py, which holds the contract).

`QemuBackend` is what the instances of one launcher share: one libvirt connection (`hypervisor`), the image
store (`images`, images.py, ``<data_dir>/images``; `launcher images import` also reads the operator's drop dir
``<data_dir>/import``), the volume store (`volumes`, volumes.py: volumes of a libvirt storage pool, by default
the launcher's own dir pool at ``<data_dir>/volumes``; set up by the preflight, so not by `launcher
hard-reset`), and the host checks (`preflight`, preflight.py). Each instance gets a `QemuVirtualizer`
(virtualizer.py, which says how QEMU does each call); its settings are the `qemu:` section (settings.py).

At start-up, the orphan scan: a domain carrying our metadata for this data dir but without an instance dir is
reported (``orphan_domain`` event) and destroyed only when ``qemu.destroy_orphans`` is set. `destroy_all`
destroys and undefines every domain of this data dir, prepared slots' too (`launcher hard-reset`).

Prepared slots (issue 19, slots.py): `warm` keeps the ``qemu.pools`` filled with `slots`; at open, after the
orphan scan, `WarmPools.recover` adopts the slots an earlier process left ready and `QemuSlots.surviving_slots`
cleans up the rest (claims cut short, slot dirs nothing owns) and rebinds the instances whose domains are claimed
slots.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from launcher.plugin import files
from launcher.plugin.errors import SetupError
from launcher.plugin.host import BackendHost
from launcher.plugin.settings import parse_section
from launcher.plugin.spec import InstanceSpec, vm_image_problem
from launcher.plugin.warm import WarmPools
from virtualizers.qemu import domain, domain_calls, preflight
from virtualizers.qemu.clones import Templates, TemplateSettings
from virtualizers.qemu.hypervisor import Hypervisor, open_hypervisor
from virtualizers.qemu.image_errors import ImageError
from virtualizers.qemu.image_import import ImportProgress
from virtualizers.qemu.images import ImageInfo, ImageStore
from virtualizers.qemu.instance_files import CONSOLE_LOG, NVRAM, OVERLAY, SEED
from virtualizers.qemu.settings import SECTION, QemuSettings, resolve_accel
from virtualizers.qemu.slots import QemuSlots
from virtualizers.qemu.templates import TemplateSpec, TemplateStore
from virtualizers.qemu.virtualizer import QemuVirtualizer
from virtualizers.qemu.volumes import VOLUMES_DIR, VolumeStore

log = logging.getLogger(__name__)

IMAGES_DIR = "images"  # the image store, under the data dir
IMPORT_DIR = "import"  # under the data dir: where an operator stages files for `launcher images import`
MIB = 1 << 20


@attrs.define(eq=False)
class QemuBackend:
    """What the QEMU instances of one launcher share (module doc); hands out a `QemuVirtualizer` per instance."""

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
    slots: QemuSlots = attrs.field(init=False)  # prepared slots (slots.py), and the instances bound to claimed ones
    warm: WarmPools = attrs.field(init=False)  # `launcher.plugin.warm`'s pools of `slots`
    templates: Templates = attrs.field(init=False)  # booted templates (clones.py), and which domains are clones
    may_build: trio.Event = attrs.field(factory=trio.Event, init=False)  # set once the preflight has passed

    def __attrs_post_init__(self) -> None:
        self.slots = QemuSlots(self.settings, self.host, self.hypervisor, self.images, self.kvm)
        self.warm = WarmPools(self.settings.pools, self.slots, make_timeout_s=self.settings.slot_make_timeout_s,
                              emit=self.host.emit)
        store = TemplateStore(self.host.data_dir, self.hypervisor, self.host.limiter,
                              boot_timeout_s=self.settings.template_boot_timeout_s)
        self.templates = Templates(self.settings.templates, store, self.images, self.host, self._template_spec)

    def _template_spec(self, image: ImageInfo, entry: TemplateSettings) -> TemplateSpec:
        """The TemplateSpec of a template of `entry` on `image` with this backend's machine, firmware files,
        hot-plug ports and accelerator (the `spec_of` of `Templates`)."""
        s = self.settings
        return TemplateSpec(image=image, vcpus=entry.vcpus, mem_mb=entry.mem_mb,
                            firmware=s.firmware(efi=entry.fw_type == "efi"), machine=s.machine,
                            hotplug_slots=s.hotplug_slots, kvm=self.kvm)

    def new_virtualizer(self) -> QemuVirtualizer:
        """A fresh QemuVirtualizer for one instance (`Backend.new_virtualizer`)."""
        return QemuVirtualizer(self)

    def check_start(self, spec: InstanceSpec) -> str | None:
        """A VM needs an image or a boot volume, and no container image (`Backend.check_start`)."""
        return vm_image_problem(spec)

    def domain_params(self, spec: InstanceSpec, instance_dir: Path) -> domain.DomainParams:
        """What the domain XML of the instance `spec` in `instance_dir` is made from: the spec, the settings and
        the instance's files (`instance_files`)."""
        s = self.settings
        return domain.DomainParams(
            instance_uuid=spec.instance_uuid,
            data_dir=self.host.data_dir,
            vcpus=spec.vcpus,
            mem_mb=spec.mem_mb,
            kvm=self.kvm,
            machine=s.machine,
            firmware=s.firmware(efi=not spec.legacy_boot),
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
        self.may_build.set()  # the templates may be built now (clones.Templates.run)

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
        return await self.hypervisor.call(partial(domain_calls.our_domains, data_dir=self.host.data_dir))

    async def destroy_all(self) -> list[str]:
        """Destroy and undefine every domain of this data dir, slots' too, and remove the slot dirs (`launcher
        hard-reset`); their names."""
        names = [meta.name for meta in await self.our_domains()]
        for name in names:
            await self.hypervisor.call(partial(domain_calls.remove_domain, name=name))
        names += [name for name in await self.slots.remove_all() if name not in names]
        names += await self.templates.store.cleanup(set(), [])  # template domains being built, and the templates
        for name in names:
            log.warning("hard reset: domain %s destroyed and undefined", name)
        return names

    async def handle_orphans(self) -> None:
        """Report (and, if configured, destroy) our domains whose instance dir is gone."""
        for meta in await self.our_domains():
            if self.host.instance_dir(meta.instance_uuid).exists():
                continue
            destroy = self.settings.destroy_orphans
            name = meta.name
            log.warning("orphan domain %s: no instance dir for %s; %s", name, meta.instance_uuid,
                        "destroying it" if destroy else "left alone (qemu.destroy_orphans is false)")
            self.host.emit("orphan_domain", instance_uuid=meta.instance_uuid, domain=name, destroyed=destroy)
            if destroy:
                await self.hypervisor.call(partial(domain_calls.remove_domain, name=name))


def report_progress(host: BackendHost, progress: ImportProgress) -> None:
    """An import's progress as an `image_progress` event and a launcher log line."""
    host.emit("image_progress", image_uuid=progress.image_id, done_bytes=progress.done_bytes,
              total_bytes=progress.total_bytes, source=progress.source, finished=progress.finished)
    total = "?" if progress.total_bytes is None else f"{progress.total_bytes / MIB:.1f}"
    log.info("image %s: %.1f of %s MiB from %s%s", progress.image_id, progress.done_bytes / MIB, total,
             progress.source, " (done)" if progress.finished else "")


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
    files.make_dirs(host.data_dir / IMPORT_DIR, mode=0o700)
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
        await backend.warm.recover()
        backend.templates.clones = {meta.instance_uuid for meta in await backend.our_domains() if meta.template_key}
        async with trio.open_nursery() as nursery:
            if backend.templates.configured:
                nursery.start_soon(backend.templates.run, backend.may_build, host.data_dir / "instances")
            yield backend
            nursery.cancel_scope.cancel()
