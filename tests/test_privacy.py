"""What users gave the launcher (user-data, keys) is readable by no other user of the host: instance dirs are
0700 (QEMU's group may only search them: tests/test_qemu.py), their files 0600, the write-ahead log 0600.
Checked with the modes and by really trying as `nobody` (a real `launcher serve`, process-mode VMs)."""

from __future__ import annotations

import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import QEMU_TEST_ROOT, LauncherProcess, simvm_processes
from test_api import YAML, start_yaml

from launcher.cli.client import Client

SECRET = b"#cloud-config\npassword: hunter2-s3cret\n"
PROCESS_MODE = {"simulation": {"mode": "process", "boot_delay_s": 0.1}}


def start_with_secret(uuid: str) -> bytes:
    return b"---\n" + start_yaml(uuid) + b"...\n---\n" + SECRET + b"...\n---\n{}\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def readable_by_nobody(path: Path) -> bool:
    """Whether the unprivileged user `nobody` can read `path` (a file) or list it (a dir)."""
    command = ["ls", str(path)] if path.is_dir() else ["cat", str(path)]
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command],
                          capture_output=True, timeout=30)
    return done.returncode == 0


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A dir everyone may enter (pytest's own are under a 0700 dir), so that only the launcher's modes stand
    between `nobody` and its files."""
    QEMU_TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="privacy-", dir=QEMU_TEST_ROOT))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_user_data_is_readable_by_no_other_user(open_dir: Path) -> None:
    data_dir = open_dir / "data"
    data_dir.mkdir(mode=0o755)
    launcher = LauncherProcess(data_dir, PROCESS_MODE)
    client = launcher.start()
    try:
        _check_private(launcher, client)
    finally:
        launcher.kill()
        for proc in simvm_processes(data_dir):
            proc.kill()


def _check_private(launcher: LauncherProcess, client: Client) -> None:
    uuid = "5ec0-0001"
    assert client.request("POST", "/v1/instances", start_with_secret(uuid), YAML, wait=1)["state"] == "running"
    instance_dir = launcher.data_dir / "instances" / uuid
    record, disk, wal = instance_dir / "instance.json", instance_dir / "disk.img", launcher.data_dir / "instances.wal"
    assert b"hunter2-s3cret" in record.read_bytes() and b"hunter2-s3cret" in wal.read_bytes()
    assert (mode(instance_dir), mode(record), mode(disk), mode(wal)) == (0o700, 0o600, 0o600, 0o600)
    assert readable_by_nobody(launcher.data_dir / "instances")  # the check itself can succeed
    for path in (instance_dir, record, wal):
        assert not readable_by_nobody(path), path


def test_instance_dirs_of_an_older_launcher_are_made_private(launcher_factory: Any) -> None:
    launcher = launcher_factory()
    client = launcher.client()
    uuid = "5ec0-0002"
    client.request("POST", "/v1/instances", start_with_secret(uuid), YAML, wait=1)
    launcher.kill(signal.SIGTERM)
    instance_dir = launcher.data_dir / "instances" / uuid
    instance_dir.chmod(0o755)  # what launchers before this change made
    (instance_dir / "instance.json").chmod(0o644)
    launcher.start()
    # At most search for its group (a qemu instance dir lets QEMU's group in): nothing for anyone else.
    assert (mode(instance_dir) & 0o067, mode(instance_dir / "instance.json")) == (0, 0o600)
