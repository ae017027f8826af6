"""The Virtualizer contract: what a virtualizer backend is and does (part of the plugin API, `launcher.plugin`).

A *backend* exists once per launcher process and holds what its VMs share (the fake hypervisor of the
simulation, a libvirt connection and image store for QEMU). It hands out one `Virtualizer` per instance.

Every `Virtualizer` method is called by the instance's actor, strictly one call at a time, so a virtualizer
needs no locking. Async methods may be cancelled at any await. A failing call raises
`launcher.plugin.errors.VirtualizerError` whose code is the ciao code of the phase (`image_failure`,
`launch_failure`, ...); any other exception is treated by the actor as a bug of the virtualizer and reported
with the same phase code.
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
    CONNECTED = "connected"  # the VM is up
    CLOSED = "closed"  # the VM is down (or monitoring it became impossible)


class MonitorInbox(Protocol):
    """Where a monitor session posts its events; the actor reads them and calls connected()/lost_vm()."""

    async def send(self, event: MonitorEvent) -> None: ...


@attrs.frozen
class VmStats:
    """Usage figures of one VM; -1 means "cannot know"."""

    memory_mb: int = -1  # PSS of the VM process, MiB
    cpu_percent: int = -1  # % of the allotted vCPUs since the previous call (100 = all busy)
    disk_mb: int = -1  # MiB allocated to the instance's own disk (the overlay)


class Virtualizer(Protocol):
    def init(self, spec: InstanceSpec, instance_dir: Path, volumes: Callable[[], Sequence[str]]) -> None:
        """Remember the instance's spec, directory and volumes. No I/O.

        `volumes()` gives the ids of the volumes the instance has now, in disk order (the START's `storage`
        entries, less those detached since, then those attached since): the actor's list, which the record keeps.
        The virtualizer reads it when it needs it (create_image, start_vm, delete_image) and keeps no copy."""

    async def ensure_backing_image(self) -> None:
        """Make the image the instance boots from available. Fails with image_failure."""

    async def create_image(self, user_data: str, meta_data: str, network_config: str | None) -> None:
        """Create the per-instance disk and cloud-init seed. Fails with image_failure.

        May be called again after a partial earlier attempt (launcher killed mid-START): it must overwrite."""

    async def delete_image(self) -> None:
        """Remove per-instance state kept outside the instance dir; never the shared backing image."""

    async def start_vm(self) -> None:
        """Boot the VM. Fails with launch_failure."""

    async def monitor_vm(self, inbox: MonitorInbox, recover: bool) -> None:
        """Watch the VM: send CONNECTED once it runs and CLOSED once it does not, then return.

        Cancelling this task stops watching, never the VM. With recover=True (launcher start-up) it must tell
        a VM that is gone (send CLOSED) from one still running (send CONNECTED)."""

    async def stop_vm(self, grace: float) -> None:
        """Ask the guest to power off, force it off after `grace` seconds; return once it is down."""

    async def stats(self) -> VmStats:
        """Current usage figures."""

    async def attach_volume(self, volume_id: str) -> None:
        """Hot-plug the volume (of the backend's `volumes` store) into a VM that runs; for one that does not,
        only check that the volume exists (the actor has already added it to `volumes()`, which the next start
        reads). Fails with attach_failure, not_found (no such volume) or not_supported (no volume store, or no
        hot-plug); the VM is unchanged on failure."""

    async def detach_volume(self, volume_id: str) -> None:
        """Hot-unplug the volume from a VM that runs, once the guest has let go of it (a guest that does not
        within the actor's bound fails the call: detach_failure, the disk stays); nothing for one that does not.
        The actor checks it is one of the instance's volumes and not its boot volume, and takes it out of
        `volumes()` once this has returned."""

    def connected(self) -> None:
        """Bookkeeping when the actor learns the VM is up (e.g. find its pid)."""

    def lost_vm(self) -> None:
        """Bookkeeping when the actor learns the VM is down."""


class Backend(Protocol):
    """Per-process state of one virtualizer kind."""

    name: str

    def new_virtualizer(self) -> Virtualizer:
        """A fresh, uninitialised Virtualizer for one instance."""

    # A backend with backing images also has `images: ImageCatalog` (see `image_catalog`), and one with volumes
    # `volumes: VolumeCatalog` (see `volume_catalog`).
    # A backend may also have `async preflight() -> None`, which raises SetupError (one line that says what to
    # do) if the host cannot run its VMs as configured; `launcher serve` awaits it before it serves.


def image_catalog(backend: Backend) -> ImageCatalog | None:
    catalog: ImageCatalog | None = getattr(backend, "images", None)
    return catalog


class ImageRecord(Protocol):
    id: str
    last_used: float  # epoch seconds

    def record(self) -> dict[str, Any]:
        """What the image is (format, sizes, digest, source, ...), as JSON-able data."""


class ImageCatalog(Protocol):
    """A backend's store of backing images, if it has one (its `images` attribute); served at /v1/images.

    `in_use` arguments are live collections of the image ids that instances use: an image in use is never
    removed. Failures raise VirtualizerError (code image_failure, or image_in_use)."""

    gc_age_s: float  # what `gc` removes by default: images unused for longer than this

    def list(self) -> list[ImageRecord]: ...

    async def import_(self, source: str, image_id: str, *, expected_sha256: str | None = None,
                      on_progress: Callable[[Any], None] | None = None) -> ImageRecord:
        """on_progress gets attrs objects with (at least) done_bytes, total_bytes and finished."""

    async def check_source(self, source: str) -> None:
        """A LauncherError (invalid_data) if `source` may not be imported from; `import_` checks it too."""

    async def remove(self, image_id: str, in_use: Collection[str]) -> None: ...

    async def gc(self, in_use: Collection[str], older_than_s: float) -> builtins.list[str]: ...


def volume_catalog(backend: Backend) -> VolumeCatalog | None:
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
        return bool(self.source_image)


class VolumeCatalog(Protocol):
    """A backend's store of volumes, if it has one (its `volumes` attribute); served at /v1/volumes.

    Volume ids are uuids (hex groups joined by '-', what `launcher.payloads.is_valid_uuid` accepts), checked by
    the caller. The store serialises the operations on one id (`launcher.plugin.locks.KeyedLocks`). Which
    instance uses a volume is the launcher's business, not the store's: the caller refuses to
    delete or resize a volume in use. Failures raise LauncherError: `not_found` (no such volume),
    `volume_exists`, `invalid_data` (a source image that does not exist, a size smaller than it, shrinking),
    `storage_full`, `volume_failure` (anything else the store refused), with a reason naming what."""

    async def list(self) -> builtins.list[VolumeInfo]: ...

    async def get(self, volume_id: str) -> VolumeInfo:
        """The volume, or LauncherError not_found."""

    async def create(self, volume_id: str, size_mb: int, fmt: str, *, source_image: str = "",
                     clone: str = "cow") -> VolumeInfo:
        """A new volume of `size_mb` (1..MAX_VOLUME_MB) in `fmt`: blank, or made from the backing image
        `source_image` as a copy-on-write child (`clone="cow"`, qcow2 only) or a full copy (`"copy"`); a
        `size_mb` of 0 with an image means the image's size. Nothing is left behind on failure."""

    async def delete(self, volume_id: str) -> None: ...

    async def resize(self, volume_id: str, size_mb: int) -> VolumeInfo:
        """Grow the volume to `size_mb` (shrinking is invalid_data: it would cut the guest's file system)."""


# What the entry point named after a virtualizer must be: called with that virtualizer's section of the
# launcher config (e.g. the `simulation:` mapping) and the host. It raises launcher.plugin.errors.SetupError (one line
# that says what to do) on bad settings or a host it cannot run on.
OpenBackend = Callable[[Mapping[str, Any], BackendHost], AbstractAsyncContextManager[Backend]]
