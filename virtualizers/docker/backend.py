"""The Docker Engine backend: containers run by the engine. `open_backend` is the ``docker`` entry point of
``launcher.virtualizers`` (an `OpenBackend`, launcher/plugin/protocol.py, which holds the contract).

`DockerBackend` is what the instances of one launcher share: the engine client (`engine`, engine.py), the image
loader (`loader`, images.py; it is no `ImageCatalog`: the engine keeps the images, so /v1/images shows none),
the event stream (`events`, events.py, a task of the backend's nursery for the backend's life) and the settings
(the ``docker:`` section, settings.py). Each instance gets a `DockerVirtualizer` (virtualizer.py).

- `preflight`: the engine answers (else a SetupError saying to start it: ``bash .ci/docker-up``), speaks the
  API version asked for, and has the configured network.
- `check_start`: a container needs ``docker_image`` (and no ``image_uuid``); its ``storage`` entries name
  existing volumes of the node's store (no boot, no local ones), which it mounts (mounts.py).
- `use_volume_store`: the node's volume store (another virtualizer's, as /v1/volumes serves it), kept as
  `node_volumes`; without one, a container has no volumes.
- At start-up, the orphan scan: a container labelled with this data dir but without an instance dir is reported
  (``orphan_container`` event) and removed only when ``docker.destroy_orphans`` is set.
- `destroy_all` (`launcher hard-reset`): removes every container labelled with this data dir, and no other, and
  unmounts their volumes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from launcher.plugin.errors import SetupError
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import VolumeCatalog
from launcher.plugin.settings import parse_section
from launcher.plugin.spec import InstanceSpec
from virtualizers.docker import container, mounts
from virtualizers.docker.engine import NOT_FOUND, Engine, EngineError, NoAnswer, open_engine, path_part
from virtualizers.docker.events import EventHub
from virtualizers.docker.images import ImageLoader, LoadProgress
from virtualizers.docker.settings import SECTION, DockerSettings
from virtualizers.docker.virtualizer import DockerVirtualizer

log = logging.getLogger(__name__)
MIB = 1 << 20


@attrs.define(eq=False)
class DockerBackend:
    """What the container instances of one launcher share (module doc)."""

    settings: DockerSettings
    host: BackendHost
    engine: Engine
    loader: ImageLoader
    events: EventHub
    name: str = attrs.field(default="docker", init=False)
    # The node's volume store, lent by the launcher (`use_volume_store`); not `volumes`, which would make it this
    # backend's own store, served at /v1/volumes.
    node_volumes: VolumeCatalog | None = attrs.field(default=None, init=False)

    def use_volume_store(self, store: VolumeCatalog) -> None:
        """Keep the node's volume store, whose raw volumes containers mount (`Backend.use_volume_store`)."""
        self.node_volumes = store

    def new_virtualizer(self) -> DockerVirtualizer:
        """A fresh DockerVirtualizer for one instance (`Backend.new_virtualizer`)."""
        return DockerVirtualizer(self)

    def check_start(self, spec: InstanceSpec) -> str | None:
        """A container needs docker_image and no image_uuid; its storage entries name existing volumes of the
        node's store, and none boots (`Backend.check_start`)."""
        if not spec.docker_image:
            return "start.docker_image: required for a container"
        if spec.image_uuid:
            return "start.image_uuid: must be empty for a container (its image is docker_image)"
        if spec.storage and self.node_volumes is None:
            return ("start.storage: this node has no volume store a container can use (enable a virtualizer that "
                    "keeps volumes, such as qemu)")
        for index, entry in enumerate(spec.storage):
            if entry.boot:
                return f"start.storage[{index}].boot: a container does not boot from a volume"
            if entry.local:
                return (f"start.storage[{index}].local: a container mounts existing volumes only (create a raw one "
                        "through /v1/volumes first)")
        if spec.privileged and not self.settings.allow_privileged:
            return ("start.requirements.privileged: privileged containers are not allowed on this node "
                    "(docker.allow_privileged)")
        return None

    async def preflight(self) -> None:
        """SetupError, with what to do, if the engine does not answer, is too old, or lacks the network."""
        try:
            version = await self.engine.call("GET", "/version")
        except NoAnswer as exc:
            raise SetupError(f"{SECTION}: the Docker Engine does not answer at {self.settings.socket}: start it "
                             f"(bash .ci/docker-up, or dockerd) or set docker.socket ({exc})") from exc
        except EngineError as exc:
            raise SetupError(f"{SECTION}: the Docker Engine at {self.settings.socket} refused API "
                             f"{self.settings.api_version} (docker.api_version): {exc.message}") from exc
        if self.settings.network:
            try:
                await self.engine.call("GET", f"/networks/{path_part(self.settings.network)}")
            except (EngineError, NoAnswer) as exc:
                raise SetupError(f"{SECTION}.network: the engine has no network {self.settings.network!r}: create "
                                 f"it (docker network create --subnet <cidr> {self.settings.network}) or set "
                                 f"docker.network to \"\" ({exc})") from exc
        log.info("docker virtualizer: engine %s (API %s) at %s, network %s, image dir %s",
                 version.get("Version") if isinstance(version, dict) else "?", self.settings.api_version,
                 self.settings.socket, self.settings.network or "(none)",
                 self.settings.image_root(self.host.data_dir))

    async def our_containers(self) -> list[tuple[str, str]]:
        """(name, instance uuid) of every container, running or not, labelled with this data dir."""
        found = await self.engine.call("GET", "/containers/json", params={
            "all": True, "filters": {"label": [container.data_dir_label(self.host.data_dir)]}})
        ours = []
        for item in found if isinstance(found, list) else []:
            names = item.get("Names") or []
            uuid = (item.get("Labels") or {}).get(container.LABEL_UUID, "")
            if names and (item.get("Labels") or {}).get(container.LABEL_DATA_DIR) == str(self.host.data_dir):
                ours.append((str(names[0]).lstrip("/"), str(uuid)))
        return ours

    async def _remove(self, name: str) -> None:
        try:
            await self.engine.call("DELETE", f"/containers/{path_part(name)}", params={"force": True, "v": True})
        except EngineError as exc:
            if exc.status != NOT_FOUND:
                raise

    async def destroy_all(self) -> list[str]:
        """Remove every container of this data dir (`launcher hard-reset`); their names."""
        try:
            names = [name for name, _ in await self.our_containers()]
            for name in names:
                await self._remove(name)
                log.warning("hard reset: container %s removed", name)
        except NoAnswer as exc:
            raise SetupError(f"{SECTION}: the Docker Engine does not answer at {self.settings.socket}: start it "
                             f"(bash .ci/docker-up) to remove this data dir's containers ({exc})") from exc
        for uuid in await mounts.instances_with_mounts(self.host.data_dir, self.host.limiter):
            try:
                for volume in await mounts.unmount_all(self.host.data_dir, uuid, self.host.limiter):
                    log.warning("hard reset: volume %s of instance %s unmounted", volume, uuid)
            except mounts.MountError as exc:
                raise SetupError(f"{SECTION}: {exc}") from exc
        return names

    async def handle_orphans(self) -> None:
        """Report (and, if configured, remove) our containers whose instance dir is gone; nothing if the engine
        does not answer (the preflight says so)."""
        try:
            ours = await self.our_containers()
        except (EngineError, NoAnswer):
            return
        for name, uuid in ours:
            if uuid and self.host.instance_dir(uuid).exists():
                continue
            destroy = self.settings.destroy_orphans
            log.warning("orphan container %s: no instance dir for %s; %s", name, uuid,
                        "removing it" if destroy else "left alone (docker.destroy_orphans is false)")
            self.host.emit("orphan_container", instance_uuid=uuid, container=name, destroyed=destroy)
            if destroy:
                await self._remove(name)


def report_progress(host: BackendHost, progress: LoadProgress) -> None:
    """A load's progress as an `image_progress` event (the qemu image store's fields; `image_uuid` is the image
    reference) and a launcher log line."""
    host.emit("image_progress", image_uuid=progress.image, done_bytes=progress.done_bytes,
              total_bytes=progress.total_bytes, source=progress.source, finished=progress.finished)
    total = "?" if progress.total_bytes is None else f"{progress.total_bytes / MIB:.1f}"
    log.info("image %s: %.1f of %s MiB from %s%s", progress.image, progress.done_bytes / MIB, total,
             progress.source, " (done)" if progress.finished else "")


@asynccontextmanager
async def open_backend(raw: Mapping[str, Any], host: BackendHost) -> AsyncIterator[DockerBackend]:
    """Open the docker backend (the `docker` entry point of `launcher.virtualizers`).

    SetupError if the settings are invalid. Whether the engine answers is `DockerBackend.preflight`'s job, which
    `launcher serve` calls (`launcher hard-reset` does not; its `destroy_all` says so if it cannot reach it)."""
    settings: DockerSettings = parse_section(DockerSettings, dict(raw), f"{SECTION}.")
    async with open_engine(settings.socket, settings.api_version, settings.call_timeout_s) as engine:
        loader = ImageLoader(engine, settings.image_root(host.data_dir), settings.pull, settings.image_timeout_s,
                             host.limiter, lambda progress: report_progress(host, progress))
        events = EventHub(engine, container.data_dir_label(host.data_dir), settings.poll_s)
        backend = DockerBackend(settings, host, engine, loader, events)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(events.run)
            try:
                await backend.handle_orphans()
                yield backend
            finally:
                nursery.cancel_scope.cancel()
