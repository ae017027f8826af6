"""The import pipeline of the image store: a source brought into a temp file, hashed, checked and made durable.

`ImportPipeline.fetch` streams its source (a local file, or a ``file://``, ``http://`` or ``https://`` URL) into
a new temp file while hashing it, compares the hash with the digest the caller expects or the source publishes
(``<source>.sha256``), asks ``qemu-img info`` what the file is (qcow2 or raw only, no backing file, no external
data file, not empty) and fsyncs it. Naming, committing and indexing the image is the store's (images.py); so is
removing the temp file when `fetch` fails or is cancelled.

What may be read is the allow-list of import_policy.py: a `confined` local source is checked again once opened
(a symlink swapped in after the check), and HTTP redirects are followed only within it, by every import. No
import may be larger than `max_bytes` (refused at once if the source announces more, else stopped there).

File work runs in worker threads under the launcher's shared limiter, one chunk per thread call, so an import can
be cancelled between chunks; ``qemu-img`` and every HTTP wait (connect, each read; not a whole download) are
bounded by timeouts. Progress goes to a callback, at most every `interval` while copying plus once when finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
import httpx
import trio

from launcher.plugin.tools import ToolError
from virtualizers.qemu import qemu_img
from virtualizers.qemu.image_errors import ImageError, ImageNotFound
from virtualizers.qemu.import_policy import ImportPolicy, SourceRefused

CHUNK_SIZE = 1 << 20  # bytes copied per worker-thread call (and per HTTP read)
DIGEST_SUFFIX = ".sha256"  # `<source>.sha256`, if it exists, is the digest the source publishes
FORMATS = ("qcow2", "raw")
SECTOR_SIZE = 512  # a raw disk image is a whole number of sectors
MAX_DIGEST_FILE = 64 << 10  # a "digest file" larger than this is something else
NOT_FOUND_STATUSES = (404, 410)
MAX_REDIRECTS = 5  # each target is checked against the allow-list
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@attrs.frozen
class ImportProgress:
    """Where an import stands; `finished` is True in the one report sent once the image is committed."""

    image_id: str
    done_bytes: int
    total_bytes: int | None  # Content-Length or the source file's size; None if the server did not say
    source: str
    finished: bool


ProgressCallback = Callable[[ImportProgress], None]


@attrs.frozen
class Fetched:
    """What `ImportPipeline.fetch` brought into its temp file."""

    sha256: str  # of the file as imported
    size: int  # bytes of the file
    format: str  # "qcow2" or "raw" (qemu-img's answer)
    virtual_size: int  # bytes the guest sees
    verified: bool  # the caller or the source gave a digest, and it matched


@attrs.frozen
class ImportPipeline:
    """How one image store imports: from within `policy`, under `limiter`, at most `max_bytes`, each HTTP wait
    bounded by `http_timeout_s`."""

    policy: ImportPolicy
    limiter: trio.CapacityLimiter
    max_bytes: int
    http_timeout_s: float

    async def fetch(self, source: str, tmp: Path, expected: str | None, progress: Progress,
                    confined: bool) -> Fetched:
        """Copy `source` into the new file `tmp`, verify it (the `expected` sha256, else the one the source
        publishes, if any) and inspect it (qemu-img info), fsynced. ImageNotFound if the source does not exist,
        ImageError (or SourceRefused, OSError) for any other failure; the caller removes `tmp` then.
        `confined`: a local source must be within the allow-list (else it is a file of the search dirs that
        `ensure` found, which the operator put there, links included)."""
        try:
            async with self._open_source(source, confined) as src:
                if expected is None:
                    expected = await src.published_digest()
                    verified_by = "published"
                else:
                    verified_by = "expected"
                sha256, size = await self._download(src, tmp, progress)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ImageError(f"cannot download {source}: {_describe(exc)}") from exc
        if expected is not None and expected != sha256:
            raise ImageError(f"sha256 mismatch for {source}: {verified_by} {expected}, got {sha256}")
        image_format, virtual_size = await _inspect(tmp, source, size)
        return Fetched(sha256, size, image_format, virtual_size, verified=expected is not None)

    @contextlib.asynccontextmanager
    async def _open_source(self, source: str, confined: bool) -> AsyncIterator[_Source]:
        """The source behind `source` (an HTTP one holds a client until the context exits). Redirects are
        followed only within the allow-list; a `confined` local source is checked again once opened."""
        scheme = urlsplit(source).scheme.lower() if "://" in source else ""
        if scheme in ("http", "https"):
            async with httpx.AsyncClient(follow_redirects=False, timeout=self.http_timeout_s,
                                         headers={"Accept-Encoding": "identity"}) as client:
                yield _HttpSource(source, client, self.policy)
        else:
            yield _LocalSource(_local_path(source, scheme), self.limiter, self.policy if confined else None)

    async def _download(self, src: _Source, tmp: Path, progress: Progress) -> tuple[str, int]:
        """Copy `src` into the new file `tmp` and fsync it; its sha256 and size."""
        file = await trio.to_thread.run_sync(_create, tmp, limiter=self.limiter)
        with file:
            sink = _Sink(file, self.limiter, progress, self.max_bytes)
            await src.copy_to(sink)
            size = await trio.to_thread.run_sync(sink.sync, limiter=self.limiter)
        return sink.sha256.hexdigest(), size


@attrs.define(eq=False)
class Progress:
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
    progress: Progress
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
        return None if data is None else parse_digest(data, str(sidecar))

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
        return parse_digest(data, url)

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



def parse_digest(data: bytes, where: str) -> str:
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



def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
