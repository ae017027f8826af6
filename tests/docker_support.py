"""What the docker virtualizer's tests share: the real Docker Engine (started with .ci/docker-up when it does not
answer, never skipped), a test engine network, the busybox image (tests/guest/container.py) in an image dir, and
a docker backend opened through the plugin API with a real limiter and recorded events and log lines.

A test module imports the fixtures it uses by name (and says ``# ruff: noqa: F811``: they are its arguments).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import MonitorEvent
from launcher.plugin.spec import InstanceSpec
from virtualizers.docker.backend import DockerBackend, open_backend
from virtualizers.docker.virtualizer import DockerVirtualizer

ROOT = Path(__file__).resolve().parent.parent
SOCKET = "/run/docker.sock"
DOCKER = ["docker", "-H", f"unix://{SOCKET}"]
DOCKER_ENV = {"DOCKER_API_VERSION": "1.41"}
NETWORK = "launcher-test"
SUBNET = "172.31.250.0/24"
CACHE = ROOT / ".cache" / "container"

sys.path.insert(0, str(ROOT / "tests" / "guest"))
from container import ensure_rootfs, save_image  # noqa: E402


def docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The docker CLI against the test engine (API 1.41, what Debian 12's engine speaks)."""
    import os
    return subprocess.run([*DOCKER, *args], capture_output=True, text=True, check=check, timeout=timeout,
                          env={**os.environ, **DOCKER_ENV})


def inspect(name: str) -> dict[str, Any]:
    """`docker inspect` of a container."""
    found: list[dict[str, Any]] = json.loads(docker("inspect", name).stdout)
    return found[0]


def engine_answers() -> bool:
    return subprocess.run(["curl", "-sf", "--unix-socket", SOCKET, "http://docker/_ping"], capture_output=True,
                          timeout=10).returncode == 0


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The Docker Engine's socket URL; the engine is started with .ci/docker-up if it does not answer (a test
    that needs it fails, not skips, if it cannot be)."""
    if not engine_answers():
        subprocess.run(["bash", str(ROOT / ".ci" / "docker-up")], check=True, timeout=120)
    assert engine_answers()
    return f"unix://{SOCKET}"


@pytest.fixture(scope="session")
def docker_network(docker_engine: str) -> str:
    """A user-defined bridge network with a subnet, for MAC and IP (no NAT: the engine runs with iptables off)."""
    if docker("network", "inspect", NETWORK, check=False).returncode != 0:
        docker("network", "create", "--driver", "bridge", "--subnet", SUBNET, NETWORK)
    return NETWORK


@pytest.fixture(scope="session")
def busybox_rootfs() -> Path:
    """The busybox root file system tarball (tests/guest/container.py)."""
    return ensure_rootfs(CACHE)


@pytest.fixture
def image_ref() -> Iterator[str]:
    """A fresh image reference, removed from the engine after the test."""
    reference = f"launcher-test/busybox-{uuid.uuid4().hex[:8]}:1"
    yield reference
    docker("rmi", "-f", reference, check=False)


def put_rootfs(image_dir: Path, reference: str, rootfs: Path) -> Path:
    """`rootfs` in `image_dir` under the name the image dir rule gives `reference` (a rootfs tarball)."""
    repository, _, tag = reference.rpartition(":")
    path = image_dir.joinpath(*repository.split("/"), f"{tag}.rootfs.tar")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(rootfs)
    return path


def put_archive(image_dir: Path, reference: str, rootfs: Path, saved_as: str | None = None) -> Path:
    """An image archive (docker save) of `saved_as` (default `reference`) in `image_dir`, named for
    `reference`."""
    repository, _, tag = reference.rpartition(":")
    path = image_dir.joinpath(*repository.split("/"), f"{tag}.image.tar")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_image(rootfs, saved_as or reference, path, [*DOCKER])


@attrs.define
class Recorder:
    """What a backend reported: events (type, fields) and log lines (dir name, message)."""

    events: list[tuple[str, dict[str, Any]]] = attrs.Factory(list)
    lines: list[tuple[str, str]] = attrs.Factory(list)
    steps: list[tuple[str, float]] = attrs.Factory(list)

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def log(self, instance_dir: Path, message: str) -> None:
        self.lines.append((instance_dir.name, message))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [fields for k, fields in self.events if k == kind]


@asynccontextmanager
async def docker_backend(data_dir: Path, settings: dict[str, Any], recorder: Recorder, *,
                         cleanup: bool = True) -> AsyncIterator[DockerBackend]:
    """The docker backend on `data_dir` with `settings` (the docker: section), through its entry point's function;
    with `cleanup`, every container of the data dir is removed afterwards (destroy_all); without, they stay, as
    a launcher killed with -9 leaves them."""
    host = BackendHost(data_dir=data_dir, limiter=trio.CapacityLimiter(8), emit=recorder.emit, log=recorder.log,
                       observe_step=lambda step, s: recorder.steps.append((step, s)))
    async with open_backend(settings, host) as backend:
        try:
            await backend.preflight()
            yield backend
        finally:
            if cleanup:
                with trio.CancelScope(shield=True):
                    await backend.destroy_all()


class Inbox:
    """A MonitorInbox that keeps what a monitor sent."""

    def __init__(self) -> None:
        self.sent: list[MonitorEvent] = []
        self._changed = trio.Event()

    async def send(self, event: MonitorEvent) -> None:
        self.sent.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, event: MonitorEvent, count: int = 1, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while self.sent.count(event) < count:
                await self._changed.wait()


def spec_for(reference: str, *, user_data: str = "", meta_data: str = "", **fields: Any) -> InstanceSpec:
    """A container's spec with a fresh uuid."""
    return InstanceSpec(instance_uuid=str(uuid.uuid4()), docker_image=reference, vm_type="docker",
                        user_data=user_data, meta_data=meta_data, **fields)


async def created(backend: DockerBackend, spec: InstanceSpec, data_dir: Path) -> DockerVirtualizer:
    """A virtualizer for `spec` with its image ensured and its container created (not started)."""
    vm = backend.new_virtualizer()
    instance_dir = data_dir / "instances" / spec.instance_uuid
    instance_dir.mkdir(parents=True, exist_ok=True)
    vm.init(spec, instance_dir, lambda: ())
    await vm.ensure_backing_image()
    await vm.create_image(spec.user_data, spec.meta_data, None)
    return vm

