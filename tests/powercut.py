"""Driving the power-cut file system of tests/powercut_fs.py from a test: mount, cut the power, unmount.

A launcher under test runs with ``LD_PRELOAD`` of the syncfs shim (:func:`syncfs_shim`), so that its syncfs
calls reach the file system (see the module doc of powercut_fs.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FS_SCRIPT = Path(__file__).resolve().parent / "powercut_fs.py"
SHIM_SOURCE = Path(__file__).resolve().parent / "powercut_syncfs.c"
CACHE = ROOT / ".cache" / "powercut"


def syncfs_shim() -> Path:
    """The syncfs shim, compiled once per version of its source into .cache/powercut/."""
    source = SHIM_SOURCE.read_bytes()
    shim = CACHE / f"syncfs-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not shim.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = shim.with_suffix(".partial")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(partial), str(SHIM_SOURCE), "-ldl"],
                       check=True, capture_output=True, timeout=120)
        partial.rename(shim)
    return shim


def launcher_env() -> dict[str, str]:
    """The environment variables a launcher on a power-cut mount needs (its syncfs calls forwarded)."""
    return {"LD_PRELOAD": str(syncfs_shim())}


class PowerCutMount:
    """The power-cut file system over `directory`, mounted at `mountpoint` until :meth:`cut` or :meth:`stop`.

    After :meth:`cut` and :meth:`stop`, `directory` holds what a disk would after a power loss at the cut."""

    def __init__(self, directory: Path, mountpoint: Path) -> None:
        self.directory = directory
        self.mountpoint = mountpoint
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(FS_SCRIPT), str(self.directory), str(self.mountpoint)],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self._expect("ready")

    def cut(self) -> None:
        """Cut the power: from now on no call on the mount completes, and nothing not durable survives."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        self._expect("cut")

    def stop(self) -> None:
        """Unmount (after a cut, processes still using the mount get errors). Without a cut, nothing is lost."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        returncode = self.proc.wait(timeout=60)
        self.proc = None
        assert returncode == 0, f"the power-cut file system failed (exit {returncode})"

    def _expect(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        got = self.proc.stdout.readline().strip()
        if got != line:
            self.proc.kill()
            raise RuntimeError(f"the power-cut file system said {got!r}, not {line!r} (exit {self.proc.wait()})")


def unmount_stale(mountpoint: Path) -> None:
    """Remove a mount a killed test left behind (lazily: processes may still hold it)."""
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)
    shutil.rmtree(mountpoint, ignore_errors=True)
    os.makedirs(mountpoint, exist_ok=True)
