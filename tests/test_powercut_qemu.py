"""Power cuts under a real `launcher serve` with the qemu virtualizer: the image store, the volume records (and
their libvirt pool) and the instances' seeds and overlays keep every acknowledged effect, and nothing is left
half-written.

The storm test of tests/test_powercut.py, with real libvirtd and QEMU (TCG) instead of the simulation, and fewer
rounds. The data dir is the power-cut file system (tests/powercut_fs.py) mounted under a `QemuTestRoot`, where
QEMU (as libvirt-qemu) reaches it; the launcher's own volume pool is a libvirt dir pool inside it. Each round:
mount, start a launcher (`recovery.restart_running: always`), check that it holds every effect acknowledged
before the last cut, then a few clients at once START tiny guests, STOP and DELETE them, import small images
(each with its own content, from an allowed import source dir) and create, resize and delete volumes; the power
is cut after a seeded number of acknowledgements. The launcher is killed and its VMs destroyed (the power took
them too; their domains stay defined, as after a real power loss), the file system stops, and the host
"reboots" (the data dir's boot id is another boot's). Every overlay the cut left is checked with `qemu-img
check`; the next launcher must then have:

- every acknowledged image in GET /v1/images with its source's sha256, its file intact (same sha256);
- every acknowledged volume in GET /v1/volumes with its size, each with one record and one file in the pool;
- every acknowledged instance, back running (or exited, if STOPped), with an overlay and a seed that
  cloud-init's own code reads (tests/cloudinit_read.py) with its uuid as instance-id; a deleted one has no
  domain and no instance dir;
- no temp file in the image store, the volume records or the pool.

As in test_powercut.py, an answer that came after the cut proves nothing (`Cut.acknowledged`), and a command
left unanswered may or may not have happened. `POWERCUT_SEED` and `POWERCUT_QEMU_ROUNDS` (environment) replay
or lengthen a run; a failure names its seed and round.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import libvirt
import pytest
from conftest import EXAMPLE_IMAGE_IDS, ROOT, LauncherProcess, QemuTestRoot
from powercut import PowerCutMount, launcher_env, unmount_stale
from test_host_reboot import OTHER_BOOT
from test_powercut import JSON, YAML, Cut, Instance, Model, Volume, Worker, _Unanswered, check, storm

from launcher.cli.client import Client, ClientError
from launcher.core.bootid import BOOT_ID_FILE
from virtualizers.qemu.domain import read_metadata
from virtualizers.qemu.images import TMP_DIR
from virtualizers.qemu.instance_files import OVERLAY, SEED
from virtualizers.qemu.volume_records import RECORDS_DIR
from virtualizers.qemu.volumes import VOLUMES_DIR

pytestmark = pytest.mark.powercut

SEED_NUMBER = int(os.environ.get("POWERCUT_SEED", "1707"))
ROUNDS = int(os.environ.get("POWERCUT_QEMU_ROUNDS", "5"))
WORKERS = 2
LIVE_INSTANCES = 2  # per worker: its instances not deleted (each a TCG guest on a busy 2-core machine)
SOURCES_PER_WORKER = ROUNDS + 2  # images each worker may import, one new id each
GUEST_IMAGE = EXAMPLE_IMAGE_IDS[0]
SYSTEM_PYTHON = Path("/usr/bin/python3")  # the Python with Debian's cloud-init (tests/cloudinit_read.py)
READER = Path(__file__).resolve().parent / "cloudinit_read.py"
LOG = ROOT / ".cache" / "powercut" / "qemu-serve.log"  # the launchers' log of the last run, kept for a failure


@attrs.define
class Image:
    """What the acknowledged imports say of one image id: imported or not; `maybe` the other outcome of an import
    the cut left unanswered. `sha256` is its source's."""

    sha256: str
    imported: bool = False
    maybe: bool | None = None

    def outcomes(self) -> list[bool]:
        return [self.imported] + ([self.maybe] if self.maybe is not None else [])


class QemuWorker(Worker):
    """A `Worker` whose commands suit real guests: START (at most LIVE_INSTANCES alive), STOP, DELETE, image
    imports from its own source files, volume create (qcow2 or raw) / resize / delete. Ids are fresh uuids (a
    domain is named after its instance: ids must not meet another run's)."""

    def __init__(self, name: str, rng: random.Random, sources: list[tuple[Path, str]]) -> None:
        super().__init__(name, rng)
        self.sources = sources  # (file, its sha256) not imported yet
        self.images: dict[str, Image] = {}

    def new_id(self) -> str:
        return str(uuid_module.uuid4())

    def step(self, client: Client, cut: Cut) -> None:
        instances = [uuid for uuid, instance in self.instances.items() if instance.goal]
        volumes = [vid for vid, volume in self.volumes.items() if volume.size_mb is not None]
        choice = self.rng.random()
        if (choice < 0.25 and len(instances) < LIVE_INSTANCES) or (choice < 0.5 and not instances):
            uuid = self.new_id()
            self.instances[uuid] = instance = Instance()
            wait = self.rng.random() < 0.5  # answered once the VM runs: a cut after its files were made
            self.command(cut, f"START {uuid}{' (wait)' if wait else ''}", instance, ("running", frozenset()),
                         lambda: client.request("POST", "/v1/instances", start_payload(uuid), YAML,
                                                **({"wait": 1, "timeout": 120} if wait else {})), waited=wait)
        elif choice < 0.35 and instances:
            uuid = self.rng.choice(instances)
            instance = self.instances[uuid]
            self.command(cut, f"STOP {uuid}", instance, ("exited", instance.volumes),
                         lambda: client.request("POST", f"/v1/instances/{uuid}/stop", grace=0))
        elif choice < 0.45 and instances:
            uuid = self.rng.choice(instances)
            self.command(cut, f"DELETE {uuid}", self.instances[uuid], (None, frozenset()),
                         lambda: client.request("DELETE", f"/v1/instances/{uuid}"))
        elif choice < 0.65 and self.sources:
            source, sha256 = self.sources.pop()
            image_id = f"img-{self.new_id()}"
            self.images[image_id] = image = Image(sha256)
            self.image_command(cut, f"IMPORT {image_id} {source.name}", image,
                               lambda: import_image(client, source, image_id))
        elif choice < 0.8 or not volumes:
            volume_id = self.new_id()
            self.volumes[volume_id] = volume = Volume()
            size, fmt = self.rng.randrange(1, 64), self.rng.choice(("qcow2", "raw"))
            body = json.dumps({"id": volume_id, "size_mb": size, "format": fmt}).encode()
            self.volume_command(cut, f"CREATE {volume_id} {size} {fmt}", volume, size,
                                lambda: client.request("POST", "/v1/volumes", body, JSON))
        elif choice < 0.9:
            volume_id = self.rng.choice(volumes)
            volume = self.volumes[volume_id]
            size = (volume.size_mb or 0) + self.rng.randrange(1, 16)
            body = json.dumps({"size_mb": size}).encode()
            self.volume_command(cut, f"RESIZE {volume_id} {size}", volume, size,
                                lambda: client.request("POST", f"/v1/volumes/{volume_id}/resize", body, JSON))
        else:
            volume_id = self.rng.choice(volumes)
            self.volume_command(cut, f"DELETE {volume_id}", self.volumes[volume_id], None,
                                lambda: client.request("DELETE", f"/v1/volumes/{volume_id}"))

    def image_command(self, cut: Cut, what: str, image: Image, call: Any) -> None:
        answer = self.call(what, call)
        unanswered = not isinstance(answer, (dict, ClientError)) or \
            isinstance(answer, ClientError) and answer.code == "import_interrupted"
        if unanswered or not cut.acknowledged():  # the cut took the answer, or it came after the cut
            image.maybe = True
            raise _Unanswered
        assert not isinstance(answer, ClientError), f"an import was refused: {answer}"
        image.imported = True


class QemuModel(Model):
    @property
    def images(self) -> dict[str, Image]:
        return {image_id: image for worker in self.workers for image_id, image in worker.images.items()
                if isinstance(worker, QemuWorker)}


def start_payload(uuid: str) -> bytes:
    """A START of the smallest test guest: 1 vCPU, 128 MiB, no NIC; no meta-data (its instance-id is `uuid`)."""
    return (f"start:\n  instance_uuid: {uuid}\n  image_uuid: {GUEST_IMAGE}\n  fw_type: legacy\n"
            "  requested_resources:\n    - type: vcpus\n      value: 1\n    - type: mem_mb\n      value: 128\n"
            ).encode()


def import_image(client: Client, source: Path, image_id: str) -> dict[str, Any]:
    """POST /v1/images: its final line, ClientError if it is an error (import_interrupted: no final line)."""
    final: dict[str, Any] = {}
    buffer = b"".join(client.stream("/v1/images", method="POST", source=str(source), id=image_id, read_timeout=60))
    for line in buffer.splitlines():
        with contextlib.suppress(ValueError):  # a line the cut tore
            answer = json.loads(line)
            if "progress" not in answer:
                final = answer
    if "error" in final:
        raise ClientError(final["error"], final.get("reason", ""))
    if "image" not in final:
        raise ClientError("import_interrupted", "the launcher ended the import without an answer")
    return final


def make_sources(directory: Path, rng: random.Random) -> list[tuple[Path, str]]:
    """WORKERS * SOURCES_PER_WORKER small images, raw and qcow2 in turn, each with its own content (so its own
    sha256); (file, sha256) each."""
    made = []
    for n in range(WORKERS * SOURCES_PER_WORKER):
        raw = directory / f"source-{n}.raw"
        with open(raw, "wb") as file:
            file.truncate(1 << 20)
            file.write(rng.randbytes(4096 * (1 + n % 4)))
        path = raw
        if n % 2:
            path = raw.with_suffix(".qcow2")
            subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(path)], check=True,
                           timeout=60)
            raw.unlink()
        made.append((path, hashlib.sha256(path.read_bytes()).hexdigest()))
    return made


def destroy_domains_under(root: Path) -> None:
    """Destroy (not undefine) every running domain of a launcher whose data dir is under `root`: a power loss."""
    prefix = str(root) + "/"
    connection = libvirt.open("qemu:///system")
    try:
        for dom in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):  # gone meanwhile
                meta = read_metadata(dom.XMLDesc(0))
                if meta is not None and (meta.data_dir + "/").startswith(prefix):
                    dom.destroy()
    finally:
        connection.close()


def defined_domains() -> set[str]:
    connection = libvirt.open("qemu:///system")
    try:
        return {dom.name() for dom in connection.listAllDomains()}
    finally:
        connection.close()


def check_overlays(disk: Path, where: str) -> None:
    """`qemu-img check` passes on every overlay the cut left (leaked clusters, exit 3, are allowed: a crash may
    leak, never corrupt). Its backing file is named by its path on the mount, so it is checked without it."""
    for overlay in sorted(disk.glob(f"instances/*/{OVERLAY}")):
        alone = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(overlay)}, "backing": None})
        done = subprocess.run(["qemu-img", "check", f"json:{alone}"], capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, 3), f"{where}: qemu-img check {overlay}: {done.stdout}{done.stderr}"


def check_qemu(client: Client, data_dir: Path, model: QemuModel, where: str) -> None:
    """After test_powercut.check (instances and volumes as acknowledged): the images, the volumes' records and
    pool, the instances' overlays, seeds and domains, and no temp file; then the model takes the images found."""
    images = {image["id"]: image for image in client.request("GET", "/v1/images")["images"]}
    problems = []
    for image_id, image in model.images.items():
        if (image_id in images) not in image.outcomes():
            problems.append(f"image {image_id}: {'found' if image_id in images else 'missing'}, expected one of "
                            f"{image.outcomes()}")
        elif image_id in images and images[image_id]["sha256"] != image.sha256:
            problems.append(f"image {image_id}: sha256 {images[image_id]['sha256']}, its source's {image.sha256}")
    problems += [f"image {i}: never acknowledged" for i in images.keys() - model.images.keys() - {GUEST_IMAGE}]
    store = data_dir / "images"
    for image_id, image in images.items():
        if hashlib.sha256((store / f"{image_id}.img").read_bytes()).hexdigest() != image["sha256"]:
            problems.append(f"image {image_id}: its file is not what was imported")
    leftovers = [name for name in os.listdir(store) if name != TMP_DIR and not name.endswith((".img", ".json"))]
    leftovers += os.listdir(store / TMP_DIR)
    problems += [f"image store: a temp file was left behind: {name}" for name in leftovers]

    volumes = {volume["id"] for volume in client.request("GET", "/v1/volumes")["volumes"]}
    records = {path.name for path in (data_dir / RECORDS_DIR).iterdir()}
    pool = {path.name for path in (data_dir / VOLUMES_DIR).iterdir()}
    problems += [f"volume records: a temp file was left behind: {name}" for name in records
                 if name.startswith(".") or not name.endswith(".json")]
    if {name.removesuffix(".json") for name in records} != volumes or \
            {name.rpartition(".")[0] for name in pool} != volumes or len(pool) != len(volumes):
        problems.append(f"volumes {sorted(volumes)}, records {sorted(records)}, pool {sorted(pool)} disagree")

    domains = defined_domains()
    live = {uuid for uuid, instance in model.instances.items() if instance.goal}
    for uuid in model.instances.keys() - live:
        if f"launcher-{uuid}" in domains or (data_dir / "instances" / uuid).exists():
            problems.append(f"instance {uuid}: deleted, but its domain or dir is left")
    for uuid in live:
        instance_dir = data_dir / "instances" / uuid
        missing = [name for name in (OVERLAY, SEED) if not (instance_dir / name).exists()]
        if missing:
            problems.append(f"instance {uuid}: no {', '.join(missing)}")
        problems += [f"instance {uuid}: a temp file was left behind: {path.name}" for path in instance_dir.iterdir()
                     if path.name.endswith(".tmp")]
    seeds = {uuid: data_dir / "instances" / uuid / SEED for uuid in sorted(live)}
    found = read_seeds({uuid: seed for uuid, seed in seeds.items() if seed.exists()})
    problems += [f"instance {uuid}: its seed's instance-id is {found[uuid]!r}" for uuid in found
                 if found[uuid] != uuid]
    if problems:
        ids = {problem.split()[1].rstrip(":") for problem in problems}
        history = [line for worker in model.workers for line in worker.history if set(line.split()) & ids]
        raise AssertionError(f"{where}: {problems[:10]}\nwhat the clients did with them:\n" + "\n".join(history))
    for image_id, image in model.images.items():
        image.imported, image.maybe = image_id in images, None


def summary(model: QemuModel) -> str:
    """What the launcher holds, as checked (`pytest -s` shows it for each round)."""
    goals = [instance.goal for instance in model.instances.values()]
    return (f"{goals.count('running')} running, {goals.count('exited')} exited, {goals.count(None)} deleted "
            f"instances; {sum(v.size_mb is not None for v in model.volumes.values())} of {len(model.volumes)} "
            f"volumes; {sum(i.imported for i in model.images.values())} of {len(model.images)} images")


def read_seeds(seeds: dict[str, Path]) -> dict[str, str]:
    """The instance-id cloud-init's NoCloud datasource reads from each seed ISO, by instance uuid."""
    if not seeds:
        return {}
    import pycdlib

    with tempfile.TemporaryDirectory() as tmp:
        argv = []
        for uuid, iso_path in seeds.items():
            directory = Path(tmp) / uuid
            directory.mkdir()
            iso = pycdlib.PyCdlib()
            iso.open(str(iso_path))
            try:
                for child in iso.list_children(rr_path="/"):
                    name = child.rock_ridge.name().decode() if child.rock_ridge else ""
                    if child.is_file() and name:
                        data = io.BytesIO()
                        iso.get_file_from_iso_fp(data, rr_path=f"/{name}")
                        (directory / name).write_bytes(data.getvalue())
            finally:
                iso.close()
            argv += ["nocloud", str(directory)]
        done = subprocess.run([str(SYSTEM_PYTHON), str(READER), *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"cloud-init could not read the seeds: {done.stderr[-2000:]}"
    return {uuid: result["instance_id"] for uuid, result in zip(seeds, json.loads(done.stdout), strict=True)}


@attrs.define
class Node:
    """The test's launcher on its power-cut mount, torn down whatever happens (`teardown`)."""

    root: QemuTestRoot
    disk: Path
    mountpoint: Path
    settings: dict[str, Any]
    keep: Path  # where the launchers' log is kept
    fs: PowerCutMount | None = None
    launcher: LauncherProcess | None = None

    def up(self) -> Client:
        self.fs = PowerCutMount(self.disk, self.mountpoint)
        self.fs.start()
        self.launcher = LauncherProcess(self.mountpoint, self.settings, env=launcher_env())
        return self.launcher.start(timeout=90)

    def power_cut(self) -> None:
        """What follows the cut: the launcher and the VMs die, the file system is gone, the host reboots."""
        assert self.fs is not None and self.launcher is not None
        self.launcher.kill()
        destroy_domains_under(self.root.path)
        self.fs.stop()
        self.fs = None
        (self.disk / BOOT_ID_FILE).write_text(OTHER_BOOT + "\n")

    def teardown(self) -> None:
        """Kill the launcher; `launcher hard-reset` on the mount if it still serves (as qemu_factory does); then
        unmount and remove the root with every domain and pool left under it."""
        failed = ""
        try:
            if self.launcher is not None:
                self.launcher.kill()
            if self.fs is not None and self.fs.proc is not None and self.launcher is not None:
                reset = subprocess.run(
                    [sys.executable, "-m", "launcher.cli", "hard-reset", "--yes", "--config",
                     str(self.launcher.config_path), "--data-dir", str(self.mountpoint)],
                    capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **launcher_env()})
                failed = reset.stderr.strip() if reset.returncode else ""
        finally:
            try:
                if self.fs is not None and self.fs.proc is not None:
                    self.fs.proc.kill()
                    self.fs.proc.wait(timeout=60)
            finally:
                unmount_stale(self.mountpoint)
                if self.launcher is not None and self.launcher.log_path.exists():
                    self.keep.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(self.launcher.log_path, self.keep)
                self.root.remove()
        assert not failed, f"launcher hard-reset failed: {failed}"


@pytest.fixture
def node(guest_image_dir: Path, stale_test_runs_removed: None) -> Iterator[Node]:
    root = QemuTestRoot.create()
    disk, mountpoint, sources = root.path / "disk", root.path / "data", root.path / "sources"
    for directory in (disk, mountpoint, sources):
        directory.mkdir(mode=0o711)
    settings = {
        "virtualizer": "qemu",
        "qemu": {"image_dirs": [str(guest_image_dir)], "import_sources": [str(sources)]},
        "recovery": {"restart_running": "always"},
    }
    made = Node(root, disk, mountpoint, settings, LOG)
    try:
        yield made
    finally:
        made.teardown()


def test_acknowledged_effects_survive_power_cuts_with_qemu(node: Node) -> None:
    rng = random.Random(SEED_NUMBER)
    sources = make_sources(node.root.path / "sources", random.Random(rng.random()))
    workers = [QemuWorker(f"{n + 1:x}", random.Random(rng.random()), sources[n::WORKERS]) for n in range(WORKERS)]
    model = QemuModel(workers)
    for round_number in range(ROUNDS):
        where = f"seed {SEED_NUMBER}, round {round_number}"
        client = node.up()
        assert node.fs is not None and node.launcher is not None
        check(client, node.mountpoint, model, where)
        check_qemu(client, node.mountpoint, model, where)
        print(f"{where}: {summary(model)}")
        fs, launcher = node.fs, node.launcher
        storm(client, workers, model, Cut(after_acks=rng.randrange(1, 12)), round_number, where, launcher,
              cut_power=lambda: (fs.cut(), node.power_cut()), stall_s=180)
        check_overlays(node.disk, where)
    where = f"seed {SEED_NUMBER}, after the last round"
    client = node.up()
    check(client, node.mountpoint, model, where)
    check_qemu(client, node.mountpoint, model, where)
    print(f"{where}: {summary(model)}")
