"""Fixtures that run a real `launcher serve` process on a free port with its own data dir."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from fleet_support import FleetNetwork
from libvirt_cleanup import remove_domains_under, remove_pools_under

from launcher.cli.client import Client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "configs" / "examples"


class LauncherProcess:
    """One `launcher serve` child process, in network namespace `netns` if given (`ip netns exec`, which execs
    the launcher: the process is the launcher's own). `start()` again after `kill()` is a launcher restart."""

    def __init__(self, data_dir: Path, settings: dict[str, Any], env: dict[str, str] | None = None,
                 netns: str = "") -> None:
        self.data_dir = data_dir
        self.netns = netns
        self.env = {**os.environ, **(env or {})}
        self.config_path = data_dir.parent / f"{data_dir.name}-launcher.yaml"
        # This 2-CPU machine admits 8 vCPUs by default; tests start more small instances than that.
        base = {"listen": "127.0.0.1:0", "virtualizer": "simulation", "admission": {"vcpu_overcommit": 64.0}}
        merged = {**base, **settings}
        if "virtualizers" in merged:  # a list of virtualizers replaces the single one
            merged.pop("virtualizer", None)
        self.config_path.write_text(yaml.safe_dump(merged))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"

    def start(self, timeout: float = 20.0) -> Client:
        url_file = self.data_dir / "api-url"
        url_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*(["ip", "netns", "exec", self.netns] if self.netns else []),
                 sys.executable, "-m", "launcher.cli", "serve", "--config", str(self.config_path),
                 "--data-dir", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
            )
        deadline = time.monotonic() + timeout
        while not url_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"launcher did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        return self.client()

    def client(self) -> Client:
        return Client.discover(None, self.data_dir)

    def cli(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run the `launcher` command against this launcher (in the launcher's environment)."""
        return subprocess.run(
            [sys.executable, "-m", "launcher.cli", *args, "--data-dir", str(self.data_dir)],
            input=stdin.decode() if stdin else None, capture_output=True, text=True, timeout=60, cwd=ROOT,
            env=self.env,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log_path.read_text()


def simvm_processes(data_dir: Path) -> list[psutil.Process]:
    """Live (non-zombie) fake VM processes of the process-mode simulation under `data_dir`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if "virtualizers.simulation.simvm" in cmdline and any(str(data_dir) in part for part in cmdline) \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture
def launcher_factory(tmp_path: Path) -> Iterator[Any]:
    """make(settings, name, netns) → a LauncherProcess, started; everything (and any fake VM) is killed
    afterwards."""
    made: list[LauncherProcess] = []

    def make(settings: dict[str, Any] | None = None, name: str = "data", netns: str = "") -> LauncherProcess:
        data_dir = tmp_path / name
        data_dir.mkdir(exist_ok=True)
        launcher = LauncherProcess(data_dir, settings or {}, netns=netns)
        launcher.start()
        made.append(launcher)
        return launcher

    yield make
    for launcher in made:
        launcher.kill()
        for proc in simvm_processes(launcher.data_dir):
            proc.kill()


@pytest.fixture
def launcher(launcher_factory: Any) -> LauncherProcess:
    return launcher_factory()


@pytest.fixture
def fleet_net() -> Iterator[FleetNetwork]:
    """A bridge and network namespaces for fleet tests' launchers (`fleet_support.FleetNetwork`), removed after."""
    network = FleetNetwork()
    network.up()
    yield network
    network.down()


def example(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


os.environ.pop("LAUNCHER_URL", None)  # tests find their launcher through its data dir only
os.environ.pop("LAUNCHER_TOKEN", None)


# ---------------------------------------------------------------------------------------------------------
# The qemu virtualizer: real libvirtd, real QEMU (TCG here), the test guest of tests/guest/.

QEMU_TEST_ROOT = Path("/var/tmp/launcher-tests")  # QEMU runs as libvirt-qemu: it must reach the data dirs
GUEST_CACHE = ROOT / ".cache" / "guest"
# The image ids of the bundled example payloads; each is the test guest.
EXAMPLE_IMAGE_IDS = ("b286cd45-7d0c-4525-a140-4db6c95e41fa", "clear-1ff6bf3883708a56446d863f20c810c99b3aea6f")


@pytest.fixture(scope="session")
def guest_image() -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "guest"))
    from build import ensure_guest_image

    return ensure_guest_image(GUEST_CACHE)


@pytest.fixture(scope="session")
def guest_image_dir(guest_image: Path) -> Iterator[Path]:
    """A directory where each example image id is the test guest (what `qemu.image_dirs` points at)."""
    yield from images_dir("images-", dict.fromkeys(EXAMPLE_IMAGE_IDS, guest_image))


def images_dir(prefix: str, images: dict[str, Path]) -> Iterator[Path]:
    """A directory QEMU can reach, where each image id of `images` is a link to its image file; removed after."""
    QEMU_TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=QEMU_TEST_ROOT))
    for image_id, image in images.items():
        (directory / f"{image_id}.qcow2").symlink_to(image)
    yield directory
    shutil.rmtree(directory)


DEBIAN_IMAGE_ID = "debian-12-cloud-init-test"  # the image id payloads name to boot the Debian guest


@pytest.fixture(scope="session")
def debian_image() -> Path:
    """The Debian 12 guest with real cloud-init (tests/guest/debian.py): built once, then cached."""
    sys.path.insert(0, str(ROOT / "tests" / "guest"))
    from debian import ensure_debian_image

    return ensure_debian_image(GUEST_CACHE)


@pytest.fixture(scope="session")
def debian_image_dir(debian_image: Path) -> Iterator[Path]:
    """A directory where `DEBIAN_IMAGE_ID` is the Debian guest (for `qemu.image_dirs`)."""
    yield from images_dir("debian-images-", {DEBIAN_IMAGE_ID: debian_image})


@pytest.fixture(scope="session")
def stale_test_runs_removed() -> None:
    """Clear what killed test runs left behind: their launchers, domains and data dirs (see `QemuTestRoot`)."""
    QEMU_TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    for root in QEMU_TEST_ROOT.glob("test-*"):
        if root.is_dir() and not QemuTestRoot(root).owner_alive():
            QemuTestRoot(root).remove()


class QemuTestRoot:
    """The directory of one qemu test's data dirs, /var/tmp/launcher-tests/test-*, owned by one pytest process.

    `remove()` kills the launchers serving from it and the power-cut file systems mounted in it (tests/powercut.py,
    then unmounted), destroys and undefines every libvirt domain whose launcher metadata names a data dir under
    it and every storage pool whose target is under it (straight through libvirt, so it works whatever state the
    launcher or its config is in), then deletes it. A run killed before its teardown leaves its root behind: the
    next session removes it, knowing it stale by its owner pid."""

    OWNER_FILE = "owner-pid"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls) -> QemuTestRoot:
        root = cls(Path(tempfile.mkdtemp(prefix="test-", dir=QEMU_TEST_ROOT)))
        root.path.chmod(0o711)
        (root.path / cls.OWNER_FILE).write_text(str(os.getpid()))
        return root

    def owner_alive(self) -> bool:
        try:
            return psutil.pid_exists(int((self.path / self.OWNER_FILE).read_text()))
        except (OSError, ValueError):
            return False

    def remove(self) -> list[str]:
        """Remove everything of this root; the names of the domains it destroyed."""
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            ours = "serve" in cmdline or any(part.endswith("powercut_fs.py") for part in cmdline)
            if ours and any(part.startswith(str(self.path) + "/") for part in cmdline):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        for mount in psutil.disk_partitions(all=True):  # a power-cut file system (tests/powercut.py) left mounted
            if mount.mountpoint.startswith(str(self.path) + "/"):
                subprocess.run(["umount", "-l", mount.mountpoint], capture_output=True, timeout=30)
        removed = remove_domains_under(self.path)
        remove_pools_under(self.path)
        shutil.rmtree(self.path, ignore_errors=True)
        return removed


@pytest.fixture
def qemu_test_root(stale_test_runs_removed: None) -> Iterator[QemuTestRoot]:
    """The test's own `QemuTestRoot` (`qemu_factory` makes its data dirs in it), removed afterwards with every
    domain and pool left under it. A test that mounts a file system at a data dir before `qemu_factory` makes
    it asks for this fixture first, so that its unmount runs after the factory's teardown and before this one."""
    root = QemuTestRoot.create()
    try:
        yield root
    finally:
        root.remove()


@pytest.fixture
def qemu_factory(guest_image_dir: Path, qemu_test_root: QemuTestRoot) -> Iterator[Any]:
    """make(qemu_settings, **settings) → a started `launcher serve` with the qemu virtualizer.

    Its data dir is under /var/tmp (QEMU, running as libvirt-qemu, cannot enter pytest's 0700 tmp dirs), in
    `qemu_test_root`. Afterwards, whatever the test's outcome, each launcher is killed and its VMs destroyed with
    `launcher hard-reset` (which must succeed, or the teardown fails), and then the test root is removed with
    every domain still left under it (`QemuTestRoot.remove`, by `qemu_test_root`), so that no failure leaves a
    domain defined."""
    made: list[LauncherProcess] = []
    root = qemu_test_root

    def make(qemu: dict[str, Any] | None = None, name: str = "data", **settings: Any) -> LauncherProcess:
        data_dir = root.path / name
        data_dir.mkdir(mode=0o711, exist_ok=True)
        qemu_settings = {"image_dirs": [str(guest_image_dir)], **(qemu or {})}
        launcher = LauncherProcess(data_dir, {"virtualizer": "qemu", "qemu": qemu_settings, **settings})
        made.append(launcher)
        launcher.start(timeout=60)
        return launcher

    yield make
    failed_resets = []
    for launcher in made:
        launcher.kill()
        reset = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "hard-reset", "--yes", "--config",
             str(launcher.config_path), "--data-dir", str(launcher.data_dir)],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
        if reset.returncode != 0:
            failed_resets.append(f"{launcher.data_dir}: {reset.stderr.strip()}")
    assert not failed_resets, f"launcher hard-reset failed: {failed_resets}"
