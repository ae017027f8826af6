"""Images in the engine: `ImageLoader.ensure` makes the image a START names (``docker_image``) present, loading it
once however many STARTs ask at once.

The image dir rule (``docker.image_dir``, by default ``<data_dir>/docker-images``): the reference
``[registry/]path[:tag]`` (tag ``latest`` when none is given) is looked for as

    <image_dir>/<registry/path>/<tag>.image.tar        an image archive (`docker save`)   -> the engine loads it
    <image_dir>/<registry/path>/<tag>.rootfs.tar[.gz|.xz]   a root file system tarball  -> the engine imports it

in that order: the reference's own parts are the dirs and the file name, so no escaping is needed and two
references never share a file (``busybox:1.36`` is ``busybox/1.36.image.tar``, ``example.org:5000/a/b`` is
``example.org:5000/a/b/latest.rootfs.tar``). An imported tarball becomes the image ``<path>:<tag>``; a loaded
archive that does not carry the reference's name is tagged with it (when it holds one image). A reference by
digest (``@sha256:...``) can only be pulled. Only when the engine lacks the image and the image dir has no file
for it does a registry pull happen, and only with ``docker.pull: true``.

Each load, import or pull sends the tarball as the request body (read in worker threads under the host's
limiter), reports `image_progress` events (as the qemu image store does: at most one every `PROGRESS_INTERVAL_S`
while sending, then one finished) and is bounded by ``docker.image_timeout_s``. The operations on one reference
are serialised (`KeyedLocks`), and the engine is asked again once the lock is held, so concurrent STARTs load an
image once. Failures raise `ImageLoadError` (the caller's image_failure), with a reason naming the image.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import trio

from launcher.plugin.locks import KeyedLocks
from virtualizers.docker.engine import NOT_FOUND, Engine, EngineError, NoAnswer, path_part

ARCHIVE_SUFFIX = ".image.tar"
ROOTFS_SUFFIXES = (".rootfs.tar", ".rootfs.tar.gz", ".rootfs.tar.xz")
CHUNK = 1 << 20
PROGRESS_INTERVAL_S = 0.5
_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_LOADED = ("Loaded image: ", "Loaded image ID: ")


class ImageLoadError(Exception):
    """The image cannot be made present; the message names it and says why."""


@attrs.frozen
class Reference:
    """An image reference cut into its parts: `repository` (with any registry), `tag` ("latest" when it has
    none and no digest), `digest` ("" or "sha256:...")."""

    repository: str
    tag: str
    digest: str = ""

    @property
    def name(self) -> str:
        """The reference as the engine names the image (repository:tag or repository@digest)."""
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"


def parse_reference(text: str) -> Reference:
    """`text` ("busybox", "busybox:1.36", "host:5000/a/b:1", "a@sha256:...") cut into its parts; ImageLoadError
    for a reference whose path parts could not be file names (the payload parser has checked its shape)."""
    name, _, digest = text.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    repository, tag = (name[:colon], name[colon + 1:]) if colon > slash else (name, "" if digest else "latest")
    if not repository or any(_COMPONENT_RE.fullmatch(part) is None for part in repository.split("/")):
        raise ImageLoadError(f"image {text!r}: not a reference the image dir can hold")
    return Reference(repository, tag, digest)


def candidates(root: Path, reference: Reference) -> list[tuple[Path, str]]:
    """The files the image dir may hold for `reference`, in the order they are tried, each with how it is made
    present ("load" or "import"); none for a digest reference."""
    if reference.digest:
        return []
    base = root.joinpath(*reference.repository.split("/"))
    return [(base / f"{reference.tag}{ARCHIVE_SUFFIX}", "load")] + [
        (base / f"{reference.tag}{suffix}", "import") for suffix in ROOTFS_SUFFIXES]


@attrs.frozen
class LoadProgress:
    """One progress report of a load, import or pull (`image_progress`): bytes sent of the total."""

    image: str
    done_bytes: int
    total_bytes: int | None
    source: str
    finished: bool


@attrs.define(eq=False)
class ImageLoader:
    """Makes images present in the engine (module doc)."""

    engine: Engine
    root: Path  # the image dir
    pull: bool
    timeout_s: float
    limiter: trio.CapacityLimiter
    on_progress: Callable[[LoadProgress], None]
    _locks: KeyedLocks = attrs.field(factory=KeyedLocks)

    async def present(self, name: str) -> bool:
        """Whether the engine has the image `name`. EngineError / NoAnswer pass."""
        try:
            await self.engine.call("GET", f"/images/{path_part(name)}/json")
        except EngineError as exc:
            if exc.status == NOT_FOUND:
                return False
            raise
        return True

    async def ensure(self, text: str) -> str:
        """Make the image `text` present (module doc); what was done, for the instance's log ("present",
        "loaded from <file>", ...). ImageLoadError if it cannot be."""
        reference = parse_reference(text)
        try:
            if await self.present(text):
                return "present"
            async with self._locks.hold(reference.name):
                if await self.present(text):
                    return "present (loaded by another START)"
                with trio.move_on_after(self.timeout_s) as bound:
                    return await self._make_present(text, reference)
        except (EngineError, NoAnswer) as exc:
            raise ImageLoadError(f"image {text}: {exc}") from exc
        assert bound.cancelled_caught
        raise ImageLoadError(f"image {text}: not made present within {self.timeout_s:g} s (docker.image_timeout_s)")

    async def _make_present(self, text: str, reference: Reference) -> str:
        for path, how in candidates(self.root, reference):
            if await trio.to_thread.run_sync(path.is_file, limiter=self.limiter):
                if how == "load":
                    await self._load(text, reference, path)
                    return f"loaded from {path}"
                await self._import(text, reference, path)
                return f"imported from {path}"
        if self.pull:
            await self._pull(text, reference)
            return "pulled"
        where = "" if reference.digest else f", and the image dir has no {reference.tag}{ARCHIVE_SUFFIX} or " \
            f"{reference.tag}.rootfs.tar[.gz|.xz] in {self.root.joinpath(*reference.repository.split('/'))}"
        raise ImageLoadError(f"image {text}: not in the engine{where} (docker.pull is false)")

    async def _load(self, text: str, reference: Reference, path: Path) -> None:
        """`docker load` of the archive `path`, then tag it with the reference if it is not named so."""
        lines = await self._send(text, path, "/images/load", {"quiet": True})
        if await self.present(text):
            return
        loaded = [line["stream"].strip().split(" ", 3)[-1] for line in lines
                  if isinstance(line.get("stream"), str) and line["stream"].startswith(_LOADED)]
        if len(loaded) != 1:
            raise ImageLoadError(f"image {text}: {path} holds {len(loaded)} images, none named {text} "
                                 "(an archive for the image dir holds that image: docker save <reference>)")
        await self.engine.call("POST", f"/images/{path_part(loaded[0])}/tag",
                               params={"repo": reference.repository, "tag": reference.tag})

    async def _import(self, text: str, reference: Reference, path: Path) -> None:
        """`docker import` of the root file system tarball `path` as repository:tag."""
        await self._send(text, path, "/images/create",
                         {"fromSrc": "-", "repo": reference.repository, "tag": reference.tag})

    async def _send(self, text: str, path: Path, api_path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """POST the file `path` as the body of `api_path`, reporting progress; the answer's JSON lines.
        ImageLoadError for an error line (the engine reports a bad tarball there, with status 200)."""
        try:
            file: BinaryIO = await trio.to_thread.run_sync(path.open, "rb", limiter=self.limiter)
        except OSError as exc:
            raise ImageLoadError(f"image {text}: cannot read {path}: {exc}") from exc
        with file:
            total = (await trio.to_thread.run_sync(path.stat, limiter=self.limiter)).st_size
            progress = _Progress(self.on_progress, text, str(path), total)
            body = self._read_chunks(file, progress)
            async with self.engine.stream("POST", api_path, params=params, content=body,
                                          headers={"Content-Type": "application/x-tar"}) as answer:
                lines = [line async for line in self.engine.json_lines(answer)]
            _raise_error_line(text, lines)
            progress.finish()
        return lines

    async def _read_chunks(self, file: BinaryIO, progress: _Progress) -> AsyncIterator[bytes]:
        while chunk := await trio.to_thread.run_sync(file.read, CHUNK, limiter=self.limiter):
            progress.advance(len(chunk))
            yield chunk

    async def _pull(self, text: str, reference: Reference) -> None:
        """A registry pull of the reference (only with docker.pull), its JSON progress stream read to the end."""
        params = {"fromImage": reference.repository, "tag": reference.digest or reference.tag}
        progress = _Progress(self.on_progress, text, "registry", None)
        async with self.engine.stream("POST", "/images/create", params=params) as answer:
            lines = [line async for line in self.engine.json_lines(answer)]
        _raise_error_line(text, lines)
        progress.finish()


def _raise_error_line(text: str, lines: list[dict[str, Any]]) -> None:
    for line in lines:
        if line.get("error"):
            raise ImageLoadError(f"image {text}: the engine refused it: {line['error']}")


@attrs.define(eq=False)
class _Progress:
    """The progress reports of one load: at most one per PROGRESS_INTERVAL_S while sending, then one finished."""

    callback: Callable[[LoadProgress], None]
    image: str
    source: str
    total: int | None
    done: int = 0
    _last: float = attrs.field(default=float("-inf"), init=False)

    def advance(self, n: int) -> None:
        self.done += n
        now = trio.current_time()
        if now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self.callback(LoadProgress(self.image, self.done, self.total, self.source, False))

    def finish(self) -> None:
        self.callback(LoadProgress(self.image, self.done, self.total if self.total is not None else self.done,
                                   self.source, True))
