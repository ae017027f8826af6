"""Where backing images may be imported from: the allow-list of the qemu virtualizer (README.md, "Image import").

The allow-list is made of directories and URL prefixes:
- every directory of `qemu.image_dirs`, and the directory or URL prefix of `qemu.image_url` (the template up to the
  last ``/`` before ``{id}``);
- every entry of `qemu.import_sources`: an absolute directory, a ``file://`` URL of a directory, or an
  ``http://`` / ``https://`` URL prefix (scheme, host and port must match exactly, and the path must start with
  the prefix's path, taken as a directory: ``https://h/images`` allows ``https://h/images/...`` only).

A local source is allowed if its real path (symlinks and ``..`` resolved) lies under an allowed directory's real
path; the file that is then opened is checked again by its descriptor (`allows_path` of its /proc path), so a
symlink swapped in between is caught too. A URL is allowed if it lies under an allowed prefix and its path has
no dot segments or encoded slashes (which a server might resolve to elsewhere). Every redirect target is checked
the same way by the downloader (`images`).

A source that is not allowed is refused with `REFUSED`, one reason that is the same whatever is at that path:
it never says whether a file exists, nor anything about it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import attrs
import httpx

from launcher.plugin.errors import INVALID_DATA, LauncherError

DEFAULT_PORTS = {"http": 80, "https": 443}
REFUSED = ("source: not an allowed import source (only files under qemu.image_dirs or qemu.import_sources, and "
           "URLs under qemu.image_url's or qemu.import_sources' prefixes, can be imported)")


class SourceRefused(LauncherError):
    """An import source outside the allow-list (code ``invalid_data``; the reason is always `REFUSED`)."""

    def __init__(self) -> None:
        super().__init__(INVALID_DATA, REFUSED)

    def __str__(self) -> str:
        return self.reason


@attrs.frozen
class UrlPrefix:
    """An allowed URL prefix: exact scheme, host and port; `path` (decoded, ending in ``/``) starts every path."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str) -> UrlPrefix:
        """ValueError unless `text` is an http:// or https:// URL with a host."""
        url = _parse_url(text)
        if url is None:
            raise ValueError(f"{text!r} is not an http:// or https:// URL with a host")
        path = url.path if url.path.endswith("/") else url.path + "/"
        return cls(url.scheme, url.host, _port(url), path)

    def allows(self, url: httpx.URL) -> bool:
        return (url.scheme, url.host, _port(url)) == (self.scheme, self.host, self.port) \
            and url.path.startswith(self.path)


@attrs.frozen
class ImportPolicy:
    """The allowed directories (real paths) and URL prefixes. Build it with `from_settings`."""

    directories: tuple[str, ...]
    prefixes: tuple[UrlPrefix, ...]

    @classmethod
    def from_settings(cls, image_dirs: Sequence[Path] = (), image_url: str | None = None,
                      import_sources: Sequence[str] = ()) -> ImportPolicy:
        """The allow-list of the qemu settings; ValueError, naming the setting, for an entry that is not one."""
        directories: list[str] = [os.path.realpath(directory) for directory in image_dirs]
        prefixes: list[UrlPrefix] = []
        if image_url:
            head = image_url.split("{id}", 1)[0]
            if "://" in head and "/" not in head.split("://", 1)[1]:
                raise ValueError(f"image_url: {{id}} must be in the URL's path, not its host: {image_url!r}")
            _add(head[: head.rfind("/") + 1] if "/" in head else head, "image_url", directories, prefixes)
        for entry in import_sources:
            _add(entry, "import_sources", directories, prefixes)
        return cls(tuple(directories), tuple(prefixes))

    def check(self, source: str) -> None:
        """SourceRefused unless `source` (a path, a file:// URL or an http(s) URL) is allowed: a local one by its
        real path. Blocks (resolves symlinks)."""
        scheme = urlsplit(source).scheme.lower() if "://" in source else ""
        if scheme in DEFAULT_PORTS:
            url = _parse_url(source)
            if url is None or not self.allows_url(url):
                raise SourceRefused()
            return
        path = _local_path(source, scheme)
        if path is None:
            raise SourceRefused()
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):
            raise SourceRefused() from None
        if not self.allows_path(real):
            raise SourceRefused()

    def allows_path(self, real: str) -> bool:
        """Whether the real (resolved, absolute) path `real` lies under an allowed directory."""
        return any(real.startswith(directory.rstrip("/") + "/") for directory in self.directories)

    def allows_url(self, url: httpx.URL) -> bool:
        """Whether `url` lies under an allowed prefix, with no dot segment or encoded slash in its path."""
        raw = url.raw_path.split(b"?", 1)[0].lower()
        if b"%2f" in raw or b"%5c" in raw or "\\" in url.path:
            return False
        if any(segment in (".", "..") for segment in url.path.split("/")):
            return False
        return any(prefix.allows(url) for prefix in self.prefixes)


def _add(entry: str, setting: str, directories: list[str], prefixes: list[UrlPrefix]) -> None:
    scheme = urlsplit(entry).scheme.lower() if "://" in entry else ""
    if scheme in DEFAULT_PORTS:
        try:
            prefixes.append(UrlPrefix.parse(entry))
        except ValueError as exc:
            raise ValueError(f"{setting}: {exc}") from None
        return
    path = _local_path(entry, scheme)
    if path is None or not path.is_absolute():
        raise ValueError(f"{setting}: {entry!r} is neither an absolute directory nor a file://, http:// or "
                         "https:// URL")
    directories.append(os.path.realpath(path))


def _local_path(source: str, scheme: str) -> Path | None:
    """The absolute path that a path or a file:// URL names; None for anything else."""
    if not scheme:
        path = Path(source)
    elif scheme == "file" and urlsplit(source).netloc in ("", "localhost"):
        path = Path(unquote(urlsplit(source).path))
    else:
        return None
    return path if path.is_absolute() else None


def _parse_url(text: str) -> httpx.URL | None:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError):
        return None
    return url if url.scheme in DEFAULT_PORTS and url.host else None


def _port(url: httpx.URL) -> int:
    return url.port or DEFAULT_PORTS[url.scheme]
