"""What a container does with a START's user-data (cloud-config): `read_user_data` gives its `command` and the
`files` to write into it before it starts.

The user-data is cloud-config YAML (a ``#cloud-config`` first line is optional; blank text or a null document is
an empty config). A container has no cloud-init, so the launcher applies the two keys that make sense for one:

``runcmd``
    the container's command, as ciao's docker virtualizer took it. One entry that is a list is the argv, run
    as it is (the program gets the signals: `docker stop`'s SIGTERM). Otherwise every entry runs, in order, in
    one ``sh -c`` script, as cloud-init would run them (a string entry as shell text, a list entry as its argv,
    quoted): a failing entry does not stop the next, and the last entry's status is the container's exit code.
    (ciao ran the first entry only and warned about the others.) Without ``runcmd`` the image's own command runs.
``write_files``
    each entry's ``path`` (absolute), ``content`` (``encoding``: text by default, ``b64``/``base64``,
    ``gz+b64``/``gzip+base64``), ``permissions`` (an octal string, default ``0644``) and ``owner`` (numeric
    ``uid:gid`` or ``root``; default root) are written into the container before it starts (the engine's archive
    upload), replacing a file of the image; ``append: true`` is refused (the image's file cannot be read first).
    Missing parent directories are made by the engine.

Every other key is ignored (listed in `ignored`, which the virtualizer writes to the instance's log): a container
gets no packages, users, SSH keys or mounts from cloud-config. Anything wrong raises `UserDataError` naming the
key (``user-data.write_files[0].path: ...``), which the caller reports as image_failure.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import shlex
import tarfile
import time
from typing import Any

import attrs
import yaml

from launcher.plugin.identity import yaml_problem

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
HONOURED = ("runcmd", "write_files")


class UserDataError(ValueError):
    """The user-data cannot be applied to a container; the message names the key at fault."""


@attrs.frozen
class FileToWrite:
    """One ``write_files`` entry: where, what, with which mode and owner."""

    path: str
    content: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@attrs.frozen
class ContainerUserData:
    """What the user-data gives a container: its command (None: the image's), files, and the keys ignored."""

    command: tuple[str, ...] | None = None
    files: tuple[FileToWrite, ...] = ()
    ignored: tuple[str, ...] = ()


def read_user_data(text: str) -> ContainerUserData:
    """The container's part of the cloud-config `text` (module doc); UserDataError if it cannot be applied."""
    if not text.strip():
        return ContainerUserData()
    try:
        config = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise UserDataError(f"user-data: not valid cloud-config YAML: {yaml_problem(exc)}") from None
    if config is None:
        return ContainerUserData()
    if not isinstance(config, dict):
        raise UserDataError(f"user-data: must be a cloud-config mapping, got {type(config).__name__}")
    ignored = tuple(str(key) for key in config if key not in HONOURED)
    return ContainerUserData(command=_command(config.get("runcmd")), files=_files(config.get("write_files")),
                             ignored=ignored)


def _command(runcmd: Any) -> tuple[str, ...] | None:
    if runcmd is None:
        return None
    if not isinstance(runcmd, list) or not runcmd:
        raise UserDataError("user-data.runcmd: must be a non-empty list")
    lines = []
    for i, entry in enumerate(runcmd):
        if isinstance(entry, list) and entry and all(isinstance(arg, (str, int, float)) for arg in entry):
            argv = [str(arg) for arg in entry]
            if len(runcmd) == 1:
                return tuple(argv)
            lines.append(shlex.join(argv))
        elif isinstance(entry, str) and entry.strip():
            lines.append(entry)
        else:
            raise UserDataError(f"user-data.runcmd[{i}]: must be a command (a string) or an argv (a list of "
                                f"strings), got {entry!r:.60}")
    return ("sh", "-c", "\n".join(lines))


def _files(entries: Any) -> tuple[FileToWrite, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise UserDataError("user-data.write_files: must be a list")
    return tuple(_file(f"user-data.write_files[{i}]", entry) for i, entry in enumerate(entries))


def _file(where: str, entry: Any) -> FileToWrite:
    if not isinstance(entry, dict):
        raise UserDataError(f"{where}: must be a mapping")
    path = entry.get("path")
    if not isinstance(path, str) or not path.startswith("/") or path.endswith("/") or "\0" in path \
            or ".." in path.split("/"):
        raise UserDataError(f"{where}.path: must be an absolute file path without '..', got {path!r:.60}")
    if entry.get("append"):
        raise UserDataError(f"{where}.append: not supported for a container (the file is replaced)")
    return FileToWrite(path=path, content=_content(where, entry.get("content", ""), entry.get("encoding", "")),
                       mode=_mode(where, entry.get("permissions", "0644")), uid=_owner(where, entry.get("owner"))[0],
                       gid=_owner(where, entry.get("owner"))[1])


def _content(where: str, content: Any, encoding: Any) -> bytes:
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise UserDataError(f"{where}.content: must be a string")
    try:
        if encoding in ("", None, "text/plain"):
            return content.encode()
        if encoding in ("b64", "base64"):
            return base64.b64decode(content, validate=False)
        if encoding in ("gz+b64", "gzip+base64", "gz+base64", "gzip+b64"):
            return gzip.decompress(base64.b64decode(content, validate=False))
    except (binascii.Error, OSError, EOFError, UnicodeEncodeError) as exc:
        raise UserDataError(f"{where}.content: cannot be decoded as {encoding or 'text'}: {exc}") from None
    raise UserDataError(f"{where}.encoding: unknown encoding {encoding!r:.40} (text, b64, gz+b64)")


def _mode(where: str, permissions: Any) -> int:
    try:
        mode = permissions if isinstance(permissions, int) else int(str(permissions), 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise UserDataError(f"{where}.permissions: must be an octal mode such as '0644', got {permissions!r:.20}")
    return mode


def _owner(where: str, owner: Any) -> tuple[int, int]:
    if owner in (None, "", "root", "root:root"):
        return 0, 0
    user, _, group = str(owner).partition(":")
    if user.isdigit() and (group or user).isdigit():
        return int(user), int(group or user)
    raise UserDataError(f"{where}.owner: a container takes root or numeric uid:gid, got {owner!r:.40}")


def files_tar(files: tuple[FileToWrite, ...]) -> bytes:
    """A tar archive of `files`, paths relative to /, for the engine's archive upload at /."""
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for file in files:
            info = tarfile.TarInfo(file.path.lstrip("/"))
            info.size = len(file.content)
            info.mode = file.mode
            info.uid, info.gid = file.uid, file.gid
            info.mtime = now
            tar.addfile(info, io.BytesIO(file.content))
    return buffer.getvalue()
