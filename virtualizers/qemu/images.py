"""The backing-image store of the QEMU virtualizer.

Instances boot from a copy-on-write qcow2 overlay on a shared *backing image*. This module keeps those images,
keyed by the START payload's ``image_uuid``. The layout of the store's root directory::

    <id>.img    the image, in the format it came in (qcow2 or raw; never converted)
    <id>.json   its metadata, written last and atomically: the commit marker. No json, no image.
    .tmp/       imports in progress

An import streams its source (a local file, or a ``file://``, ``http://`` or ``https://`` URL) into ``.tmp/``
while hashing it, compares the hash with the digest the caller expects or the source publishes
(``<source>.sha256``), asks ``qemu-img info`` what the file is (qcow2 or raw only, no backing file, no external
data file, not empty), fsyncs it, renames it into place and writes the json. A failure or a cancellation
before the json is written leaves nothing behind; what a crash leaves (temp files, images without json) is
removed by `ImageStore.open`. One process owns a store.

`ImageStore.import_` (the images API) reads only from the allow-list of `virtualizers.import_policy`; redirects
are followed only within it, by every import; no import may be larger than the store's `max_bytes`.

Concurrency: every operation on an image id holds that id's lock, so concurrent `ImageStore.ensure` calls import
an image once (the others wait, then find it in the store), and `remove` / `gc` never delete an image that is
being imported or ensured. File work runs in worker threads under the shared limiter, one chunk per thread call,
so an import can be cancelled between chunks; ``qemu-img`` and every HTTP wait are bounded by timeouts.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
import httpx
import trio

from launcher.plugin.errors import IMAGE_FAILURE, IMAGE_IN_USE, VirtualizerError
from launcher.plugin.files import atomic_write, fsync_dir
from launcher.plugin.locks import KeyedLocks
from launcher.plugin.spec import is_valid_image_id
from launcher.plugin.tools import ToolError
from virtualizers.qemu import qemu_img
from virtualizers.qemu.import_policy import ImportPolicy, SourceRefused

log = logging.getLogger(__name__)

T = TypeVar("T")

CHUNK_SIZE = 1 << 20  # bytes copied per worker-thread call (and per HTTP read)
TMP_DIR = ".tmp"
IMAGE_SUFFIX = ".img"
RECORD_SUFFIX = ".json"
DIGEST_SUFFIX = ".sha256"  # `<source>.sha256`, if it exists, is the digest the source publishes
SEARCH_NAMES = ("{id}", "{id}.img", "{id}.qcow2", "{id}.raw")  # what ensure() looks for in a search dir
FORMATS = ("qcow2", "raw")
SECTOR_SIZE = 512  # a raw disk image is a whole number of sectors
MAX_DIGEST_FILE = 64 << 10  # a "digest file" larger than this is something else
NOT_FOUND_STATUSES = (404, 410)
MAX_REDIRECTS = 5  # each target is checked against the allow-list
DEFAULT_MAX_BYTES = 64 << 30  # qemu.image_max_bytes: no import may be larger (the download is stopped there)
IMAGE_MODE = 0o640  # owner (the launcher) and QEMU's group read it; nobody else (see `ImageStore.share_with_group`)
_RECORD_FIELDS = ("id", "format", "virtual_size", "size", "sha256", "source", "imported_at", "sha256_verified")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ImageError(VirtualizerError):
    """An image could not be provided, imported or removed; ``str(exc)`` (and ``exc.reason``) says precisely why.

    It is a `VirtualizerError` with code ``image_failure``, so the QEMU virtualizer can let it propagate."""

    def __init__(self, reason: str) -> None:
        super().__init__(IMAGE_FAILURE, reason)

    def __str__(self) -> str:
        return self.reason


class ImageInUse(ImageError):
    """`ImageStore.remove` was asked to remove an image that an instance uses (code ``image_in_use``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.code = IMAGE_IN_USE


class ImageNotFound(ImageError):
    """The image, or the source to import it from, does not exist."""


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


@attrs.frozen
class ImportProgress:
    """Where an import stands; `finished` is True in the one report sent once the image is committed."""

    image_id: str
    done_bytes: int
    total_bytes: int | None  # Content-Length or the source file's size; None if the server did not say
    source: str
    finished: bool


ProgressCallback = Callable[[ImportProgress], None]


class ImageStore:
    """The backing images of one node, under `root`.

    `search_dirs` and `url_template` (``str.format`` with ``{id}``: a path or a file/http/https URL) are where
    `ensure` looks for an image it does not have. `import_` reads only from those places and `import_sources`
    (`virtualizers.import_policy`); every HTTP redirect, of `ensure` too, must stay within them. No import may be
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
        self._max_bytes = max_bytes
        self._group: int | None = None
        self._root = root
        self._search_dirs = tuple(search_dirs)
        self._url_template = url_template
        self._limiter = limiter
        self._on_progress = on_progress
        self._progress_interval_s = progress_interval_s
        self._http_timeout_s = http_timeout_s
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
        expected = None if expected_sha256 is None else _parse_digest(expected_sha256.encode(), "expected_sha256")
        progress = _Progress(on_progress or self._on_progress, image_id, source, self._progress_interval_s)
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
                           progress: _Progress, confined: bool) -> ImageInfo:
        """Download `source` to `tmp`, verify it and commit it; the caller removes `tmp` if this fails."""
        try:
            async with self._open_source(source, confined) as src:
                if expected is None:
                    expected = await src.published_digest()
                    verified_by = "published"
                else:
                    verified_by = "expected"
                sha256, size = await self._download(src, tmp, progress)
            if expected is not None and expected != sha256:
                raise ImageError(f"sha256 mismatch for {source}: {verified_by} {expected}, got {sha256}")
            image_format, virtual_size = await _inspect(tmp, source, size)
            info = ImageInfo(id=image_id, path=self._root / f"{image_id}{IMAGE_SUFFIX}", format=image_format,
                             virtual_size=virtual_size, size=size, sha256=sha256, source=source,
                             imported_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                             sha256_verified=expected is not None, last_used=0.0)
            return attrs.evolve(info, last_used=await self._run(self._commit, tmp, info))
        except OSError as exc:
            raise ImageError(f"cannot import {image_id!r} from {source}: {exc}") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ImageError(f"cannot download {source}: {_describe(exc)}") from exc

    @contextlib.asynccontextmanager
    async def _open_source(self, source: str, confined: bool) -> AsyncIterator[_Source]:
        """The source behind `source` (an HTTP one holds a client until the context exits). Redirects are
        followed only within the allow-list; a `confined` local source is checked again once opened."""
        scheme = urlsplit(source).scheme.lower() if "://" in source else ""
        if scheme in ("http", "https"):
            async with httpx.AsyncClient(follow_redirects=False, timeout=self._http_timeout_s,
                                         headers={"Accept-Encoding": "identity"}) as client:
                yield _HttpSource(source, client, self._policy)
        else:
            yield _LocalSource(_local_path(source, scheme), self._limiter, self._policy if confined else None)

    async def _download(self, src: _Source, tmp: Path, progress: _Progress) -> tuple[str, int]:
        """Copy `src` into the new file `tmp` and fsync it; its sha256 and size."""
        file = await self._run(_create, tmp)
        with file:
            sink = _Sink(file, self._limiter, progress, self._max_bytes)
            await src.copy_to(sink)
            size = await self._run(sink.sync)
        return sink.sha256.hexdigest(), size

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
        tmp_dir.mkdir(parents=True, exist_ok=True)
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


@attrs.define(eq=False)
class _Progress:
    """The progress reports of one import: at most one per `interval` while copying, then one finished."""

    callback: ProgressCallback | None
    image_id: str
    source: str
    interval: float
    total: int | None = None
    done: int = 0
    _last: float = attrs.field(default=-math.inf, init=False)

    def advance(self, n: int) -> None:
        self.done += n
        now = trio.current_time()
        if now - self._last >= self.interval:
            self._last = now
            self._report(finished=False)

    def finish(self) -> None:
        self._report(finished=True)

    def _report(self, finished: bool) -> None:
        if self.callback is not None:
            total = self.done if finished and self.total is None else self.total
            self.callback(ImportProgress(self.image_id, self.done, total, self.source, finished))


@attrs.define(eq=False)
class _Sink:
    """The temp file an import streams into: hashes, writes and reports every chunk. Each chunk is one
    worker-thread call, so an import can be cancelled between chunks."""

    file: BinaryIO
    limiter: trio.CapacityLimiter
    progress: _Progress
    max_bytes: int  # ImageError once more than this has come
    sha256: Any = attrs.Factory(hashlib.sha256)
    written: int = 0

    def expect(self, total: int | None) -> None:
        """The source's announced size (None: unknown); ImageError at once if it is over the limit."""
        self.progress.total = total
        if total is not None and total > self.max_bytes:
            raise self._too_large()

    async def write(self, chunk: bytes) -> None:
        await trio.to_thread.run_sync(self._write, chunk, limiter=self.limiter)
        self.progress.advance(len(chunk))

    async def pull(self, source: BinaryIO) -> bool:
        """Copy the next chunk of `source`; False at its end."""
        n = await trio.to_thread.run_sync(self._pull, source, limiter=self.limiter)
        if n:
            self.progress.advance(n)
        return n > 0

    def sync(self) -> int:
        """Make the file durable; its size. Blocks."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return os.fstat(self.file.fileno()).st_size

    def _write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.max_bytes:
            raise self._too_large()
        self.sha256.update(chunk)
        self.file.write(chunk)

    def _too_large(self) -> ImageError:
        return ImageError(f"{self.progress.source}: refused, larger than qemu.image_max_bytes "
                          f"({self.max_bytes} bytes)")

    def _pull(self, source: BinaryIO) -> int:
        chunk = source.read(CHUNK_SIZE)
        self._write(chunk)
        return len(chunk)


class _Source(Protocol):
    async def published_digest(self) -> str | None:
        """The sha256 in ``<source>.sha256``; None if there is no such file."""

    async def copy_to(self, sink: _Sink) -> None:
        """Stream the whole source into `sink`, setting the progress total first if known."""


@attrs.frozen
class _LocalSource:
    path: Path
    limiter: trio.CapacityLimiter
    policy: ImportPolicy | None  # if set, the opened files must be within it

    async def published_digest(self) -> str | None:
        sidecar = self.path.with_name(self.path.name + DIGEST_SUFFIX)
        data = await trio.to_thread.run_sync(_read_small_file, sidecar, self.policy, limiter=self.limiter)
        return None if data is None else _parse_digest(data, str(sidecar))

    async def copy_to(self, sink: _Sink) -> None:
        file, size = await trio.to_thread.run_sync(_open_regular_file, self.path, self.policy,
                                                   limiter=self.limiter)
        with file:
            sink.expect(size)
            while await sink.pull(file):
                pass


@attrs.frozen
class _HttpSource:
    url: str
    client: httpx.AsyncClient  # does not follow redirects: `_get` does, within `policy`
    policy: ImportPolicy

    async def published_digest(self) -> str | None:
        parts = urlsplit(self.url)
        url = urlunsplit(parts._replace(path=parts.path + DIGEST_SUFFIX))
        async with self._get(url) as response:
            if response.status_code in NOT_FOUND_STATUSES:
                return None
            _check_status(response, url)
            data = b""
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_DIGEST_FILE:
                    raise ImageError(f"{url} is larger than {MAX_DIGEST_FILE} bytes: not a digest file")
        return _parse_digest(data, url)

    async def copy_to(self, sink: _Sink) -> None:
        async with self._get(self.url) as response:
            _check_status(response, self.url)
            length = response.headers.get("Content-Length", "")
            sink.expect(int(length) if length.isdigit() else None)
            async for chunk in response.aiter_bytes(CHUNK_SIZE):
                await sink.write(chunk)

    @contextlib.asynccontextmanager
    async def _get(self, url: str) -> AsyncIterator[httpx.Response]:
        """The streamed answer to GET `url`, after at most MAX_REDIRECTS redirects, each to a URL within the
        allow-list (ImageError otherwise, before anything is asked of that URL)."""
        request = self.client.build_request("GET", url)
        for _ in range(MAX_REDIRECTS + 1):
            response = await self.client.send(request, stream=True)
            try:
                if response.next_request is None:
                    yield response
                    return
                request = response.next_request
                if not self.policy.allows_url(request.url):
                    raise ImageError(f"GET {url} answered HTTP {response.status_code}, a redirect outside the "
                                     "allowed import sources: refused")
            finally:
                await response.aclose()
        raise ImageError(f"GET {url}: more than {MAX_REDIRECTS} redirects")


def _check_status(response: httpx.Response, url: str) -> None:
    """ImageNotFound for 404/410, ImageError for any other status but 2xx."""
    if response.is_success:
        return
    reason = f"GET {url} answered HTTP {response.status_code} {response.reason_phrase}".rstrip()
    raise (ImageNotFound if response.status_code in NOT_FOUND_STATUSES else ImageError)(reason)


async def _inspect(path: Path, source: str, size: int) -> tuple[str, int]:
    """(format, virtual size) of the image file `path`, by ``qemu-img info``; ImageError unless it is a qcow2 or
    raw image that may back an overlay: not empty, no backing file (its name would be opened by QEMU with the
    launcher's rights), no external data file (same), and a raw file (`size` bytes) a whole number of sectors
    (qemu-img rounds its virtual size up, so that a text file passes as a raw image)."""
    try:
        info = await qemu_img.info(path)
    except ToolError as exc:
        raise ImageError(f"cannot inspect {source}: {exc}") from exc
    return _check_image(info, source, size)


def _check_image(info: dict[str, Any], source: str, size: int) -> tuple[str, int]:
    image_format, virtual_size = info.get("format"), info.get("virtual-size")
    if image_format not in FORMATS:
        raise ImageError(f"{source}: format {image_format!r} is not supported (only qcow2 and raw are)")
    if "backing-filename" in info:
        raise ImageError(f"{source}: refused, the image has a backing file of its own ({info['backing-filename']})")
    data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
    if data_file is not None:
        raise ImageError(f"{source}: refused, the image has an external data file ({data_file})")
    if not isinstance(virtual_size, int) or virtual_size <= 0:
        raise ImageError(f"{source}: refused, the image's virtual size is {virtual_size}")
    if image_format == "raw" and size % SECTOR_SIZE:
        raise ImageError(f"{source}: not a disk image (raw, {size} bytes: not whole {SECTOR_SIZE}-byte sectors)")
    return image_format, virtual_size


def _check_id(image_id: str) -> None:
    if not is_valid_image_id(image_id):
        raise ImageError(f"invalid image id {image_id!r}")


def _parse_digest(data: bytes, where: str) -> str:
    """The sha256 in `data`: sha256sum's ``<hex>  <name>`` or a bare ``<hex>``."""
    words = data.split(maxsplit=1)
    digest = words[0].decode("ascii", errors="replace").lower() if words else ""
    if not _SHA256_RE.fullmatch(digest):
        raise ImageError(f"{where} does not hold a sha256 digest")
    return digest


def _local_path(source: str, scheme: str) -> Path:
    """The file that `source` (a path or a file:// URL; `scheme` is "" or its scheme) names."""
    if not scheme:
        return Path(source)
    parts = urlsplit(source)
    if scheme == "file" and parts.netloc in ("", "localhost"):
        return Path(unquote(parts.path))
    raise ImageError(f"unsupported image source {source!r}: expected a path or a file://, http:// or https:// URL")


def _open_regular_file(path: Path, policy: ImportPolicy | None) -> tuple[BinaryIO, int]:
    """`path` opened for reading, and its size; refuses anything but a regular file (a FIFO would block, a
    device might never end) and, with a `policy`, a file that turns out to be outside it once opened (a symlink
    swapped in after the check): SourceRefused. Blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageNotFound(f"{path} does not exist") from None
    if policy is not None and not policy.allows_path(os.readlink(f"/proc/self/fd/{fd}")):
        os.close(fd)
        raise SourceRefused()
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImageError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb"), info.st_size


def _read_small_file(path: Path, policy: ImportPolicy | None) -> bytes | None:
    """The content of the digest file `path`, None if it does not exist. Blocks."""
    try:
        file, _ = _open_regular_file(path, policy)
    except ImageNotFound:
        return None
    with file:
        data = file.read(MAX_DIGEST_FILE + 1)
    if len(data) > MAX_DIGEST_FILE:
        raise ImageError(f"{path} is larger than {MAX_DIGEST_FILE} bytes: not a digest file")
    return data


def _create(path: Path) -> BinaryIO:
    """A new file that only the launcher can read until it is committed (`ImageStore._commit` sets its mode)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")


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


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
