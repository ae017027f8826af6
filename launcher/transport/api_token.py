"""The API's bearer token, `<data_dir>/api-token`: created at first start, checked at every start.

Rules (docs/api.md, "The API token"), each refused with a `SetupError` (one line, exit status 2) rather than repaired:
- The file must be a regular file (not a symlink), owned by the launcher's user, mode 0600 (no group or other
  bits): a token that others could read may already have leaked, so quietly fixing the mode would hide that.
  The operator fixes the mode, or deletes the file so that a new token is generated.
- The token is the file's content without surrounding whitespace (a trailing newline from `echo` is fine). It
  must be at least `MIN_LENGTH` characters of visible ASCII (no spaces or control characters): an empty or
  short token would let anyone, or anyone who guesses, drive the node.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from launcher.durable import datadir
from launcher.plugin import files
from launcher.plugin.errors import SetupError

MIN_LENGTH = 32  # characters; a generated token (secrets.token_urlsafe(32)) has 43
MAX_FILE_BYTES = 4096  # a token file larger than this is something else


def load_or_create(data_dir: Path) -> str:
    """The token of `data_dir`, generated (mode 0600) if the file does not exist; SetupError if the file breaks a
    rule. Creation is atomic: two launchers racing on a fresh data dir end up with the same token. Blocks."""
    files.make_dirs(data_dir)
    path = data_dir / datadir.TOKEN_FILE
    try:
        return read(path)
    except FileNotFoundError:
        pass
    _create(path, secrets.token_urlsafe(32))
    return read(path)


def read(path: Path) -> str:
    """The token in `path`, checked against the rules; FileNotFoundError if there is no such file. Blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        if os.path.islink(path):
            raise SetupError(f"{path} is a symlink: the API token must be a file of its own (mode 0600); "
                             "replace the link with the file") from None
        raise SetupError(f"cannot read the API token {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SetupError(f"{path} is not a regular file: the API token must be one (mode 0600)")
        if info.st_uid != os.geteuid():
            raise SetupError(f"{path} is owned by uid {info.st_uid}, not by the launcher's user (uid "
                             f"{os.geteuid()}): someone else could have set the token; delete the file and a new "
                             "token is generated at the next start")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SetupError(f"{path} has mode {mode:04o}: other users may have read the API token; delete the "
                             "file (a new token is generated at the next start) or, if it cannot have leaked, "
                             f"chmod 600 {path}")
        data = file.read(MAX_FILE_BYTES + 1)
    return _check(path, data)


def _check(path: Path, data: bytes) -> str:
    if len(data) > MAX_FILE_BYTES:
        raise SetupError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not an API token")
    token = data.strip().decode("ascii", errors="replace")
    if not token:
        raise SetupError(f"{path} is empty: an empty API token would let anyone in; delete the file (a new "
                         f"token is generated at the next start) or write a token of at least {MIN_LENGTH} "
                         "characters into it")
    if not all("!" <= char <= "~" for char in token):
        raise SetupError(f"{path}: the API token must be visible ASCII characters only (no spaces or control "
                         "characters)")
    if len(token) < MIN_LENGTH:
        raise SetupError(f"{path} holds a token of {len(token)} characters: at least {MIN_LENGTH} are needed; "
                         "delete the file (a new token is generated at the next start) or write a longer one")
    return token


def _create(path: Path, token: str) -> None:
    """Write `token` to `path` unless it exists (then keep the existing file: another launcher created it first,
    and theirs is the token)."""
    with contextlib.suppress(FileExistsError):
        files.create_new(path, token.encode() + b"\n")
