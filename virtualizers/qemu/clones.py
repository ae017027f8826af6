"""The qemu backend's booted templates (``qemu.templates``) and the START of a clone (docs/warm-starts.md).

`Templates` keeps one template per configured shape (`TemplateSettings`): its `run` task, in the backend's
nursery, waits until the backend's preflight has passed, removes what an earlier process left (template domains,
half-built and unwanted templates: `TemplateStore.cleanup`), then builds each missing template, one at a time,
retrying a failed build after 10 s, doubling up to 10 min. A START of a template's shape (`template_for`: its
image as the image store has it *now*, so that a re-imported image never gets a stale template) is cloned:
`clone_restore.make_clone_overlay` in create_image, `start_clone` in start_vm. A START whose template is not built
yet takes the cold path and has its template built.

`clones` is the set of instances whose domain is a restored clone (read back from the domains' template marker
when the backend opens): their `start_path` is ``template`` until a cold start defines their domain again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from launcher.plugin.host import BackendHost
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.warm import Backoff, WarmShapeSettings, slot_shape
from virtualizers.qemu import clone_restore, domain, save_image
from virtualizers.qemu.hypervisor import Hypervisor
from virtualizers.qemu.images import ImageInfo, ImageStore
from virtualizers.qemu.instance_files import CONSOLE_LOG, NVRAM, OVERLAY, SEED
from virtualizers.qemu.templates import Template, TemplateSpec, TemplateStore

log = logging.getLogger(__name__)

RETRY_FIRST_S = 10.0
RETRY_MAX_S = 600.0


@attrs.frozen
class TemplateSettings(WarmShapeSettings):
    """One entry of ``qemu.templates``: keep a booted template of this shape, and clone it for matching STARTs."""


@attrs.define(eq=False)
class _Entry:
    settings: TemplateSettings
    template: Template | None = None  # the one built for the image as it was then
    building: bool = False
    backoff: Backoff = attrs.Factory(lambda: Backoff(RETRY_FIRST_S, RETRY_MAX_S))  # builds that failed
    clones: int = 0  # clones started since the launcher started


class Templates:
    """The configured templates of one qemu backend (module doc). Used from the Trio thread only."""

    def __init__(self, configured: tuple[TemplateSettings, ...], store: TemplateStore, images: ImageStore,
                 host: BackendHost, spec_of: Callable[[ImageInfo, TemplateSettings], TemplateSpec]) -> None:
        """`spec_of(image, settings)`: the `TemplateSpec` of a template of `settings` on `image` (the backend's
        machine, firmware files, hot-plug ports and accelerator)."""
        self._entries = {entry.shape: _Entry(entry) for entry in configured}
        self.store = store
        self._images = images
        self._host = host
        self._spec_of = spec_of
        self._changed = trio.Event()
        self.clones: set[str] = set()

    @property
    def configured(self) -> bool:
        """Whether any template is configured."""
        return bool(self._entries)

    async def template_for(self, spec: InstanceSpec, image: ImageInfo) -> Template | None:
        """The built template a START of `spec` (on `image`, as the store has it now) is cloned from, or None: no
        template of its shape, or not built (yet) for this image; its build is then asked for."""
        shape = slot_shape(spec)
        found = None if shape is None else self._entries.get(shape)
        if found is None:
            return None
        entry = found
        key, _ = await self.store.key_of(self._spec_of(image, entry.settings))
        if entry.template is not None and entry.template.key == key:
            return entry.template
        entry.template = await self.store.get(key)
        if entry.template is None:
            self.wake()
        return entry.template

    def cloned(self, instance_uuid: str, template: Template) -> None:
        """A clone of `template` now runs as `instance_uuid`'s domain."""
        self.clones.add(instance_uuid)
        for entry in self._entries.values():
            if entry.template is not None and entry.template.key == template.key:
                entry.clones += 1

    def wake(self) -> None:
        """A template may be missing: the builder looks again."""
        self._changed.set()
        self._changed = trio.Event()

    def describe(self) -> list[dict[str, Any]]:
        """Each configured template: its shape, whether it is built (and its key, sizes and build time), its
        counters (/v1/node)."""
        described = []
        for shape, entry in self._entries.items():
            built = entry.template
            described.append({**shape.describe(), "built": built is not None, "building": entry.building,
                              "key": built.key if built else "", "clones": entry.clones,
                              "state_bytes": built.record.get("state_bytes", 0) if built else 0,
                              "build_s": round(sum(built.record.get("timings_s", {}).values()), 3) if built else 0,
                              "failures": entry.backoff.failures, "last_error": entry.backoff.last_error})
        return described

    async def run(self, may_build: trio.Event, instances_dir: Path) -> None:
        """Once `may_build` is set (the backend's preflight passed): clean up, then keep every configured template
        built (module doc); until cancelled (a build in flight removes its domain and files)."""
        await may_build.wait()
        wanted = set()
        for entry in self._entries.values():
            try:
                image = await self._images.ensure(entry.settings.image_uuid)
                wanted.add((await self.store.key_of(self._spec_of(image, entry.settings)))[0])
            except Exception as exc:  # noqa: BLE001 - reported below, retried by the loop
                self._failed(entry, f"image {entry.settings.image_uuid}: {exc}")
        overlays = [path / OVERLAY for path in instances_dir.iterdir()] if instances_dir.is_dir() else []
        removed = await self.store.cleanup(wanted, overlays)
        if removed:
            log.info("templates: removed what nothing uses: %s", ", ".join(removed))
        while True:
            changed = self._changed
            due = self._next_to_build()
            if due is None:
                with trio.move_on_after(self._idle_wait()):
                    await changed.wait()
                continue
            await self._build(due)

    def _next_to_build(self) -> _Entry | None:
        now = trio.current_time()
        return next((e for e in self._entries.values() if e.template is None and e.backoff.due(now)), None)

    def _idle_wait(self) -> float:
        now = trio.current_time()
        waits = [max(e.backoff.retry_at - now, 0.0) for e in self._entries.values() if e.template is None]
        return min(waits, default=math.inf)

    async def _build(self, entry: _Entry) -> None:
        entry.building = True
        try:
            image = await self._images.ensure(entry.settings.image_uuid)
            entry.template = await self.store.ensure(self._spec_of(image, entry.settings))
        except Exception as exc:  # noqa: BLE001 - any failure of a build: reported, retried later
            self._failed(entry, str(exc) or type(exc).__name__)
            return
        finally:
            entry.building = False
        entry.backoff.succeeded()
        log.info("template %s ready (%s)", entry.template.key[:12], entry.settings.shape.label)

    def _failed(self, entry: _Entry, reason: str) -> None:
        log.warning("template %s: %s (next try in %g s)", entry.settings.shape.label, reason,
                    entry.backoff.failed(reason))
        self._host.emit("template_failed", image_uuid=entry.settings.image_uuid, reason=reason)


async def start_clone(hypervisor: Hypervisor, template: Template, spec: InstanceSpec, seed_instance_id: str,
                      instance_dir: Path, data_dir: Path, network: tuple[str, str],
                      ready_timeout_s: float) -> dict[str, float]:
    """Restore a clone of `template` as the instance's domain (``launcher-<uuid>``, its libvirt uuid, its
    metadata, its overlay, seed and console log in `instance_dir`), have the guest take the identity of its seed
    (`seed_instance_id`: the meta-data's instance-id, which need not be the instance uuid), give it its NIC
    (`network`: kind and source, the payload's MAC) and make it persistent (`clone_restore.restore_clone`); the
    seconds each step took. Raises (and leaves no domain) if any step fails."""
    uuid = spec.instance_uuid
    clone = save_image.CloneIdentity(
        name=domain.domain_name(uuid), uuid=domain.libvirt_uuid(uuid),
        metadata=domain.DomainMetadata(uuid, str(data_dir.absolute()), domain.domain_name(uuid)),
        template_key=template.key, overlay=instance_dir / OVERLAY, seed=instance_dir / SEED,
        console_log=instance_dir / CONSOLE_LOG, nvram=None if spec.legacy_boot else instance_dir / NVRAM)
    kind, source = network
    result = await clone_restore.restore_clone(hypervisor, template, clone, instance_id=seed_instance_id,
                                           mac=spec.networking.vnic_mac, network_kind=kind, network_source=source,
                                           ready_timeout_s=ready_timeout_s)
    return result.timings
