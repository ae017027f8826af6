"""The backing-image store of the QEMU virtualizer.

Instances boot from a copy-on-write qcow2 overlay on a shared *backing image*. This module keeps those images,
keyed by the START payload's ``image_uuid``; it is the backend's `images`, a `launcher.plugin.protocol.ImageCatalog`
served at /v1/images. The layout of the store's root directory::

    <id>.img    the image, in the format it came in (qcow2 or raw; never converted)
    <id>.json   its metadata, written last and atomically: the commit marker. No json, no image.
    .tmp/       imports in progress

An import (`ImageStore.import_`, or `ensure` finding the image in a search dir or at the URL template) runs the
pipeline of image_import.py into ``.tmp/`` (stream, hash, verify the digest, ``qemu-img info``, fsync), then
renames the file into place and writes the json. A failure or a cancellation before the json is written leaves
nothing behind; what a crash leaves (temp files, images without json) is removed by `ImageStore.open`. One
process owns a store.

`ImageStore.import_` (the images API) reads only from the allow-list of `virtualizers.qemu.import_policy`;
redirects are followed only within it, by every import; no import may be larger than the store's `max_bytes`.

Concurrency: every operation on an image id holds that id's lock, so concurrent `ImageStore.ensure` calls import
an image once (the others wait, then find it in the store), and `remove` / `gc` never delete an image that is
being imported or ensured. File work runs in worker threads under the shared limiter.
"""

from __future__ import annotations

import builtins
import datetime
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from launcher.plugin.files import atomic_write, fsync_dir, make_dirs
from launcher.plugin.locks import KeyedLocks
from launcher.plugin.spec import is_valid_image_id
from virtualizers.qemu.image_errors import ImageError, ImageInUse, ImageNotFound
from virtualizers.qemu.image_import import FORMATS, ImportPipeline, Progress, ProgressCallback, parse_digest
from virtualizers.qemu.import_policy import ImportPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

TMP_DIR = ".tmp"
IMAGE_SUFFIX = ".img"
RECORD_SUFFIX = ".json"
SEARCH_NAMES = ("{id}", "{id}.img", "{id}.qcow2", "{id}.raw")  # what ensure() looks for in a search dir
DEFAULT_MAX_BYTES = 64 << 30  # qemu.image_max_bytes: no import may be larger (the download is stopped there)
IMAGE_MODE = 0o640  # owner (the launcher) and QEMU's group read it; nobody else (see `ImageStore.share_with_group`)
_RECORD_FIELDS = ("id", "format", "virtual_size", "size", "sha256", "source", "imported_at", "sha256_verified")


@attrs.frozen
class ImageInfo:
    """One committed image of the store."""

    id: str
    path: Path  # <root>/<id>.img
    format: str  # "qcow2" or "raw": what the overlay's backing format must say
    virtual_size: int  # bytes the guest sees
    size: int  # bytes of the file
    sha256: str  # of the file as imported
    source: str  # where it was imported from (a path or URL)
    imported_at: str  # ISO-8601, UTC
    sha256_verified: bool  # the caller or the source gave a digest, and it matched
    last_used: float  # mtime of the json file: the import, or the last ensure() of the image

    def record(self) -> dict[str, Any]:
        """The content of the json file."""
        return {name: getattr(self, name) for name in _RECORD_FIELDS}



class ImageStore:
    """The backing images of one node, under `root`.

    `search_dirs` and `url_template` (``str.format`` with ``{id}``: a path or a file/http/https URL) are where
    `ensure` looks for an image it does not have. `import_` reads only from those places and `import_sources`
    (`virtualizers.qemu.import_policy`); every HTTP redirect, of `ensure` too, must stay within them. No import may be
    larger than `max_bytes`. Imported images have mode `IMAGE_MODE` (group: see `share_with_group`).
    `limiter` is the launcher's shared limiter of worker threads.
    `on_progress` receives the progress of imports that were not given their own callback, at most every
    `progress_interval_s` while copying plus once when finished. `http_timeout_s` bounds each HTTP wait
    (connect, every read), not a whole download. `gc_age_s` is the age past which an unused image is garbage
    when the caller of `gc` does not say.

    Call `open` before anything else. All methods must be called from the Trio thread.
    """

    def __init__(self, root: Path, *, search_dirs: Sequence[Path] = (), url_template: str | None = None,
                 limiter: trio.CapacityLimiter, on_progress: ProgressCallback | None = None,
                 progress_interval_s: float = 1.0, http_timeout_s: float = 60.0,
                 gc_age_s: float = 7 * 86400.0, import_sources: Sequence[str] = (),
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if url_template is not None:
            try:
                url_template.format(id="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"url_template {url_template!r} must use {{id}} only: {exc!r}") from None
        self._policy = ImportPolicy.from_settings(search_dirs, url_template, import_sources)
        self._pipeline = ImportPipeline(self._policy, limiter, max_bytes, http_timeout_s)
        self._group: int | None = None
        self._root = root
        self._search_dirs = tuple(search_dirs)
        self._url_template = url_template
        self._limiter = limiter
        self._on_progress = on_progress
        self._progress_interval_s = progress_interval_s
        self.gc_age_s = gc_age_s
        self._index: dict[str, ImageInfo] = {}
        self._locks = KeyedLocks()  # one operation per id at a time

    def share_with_group(self, gid: int) -> None:
        """Give the images imported from now on to group `gid` (QEMU's, so that it can read them even where
        libvirt does not chown disks); until then they keep the launcher's group."""
        self._group = gid

    async def open(self) -> None:
        """Create the store if needed, remove what a crash left (temp files, images without json, json without
        image) and load the committed images."""
        try:
            self._index = await self._run(self._load)
        except OSError as exc:
            raise ImageError(f"cannot open the image store {self._root}: {exc}") from exc

    def get(self, image_id: str) -> ImageInfo | None:
        """The committed image `image_id`, or None."""
        return self._index.get(image_id)

    def list(self) -> builtins.list[ImageInfo]:
        """Every committed image, by id."""
        return sorted(self._index.values(), key=lambda info: info.id)

    async def ensure(self, image_id: str) -> ImageInfo:
        """Make `image_id` available and return it; marks it used now (so `gc` keeps it).

        Looks in the store, then in the search dirs (the first holding ``<id>``, ``<id>.img``, ``<id>.qcow2`` or
        ``<id>.raw``), then at `url_template`; imports from the first place that has it. Concurrent calls for
        one id import it once. Raises ImageNotFound naming every place looked at, or ImageError if the import
        fails."""
        _check_id(image_id)
        async with self._locks.hold(image_id):
            if image_id in self._index:
                return await self._touch(image_id)
            try:
                found = await self._run(self._search, image_id)
            except OSError as exc:
                raise ImageError(f"cannot search for image {image_id!r}: {exc}") from exc
            if found is not None:
                return await self._import_locked(str(found), image_id, None, None, confined=False)
            places = [f"not in the store {self._root}"]
            if self._search_dirs:
                names = ", ".join(name.format(id=image_id) for name in SEARCH_NAMES)
                places.append(f"not in {', '.join(map(str, self._search_dirs))} (as {names})")
            if self._url_template is not None:
                try:
                    return await self._import_locked(self._url_template.format(id=image_id), image_id, None, None,
                                                     confined=False)
                except ImageNotFound as exc:
                    places.append(str(exc))
            raise ImageNotFound(f"image {image_id!r} not found: {'; '.join(places)}")

    async def import_(self, source: str, image_id: str, *, expected_sha256: str | None = None,
                      on_progress: ProgressCallback | None = None) -> ImageInfo:
        """Import `source` (a local path, or a file://, http:// or https:// URL) as `image_id`.

        SourceRefused (``invalid_data``) if `source` is not within the allow-list (`check_source`). The
        image's sha256 must be `expected_sha256` if given, else the digest the source publishes in
        ``<source>.sha256`` if it does. Replaces nothing: ImageError if `image_id` exists. ImageNotFound if the
        source does not exist; ImageError for any other failure. Either way, and if cancelled, nothing is left
        in the store."""
        _check_id(image_id)
        await self.check_source(source)
        async with self._locks.hold(image_id):
            return await self._import_locked(source, image_id, expected_sha256, on_progress, confined=True)

    async def check_source(self, source: str) -> None:
        """SourceRefused unless `source` is within the allow-list; the same answer whatever is at that place."""
        await self._run(self._policy.check, source)

    async def remove(self, image_id: str, in_use: Collection[str]) -> None:
        """Remove `image_id`. ImageInUse if it is in `in_use`, ImageNotFound if the store does not have it."""
        async with self._locks.hold(image_id):
            if image_id in in_use:
                raise ImageInUse(f"image {image_id!r} is in use")
            if image_id not in self._index:
                raise ImageNotFound(f"image {image_id!r} is not in the store {self._root}")
            await self._delete(image_id)

    async def gc(self, in_use: Collection[str], older_than_s: float) -> builtins.list[str]:
        """Remove every image not in `in_use` that was last used more than `older_than_s` seconds ago (the
        json's mtime, so a ``touch`` by an operator counts too); return their ids.

        Each image is judged under its lock, with `in_use` and its json read then: an image ensured after gc
        started is kept (ensure marks it used). Between ensure() and the caller adding the image to `in_use`,
        only that fresh last_used protects it, so `older_than_s` must exceed that gap."""
        cutoff = time.time() - older_than_s
        removed = []
        for image_id in sorted(self._index.keys() - set(in_use)):
            async with self._locks.hold(image_id):
                if image_id in in_use or image_id not in self._index:
                    continue
                if await self._refresh_last_used(image_id) < cutoff:
                    await self._delete(image_id)
                    removed.append(image_id)
        return removed

    # Imports.

    async def _import_locked(self, source: str, image_id: str, expected_sha256: str | None,
                             on_progress: ProgressCallback | None, *, confined: bool) -> ImageInfo:
        """import_() with the id's lock held. `confined`: a local source must be within the allow-list (else it
        is one of the search dirs' files that `ensure` found, which the operator put there, links included)."""
        if image_id in self._index:
            raise ImageError(f"image {image_id!r} already exists in the store")
        expected = None if expected_sha256 is None else parse_digest(expected_sha256.encode(), "expected_sha256")
        progress = Progress(on_progress or self._on_progress, image_id, source, self._progress_interval_s)
        tmp = self._root / TMP_DIR / f"{image_id}.{secrets.token_hex(4)}"
        try:
            info = await self._import_into(tmp, source, image_id, expected, progress, confined)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._run(_remove_quietly, tmp)
            raise
        self._index[image_id] = info
        progress.finish()
        return info

    async def _import_into(self, tmp: Path, source: str, image_id: str, expected: str | None,
                           progress: Progress, confined: bool) -> ImageInfo:
        """Fetch `source` into `tmp` (image_import.py) and commit it; the caller removes `tmp` if this fails."""
        try:
            fetched = await self._pipeline.fetch(source, tmp, expected, progress, confined)
            info = ImageInfo(id=image_id, path=self._root / f"{image_id}{IMAGE_SUFFIX}", format=fetched.format,
                             virtual_size=fetched.virtual_size, size=fetched.size, sha256=fetched.sha256,
                             source=source,
                             imported_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                             sha256_verified=fetched.verified, last_used=0.0)
            return attrs.evolve(info, last_used=await self._run(self._commit, tmp, info))
        except OSError as exc:
            raise ImageError(f"cannot import {image_id!r} from {source}: {exc}") from exc

    def _commit(self, tmp: Path, info: ImageInfo) -> float:
        """Rename the image into place, then write its json (the commit); returns the json's mtime. If this
        fails, neither file is left. Blocks."""
        record = self._record_path(info.id)
        try:
            if self._group is not None:
                os.chown(tmp, -1, self._group)
            os.chmod(tmp, IMAGE_MODE)
            os.replace(tmp, info.path)
            fsync_dir(self._root)  # the image's name is durable before the json that commits it
            atomic_write(record, json.dumps(info.record(), indent=2, sort_keys=True).encode() + b"\n")
            return record.stat().st_mtime
        except BaseException:
            _remove_quietly(record)
            _remove_quietly(info.path)
            raise

    # Lookups, use marks and removal.

    def _search(self, image_id: str) -> Path | None:
        """The first file of the search dirs that may be `image_id`. Blocks."""
        for directory in self._search_dirs:
            for name in SEARCH_NAMES:
                candidate = directory / name.format(id=image_id)
                if candidate.is_file():
                    return candidate
        return None

    async def _touch(self, image_id: str) -> ImageInfo:
        """Mark `image_id` used now (the mtime of its json)."""
        try:
            last_used = await self._run(_touch, self._record_path(image_id))
        except OSError as exc:
            raise ImageError(f"cannot mark image {image_id!r} used: {exc}") from exc
        self._index[image_id] = info = attrs.evolve(self._index[image_id], last_used=last_used)
        return info

    async def _refresh_last_used(self, image_id: str) -> float:
        """Read `image_id`'s last use from its json (someone else may have touched it)."""
        try:
            last_used = (await self._run(os.stat, self._record_path(image_id))).st_mtime
        except OSError as exc:
            raise ImageError(f"cannot read the metadata of image {image_id!r}: {exc}") from exc
        self._index[image_id] = attrs.evolve(self._index[image_id], last_used=last_used)
        return last_used

    async def _delete(self, image_id: str) -> None:
        """Un-commit `image_id` (remove its json), then remove the image file."""
        info = self._index.pop(image_id)
        try:
            await self._run(self._delete_files, info)
        except OSError as exc:
            raise ImageError(f"cannot remove image {image_id!r}: {exc}") from exc

    def _delete_files(self, info: ImageInfo) -> None:
        self._record_path(info.id).unlink()
        fsync_dir(self._root)
        info.path.unlink(missing_ok=True)
        fsync_dir(self._root)

    # Start-up.

    def _load(self) -> dict[str, ImageInfo]:
        """Create the dirs, remove a crash's leftovers, read the committed images. Blocks."""
        tmp_dir = self._root / TMP_DIR
        make_dirs(tmp_dir)
        for leftover in tmp_dir.iterdir():
            log.warning("image store: removing %s, left by an interrupted import", leftover)
            _remove_tree(leftover)
        with os.scandir(self._root) as entries:
            names = {entry.name for entry in entries if entry.is_file(follow_symlinks=False)}
        index = {}
        for name in sorted(names):
            if name.endswith(RECORD_SUFFIX):
                info = self._read_record(name.removesuffix(RECORD_SUFFIX), names)
                if info is not None:
                    index[info.id] = info
        committed = {f"{image_id}{suffix}" for image_id in index for suffix in (IMAGE_SUFFIX, RECORD_SUFFIX)}
        for name in sorted(names - committed):
            if name.endswith((IMAGE_SUFFIX, RECORD_SUFFIX)) or _is_atomic_write_tmp(name):
                log.warning("image store: removing %s, an uncommitted or broken image", self._root / name)
                (self._root / name).unlink()
        fsync_dir(self._root)
        return index

    def _read_record(self, image_id: str, names: set[str]) -> ImageInfo | None:
        """The image whose json is ``<image_id>.json``, or None if that json is broken or its image is missing."""
        if f"{image_id}{IMAGE_SUFFIX}" not in names:
            return None
        record_path = self._record_path(image_id)
        try:
            record = json.loads(record_path.read_bytes())
            if not isinstance(record, dict) or record.get("id") != image_id or record.get("format") not in FORMATS:
                raise ValueError("not the metadata of this image")
            fields = {name: record[name] for name in _RECORD_FIELDS}
        except (ValueError, KeyError) as exc:
            log.warning("image store: %s is broken (%s)", record_path, exc)
            return None
        return ImageInfo(**fields, path=self._root / f"{image_id}{IMAGE_SUFFIX}",
                         last_used=record_path.stat().st_mtime)

    # Helpers.

    def _record_path(self, image_id: str) -> Path:
        return self._root / f"{image_id}{RECORD_SUFFIX}"


    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)



def _check_id(image_id: str) -> None:
    if not is_valid_image_id(image_id):
        raise ImageError(f"invalid image id {image_id!r}")



def _touch(path: Path) -> float:
    os.utime(path)
    return os.stat(path).st_mtime


def _remove_quietly(path: Path) -> None:
    """Remove `path` if it exists; a failure is logged (open() removes it later)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("image store: cannot remove %s: %s", path, exc)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _is_atomic_write_tmp(name: str) -> bool:
    """Whether `name` is the temp file of a json that files.atomic_write did not finish."""
    return name.startswith(".") and name.endswith(f"{RECORD_SUFFIX}.tmp")
