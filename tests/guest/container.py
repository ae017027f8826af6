"""Build the test container image from Debian's busybox-static, never from a registry.

Contract
--------
``ensure_rootfs(cache_dir)`` returns ``cache_dir/busybox-<key>.rootfs.tar``, building it first if it is absent:
a root file system tarball (what ``docker import`` takes) holding ``/bin/busybox`` (the static binary of Debian's
``busybox-static``, installed by .ci/install) with a symlink in ``/bin`` for each of its applets (``sh``,
``sleep``, ``cat``, ``hostname``, ``ip``, ``ifconfig``, ``dd``, ``head``, ...), and the empty dirs a container
expects (``/dev``, ``/proc``, ``/sys``, ``/etc``, ``/root``, ``/tmp`` with mode 1777, ``/var``). ``<key>`` is a
short hash of the busybox binary and of this file, so a new busybox makes a new tarball. The tarball is written
to a temp file and renamed into place (an exclusive lock on ``cache_dir/build.lock`` keeps concurrent callers
from building it twice); its entries have fixed owners and times, so it is the same bytes for the same inputs.

``save_image(rootfs, reference, path, docker)`` makes the other form tests need, an image archive (``docker
save``) of ``reference``, by importing `rootfs` under that name, saving it and removing the name again; it needs
the running engine (`docker` is the CLI's argv prefix, e.g. ``["docker", "-H", "unix:///run/docker.sock"]``).

CLI: ``python tests/guest/container.py [--cache-dir DIR]`` prints the tarball's path (default cache dir:
``<repo>/.cache/container``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
DIRS = {"dev": 0o755, "proc": 0o555, "sys": 0o555, "etc": 0o755, "root": 0o700, "tmp": 0o1777, "var": 0o755,
        "bin": 0o755}
MTIME = 1_700_000_000
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "container"


def _key() -> str:
    digest = hashlib.sha256(BUSYBOX.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:12]


def _applets() -> list[str]:
    listed = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True, timeout=30)
    return sorted(name for name in listed.stdout.split() if name and name != "busybox" and "/" not in name)


def _build(path: Path) -> None:
    binary = BUSYBOX.read_bytes()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, mode in DIRS.items():
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, MTIME
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(binary), 0o755, MTIME
        tar.addfile(info, io.BytesIO(binary))
        for applet in _applets():
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode, link.mtime = tarfile.SYMTYPE, "busybox", 0o777, MTIME
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode, info.mtime = len(passwd), 0o644, MTIME
        tar.addfile(info, io.BytesIO(passwd))


def ensure_rootfs(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The busybox root file system tarball (module doc), built once per busybox and cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"busybox-{_key()}.rootfs.tar"
    if path.exists():
        return path
    with open(cache_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            _build(tmp)
            os.replace(tmp, path)
    return path


def save_image(rootfs: Path, reference: str, path: Path, docker: list[str]) -> Path:
    """An image archive (docker save) of `reference` made from `rootfs`, at `path` (module doc)."""
    subprocess.run([*docker, "import", str(rootfs), reference], check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([*docker, "save", "-o", str(path), reference], check=True, capture_output=True, timeout=120)
    finally:
        subprocess.run([*docker, "rmi", reference], capture_output=True, timeout=120)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    print(ensure_rootfs(parser.parse_args().cache_dir))
