"""The virtualizer contract: what a virtualizer backend is and does (part of the plugin API, `launcher.plugin`).

The docstrings of this module are the one statement of that contract; the virtualizers' own docstrings say only
how they keep it. The pieces:

- `OpenBackend`: what the entry point a virtualizer registers under `ENTRY_POINT_GROUP` is; it yields a
- `Backend`: once per launcher process, holding what the VMs share (the simulation's VM table; a libvirt
  connection and an image store for QEMU), with optional parts found with `getattr` (`ImageCatalog`,
  `VolumeCatalog`, a preflight, `destroy_all`); it hands out one
- `Virtualizer` per instance, which its actor calls one call at a time; `monitor_vm` reports through a
  `MonitorInbox` (`MonitorEvent`) and `stats` gives `VmStats`.
- `ImageCatalog` / `ImageRecord` and `VolumeCatalog` / `VolumeInfo`: a backend's image and volume stores, served
  at /v1/images and /v1/volumes.

A failing virtualizer call raises `launcher.plugin.errors.VirtualizerError` whose code is the ciao code of its
phase (`image_failure`, `launch_failure`, ...; each method says which); any other exception is taken by the actor
for a bug of the virtualizer and reported with the same phase code. Neither ever crashes the launcher.
"""

from __future__ import annotations

import builtins
import enum
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

import attrs

from launcher.plugin.host import BackendHost
from launcher.plugin.spec import InstanceSpec

ENTRY_POINT_GROUP = "launcher.virtualizers"


class MonitorEvent(enum.Enum):
    """What a monitor session reports about its VM (`Virtualizer.monitor_vm`)."""

    CONNECTED = "connected"  # the VM is up
    CLOSED = "closed"  # the VM is down (or monitoring it became impossible)


class MonitorInbox(Protocol):
    """Where a monitor session posts its events; the actor reads them and calls connected()/lost_vm()."""

    async def send(self, event: MonitorEvent) -> None:
        """Post `event` to the instance's actor (it may wait while the actor's inbox is full)."""


@attrs.frozen
class VmStats:
    """Usage figures of one VM; -1 means "cannot know"."""

    memory_mb: int = -1  # PSS of the VM process, MiB
    cpu_percent: int = -1  # % of the allotted vCPUs since the previous call (100 = all busy)
    disk_mb: int = -1  # MiB allocated to the instance's own disk (the overlay)


class Virtualizer(Protocol):
    """One instance's VM, as its actor (the core's `InstanceActor`) drives it.

    Every method is called by the instance's actor, strictly one call at a time (`monitor_vm` excepted: it runs
    beside the others), so a virtualizer needs no lock. Async methods may be cancelled at any await. Each call
    is bounded by its phase's timeout (``timeouts.*`` of the launcher config, named below): a call that overruns
    it fails with the phase's code, as a `VirtualizerError` or any other exception does.

    Cancelling an actor or a monitor session stops watching, never the VM: a VM that outlives the launcher
    (qemu's domains, the simulation's process mode) is found again by ``monitor_vm(recover=True)`` when the
    launcher starts again."""

    def init(self, spec: InstanceSpec, instance_dir: Path, volumes: Callable[[], Sequence[str]]) -> None:
        """Remember the instance's spec, directory and volumes. No I/O; cannot fail.

        `volumes()` gives the ids of the volumes the instance has now, in disk order (the START's `storage`
        entries, less those detached since, then those attached since): the actor's list, which the record keeps.
        The virtualizer reads it when it needs it (create_image, start_vm, delete_image) and keeps no copy."""

    async def ensure_backing_image(self) -> None:
        """Make the image the instance boots from available (fetch or import it once, if the backend keeps
        images), and check that the START's volumes exist (`launcher.plugin.volumes.check_storage`); an instance
        with no image boots from its ``boot: true`` volume. First call of a START.

        Bounded by ``timeouts.ensure_image_s``. Fails with image_failure."""

    async def create_image(self, user_data: str, meta_data: str, network_config: str | None) -> None:
        """Create the per-instance disk and cloud-init data (qemu: the overlay and the seed), and the START's
        ``local`` volumes. Called after ensure_backing_image.

        May be called again after a partial earlier attempt (launcher killed mid-START): it must overwrite. The
        actor passes ``network_config=None``: the virtualizer derives the guest's network from
        ``spec.networking`` (a value would replace the derived network-config of a NoCloud seed).
        The instance dir exists, but its name is not yet durable (the instance log would make it again, holding
        instance.json alone): files written into it that must survive a power loss need an fsync of its parent
        first (``files.fsync_dir(instance_dir.parent)``, as qemu's does).
        Bounded by ``timeouts.create_image_s``. Fails with image_failure."""

    async def delete_image(self) -> None:
        """Remove what the instance keeps outside its dir (qemu: destroy and undefine the domain with its
        NVRAM) and the START's ``ephemeral`` volumes still among `volumes()`; never the shared backing image, nor
        any other volume. Called by a DELETE, after the VM is down (or forced off).

        Bounded by ``timeouts.delete_image_s``. A failure is logged, not reported: the actor removes the instance
        dir anyway (as ciao's delete did)."""

    async def start_vm(self) -> None:
        """Boot the VM from what create_image made, with the instance's volumes in `volumes()`'s order; return
        once it is started (not necessarily up: monitor_vm says when). A VM of this instance that already runs
        (an earlier start that overran its bound went through after all) may be adopted or refused.

        Bounded by ``timeouts.start_vm_s``; then the VM has ``timeouts.boot_s`` to come up. Fails with
        launch_failure."""

    async def monitor_vm(self, inbox: MonitorInbox, recover: bool) -> None:
        """Watch the VM: send CONNECTED once it runs and CLOSED once it does not, then return.

        It runs in a monitor session beside the other calls, not bounded. It only reads and reports, never
        changes the VM (a crashed guest is reported, not restarted); "no answer" (a hypervisor that does not
        respond) is not "down": it waits and asks again. Cancelling this task stops watching, never the VM. With
        recover=True (launcher start-up) it must tell a VM that is gone (send CLOSED) from one still running
        (send CONNECTED)."""

    async def stop_vm(self, grace: float) -> None:
        """Ask the guest to power off (the power button), force it off after `grace` seconds (at once for 0);
        return once it is down. A VM that is down already is fine.

        Bounded by `grace` + ``timeouts.stop_margin_s`` (`grace` is ``timeouts.stop_grace_s`` or the command's).
        Fails with stop_failure."""

    async def stats(self) -> VmStats:
        """The VM's current usage figures, -1 for what it cannot know (a VM that does not run: all -1, or 0 disk
        where it has none of its own). Asked by the stats poller of a running instance.

        Bounded by ``timeouts.stats_s``; a failure is logged and the figures read as unknown."""

    async def attach_volume(self, volume_id: str) -> None:
        """Hot-plug the volume (of the backend's `volumes` store) into a VM that runs; for one that does not,
        only check that the volume exists (the actor has already added it to `volumes()`, which the next start
        reads). The VM is unchanged on failure.

        Bounded by ``timeouts.volume_s``. Fails with attach_failure, not_found (no such volume) or not_supported
        (no volume store, or no hot-plug)."""

    async def detach_volume(self, volume_id: str) -> None:
        """Hot-unplug the volume from a VM that runs, once the guest has let go of it; nothing for one that does
        not. The actor checks it is one of the instance's volumes and not its boot volume, and takes it out of
        `volumes()` once this has returned.

        Bounded by ``timeouts.volume_s``: a guest that does not let go within it fails the call with
        detach_failure, and the disk stays."""

    def connected(self) -> None:
        """Bookkeeping when the actor learns the VM is up (e.g. find its pid for stats). No I/O; cannot fail."""

    def lost_vm(self) -> None:
        """Bookkeeping when the actor learns the VM is down (forget its pid). No I/O; cannot fail."""

    # Optional: ``start_path: str``, how the VM that runs now (or ran last) was started: one of START_PATHS.
    # The actor reads it (`start_path_of`) once start_vm has returned and once a recovered VM is found running,
    # for the instance's `running` event and GET /v1/instances/{uuid}. Without it every start is "cold".


START_PATHS = ("cold", "pool", "template")


def start_path_of(vm: Virtualizer) -> str:
    """How `vm` was started (its optional `start_path`): "cold" (booted from nothing), "pool" (a prepared slot
    claimed, `launcher.plugin.warm`) or "template" (a clone of a booted template restored)."""
    path: str = getattr(vm, "start_path", "cold")
    return path


class Backend(Protocol):
    """Per-process state of one virtualizer kind, from its `OpenBackend` until the launcher ends.

    Optional parts, which the launcher finds with `getattr`:

    - ``images: ImageCatalog``: served at /v1/images (`image_catalog`); without one those routes answer 404.
    - ``volumes: VolumeCatalog``: served at /v1/volumes (`volume_catalog`); without one those routes answer
      501, and a START that names volumes fails.
    - ``async preflight() -> None``: raises SetupError (one line that says what to do) if the host cannot run
      its VMs as configured; `launcher serve` awaits it before it serves (`launcher hard-reset` does not).
    - ``async destroy_all() -> list[str]``: `launcher hard-reset` calls it to destroy the VMs of this data dir
      that outlive the launcher process; their names.
    - ``use_volume_store(store: VolumeCatalog) -> None``: a backend that keeps no volumes of its own but can give
      its instances those of the node's store (the one /v1/volumes serves: another virtualizer's) is handed it
      once every backend has run its preflight, before any instance is recovered or started. No I/O.
    - ``check_start(spec: InstanceSpec) -> str | None``: why this virtualizer cannot run `spec` as given, as
      "start.<field>: <reason>" (which image field it needs, what it does not support), or None. No I/O: the
      supervisor calls it at dispatch, before admission, and refuses the START with invalid_data.
    - ``warm: launcher.plugin.warm.WarmPools``: prepared pools of VMs made ahead of any START, which admission
      counts, the supervisor sets aside for an admitted START of their shape and keeps filled
      (`launcher.plugin.warm` says how).
    - ``templates: TemplateCatalog``: booted templates the backend restores clones of (qemu's ``qemu.templates``);
      GET /v1/node lists them (`template_catalog`).

    `name` is the virtualizer's entry-point name, and the ``vm_type`` of the STARTs it runs.
    """

    name: str

    def new_virtualizer(self) -> Virtualizer:
        """A fresh, uninitialised Virtualizer for one instance (its actor calls `init` first)."""


def start_problem(backend: Backend, spec: InstanceSpec) -> str | None:
    """The backend's `check_start` verdict on `spec`, or None if it has no such check."""
    check: Callable[[InstanceSpec], str | None] | None = getattr(backend, "check_start", None)
    return None if check is None else check(spec)


class TemplateCatalog(Protocol):
    """A backend's booted templates, if it keeps any (its `templates` attribute)."""

    @property
    def configured(self) -> bool:
        """Whether any template is configured."""

    def describe(self) -> list[dict[str, Any]]:
        """Each configured template: its shape, whether it is built, its counters, as JSON-able data."""


def template_catalog(backend: Backend) -> TemplateCatalog | None:
    """The backend's templates (its `templates` attribute), or None if it keeps none or has none configured."""
    catalog: TemplateCatalog | None = getattr(backend, "templates", None)
    return catalog if catalog is not None and catalog.configured else None


def image_catalog(backend: Backend) -> ImageCatalog | None:
    """The backend's image store (its `images` attribute), or None if it keeps no images."""
    catalog: ImageCatalog | None = getattr(backend, "images", None)
    return catalog


class ImageRecord(Protocol):
    """One image of an `ImageCatalog`, as /v1/images shows it."""

    id: str
    last_used: float  # epoch seconds

    def record(self) -> dict[str, Any]:
        """What the image is (format, sizes, digest, source, ...), as JSON-able data."""


class ImageCatalog(Protocol):
    """A backend's store of backing images, if it has one (its `images` attribute); served at /v1/images.

    Image ids follow `launcher.plugin.spec.is_valid_image_id`. `in_use` arguments are live collections of the
    image ids that instances use (in any state): an image in use is never removed. The store serialises the
    operations on one id, so that an image being imported is never removed. Failures raise VirtualizerError
    (code image_failure, or image_in_use) with a reason naming the image or source; a source outside the
    allowed import sources is a LauncherError invalid_data."""

    gc_age_s: float  # what `gc` removes by default: images unused for longer than this

    def list(self) -> list[ImageRecord]:
        """Every image of the store, by id. No I/O."""

    async def import_(self, source: str, image_id: str, *, expected_sha256: str | None = None,
                      on_progress: Callable[[Any], None] | None = None) -> ImageRecord:
        """Import `source` (a path or URL the store allows, `check_source`) as the new image `image_id`; if
        `expected_sha256` is given the image must have it. Replaces nothing (an existing id fails), and leaves
        nothing behind on failure or cancellation. `on_progress` gets attrs objects with (at least) done_bytes,
        total_bytes and finished, while it copies and once when it is done."""

    async def check_source(self, source: str) -> None:
        """A LauncherError (invalid_data) if `source` may not be imported from; `import_` checks it too."""

    async def remove(self, image_id: str, in_use: Collection[str]) -> None:
        """Remove the image: image_in_use if it is in `in_use`, image_failure if the store has no such image."""

    async def gc(self, in_use: Collection[str], older_than_s: float) -> builtins.list[str]:
        """Remove every image not in `in_use` that was last used (imported, or booted from) more than
        `older_than_s` seconds ago; their ids."""


def volume_catalog(backend: Backend) -> VolumeCatalog | None:
    """The backend's volume store (its `volumes` attribute), or None if it keeps no volumes (or has not opened
    its store)."""
    catalog: VolumeCatalog | None = getattr(backend, "volumes", None)
    return catalog


VOLUME_FORMATS = ("qcow2", "raw")
MAX_VOLUME_MB = 64 << 20  # 64 TiB: a larger volume is a mistake, not a plan
MAX_VOLUME_ID_LEN = 64
_VOLUME_ID_RE = re.compile(r"[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*")


def is_valid_volume_id(volume_id: str) -> bool:
    """Whether `volume_id` has a volume id's shape: hex groups joined by '-' (what the launcher's uuid check
    accepts), at most MAX_VOLUME_ID_LEN characters. The caller of a `VolumeCatalog` has checked it; a store checks
    it again before it makes a name of it (defence in depth)."""
    return len(volume_id) <= MAX_VOLUME_ID_LEN and _VOLUME_ID_RE.fullmatch(volume_id) is not None


@attrs.frozen
class VolumeInfo:
    """One volume of a backend's volume store. `source_image`: the backing image it was made from ("" if blank);
    a volume made from an image is `bootable`."""

    id: str
    size_mb: int  # capacity, as the guest sees it
    allocation_mb: int  # space it takes on the host now
    format: str  # one of VOLUME_FORMATS
    source_image: str = ""
    clone: str = ""  # "cow" (a copy-on-write child of the image) or "copy" (a full copy); "" without image
    path: str = ""  # where the host keeps it (a file for a dir pool), for operators

    @property
    def bootable(self) -> bool:
        """Whether it was made from an image (and so holds something to boot)."""
        return bool(self.source_image)


class VolumeCatalog(Protocol):
    """A backend's store of volumes, if it has one (its `volumes` attribute); served at /v1/volumes.

    Volume ids are uuids (`is_valid_volume_id`), checked by the caller. The store serialises the operations on
    one id (`launcher.plugin.locks.KeyedLocks`). Which instance uses a volume is the launcher's business, not the
    store's: the caller refuses to delete or resize a volume in use. Failures raise LauncherError: `not_found`
    (no such volume), `volume_exists`, `invalid_data` (a source image that does not exist, a size smaller than
    it, shrinking), `storage_full`, `volume_failure` (anything else the store refused), with a reason naming
    what."""

    async def list(self) -> builtins.list[VolumeInfo]:
        """Every volume of the store, by id."""

    async def get(self, volume_id: str) -> VolumeInfo:
        """The volume, or LauncherError not_found."""

    async def create(self, volume_id: str, size_mb: int, fmt: str, *, source_image: str = "",
                     clone: str = "cow") -> VolumeInfo:
        """A new volume of `size_mb` (1..MAX_VOLUME_MB) in `fmt`: blank, or made from the backing image
        `source_image` as a copy-on-write child (`clone="cow"`, qcow2 only) or a full copy (`"copy"`); a
        `size_mb` of 0 with an image means the image's size. Nothing is left behind on failure."""

    async def delete(self, volume_id: str) -> None:
        """Delete the volume and what the store keeps about it; not_found if there is none."""

    async def resize(self, volume_id: str, size_mb: int) -> VolumeInfo:
        """Grow the volume to `size_mb` (shrinking is invalid_data: it would cut the guest's file system)."""


OpenBackend = Callable[[Mapping[str, Any], BackendHost], AbstractAsyncContextManager[Backend]]
"""What the entry point a virtualizer registers under `ENTRY_POINT_GROUP` (named after it, e.g. ``qemu``) must
be: called with that virtualizer's section of the launcher config, raw (e.g. the ``simulation:`` mapping), and
the `BackendHost` the launcher lends it, it returns an async context manager that yields its `Backend`.

It validates its section with `launcher.plugin.settings.parse_section` and raises
`launcher.plugin.errors.SetupError` (one line that says what to do) for a bad setting or a host it cannot run on.
The backend lives until the context exits, when the launcher ends; VMs that outlive the launcher process keep
running."""
