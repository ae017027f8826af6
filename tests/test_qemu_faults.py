"""Engine faults injected for real into a `launcher serve` with the qemu virtualizer: real libvirtd, real QEMU (TCG
here) and the test guest of tests/guest/. (tests/test_interrupted.py and tests/test_faults.py inject the same
faults under the simulation virtualizer.)

- `kill -9` of the launcher in each phase of a START: while its backing image is imported (held half-way by the
  test's HTTP server), while its overlay is made (`qemu-img create` held in its open() of the backing image by a
  write lease the test holds), while its domain is defined (libvirtd frozen with SIGSTOP), while the defined
  domain is started (virtlogd frozen), and once its VM runs. Each phase is entered for certain before the kill:
  the test sees it (the half-written import, the lease being broken, the instance dir handed to QEMU's group, the
  define step in the instance's log), never guesses it with a sleep.
- the data dir on a small tmpfs that fills up: an image import cut short by ENOSPC, a START whose record the disk
  refuses, and START working again once there is room.
- a guest that ignores hot-unplug requests: DETACH fails with `detach_failure` within `detach_timeout_s`.
- 20 tiny VMs found running, not restarted, by a launcher started again after `kill -9`.

Every wait is a poll with a deadline; teardown leaves no domain, pool, mount or process behind (`qemu_factory`,
`qemu_test_root`, and `small_data_dir` for the tmpfs). `test_kill_9_while_the_domain_is_defined` freezes the
shared system libvirtd, and `test_kill_9_while_the_domain_is_started` virtlogd, for about a second each."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import psutil
import pytest
from conftest import LauncherProcess, QemuTestRoot
from libvirt_cleanup import remove_domains_under, remove_pools_under
from test_faults import Filler, serving
from test_interrupted import journal_seq
from test_qemu import (
    IMAGE_ID,
    _stats_resume,
    conn,
    domain_of,
    guest_lines,
    new_uuid,
    payload_for,
    start,
    state,
    wait_for,
    wait_guest_ready,
)
from test_recovery import all_events
from test_volumes_hotplug import disk_lines, domain_serials, instance_volumes

from launcher.cli.client import Client, ClientError
from launcher.durable.records import InstanceRecord
from virtualizers.qemu.domain import read_metadata
from virtualizers.qemu.image_import import CHUNK_SIZE

QEMU_PID_DIR = Path("/run/libvirt/qemu")


# ------------------------------------------------------------------------------------------------ helpers


def instance_dir(launcher: LauncherProcess, uuid: str) -> Path:
    return launcher.data_dir / "instances" / uuid


def instance_log(launcher: LauncherProcess, uuid: str) -> str:
    """The instance's launcher.log as written so far (the launcher flushes it every 0.2 s)."""
    path = instance_dir(launcher, uuid) / "launcher.log"
    return path.read_text(errors="replace") if path.exists() else ""


def record_of(launcher: LauncherProcess, uuid: str) -> InstanceRecord:
    return InstanceRecord.from_json((instance_dir(launcher, uuid) / "instance.json").read_bytes())


def half_written(data_dir: Path) -> list[str]:
    """What only an unfinished write leaves in the data dir: temp files (`*.tmp`: overlays, seeds, JSON files),
    anything in the image store's `.tmp/` (imports), instance dirs being removed (`.deleting-*`)."""
    found = {path for path in data_dir.rglob("*")
             if (path.name.endswith(".tmp") and not path.is_dir()) or ".deleting-" in path.name}
    imports = data_dir / "images" / ".tmp"
    found |= set(imports.iterdir()) if imports.exists() else set()
    return sorted(str(path.relative_to(data_dir)) for path in found)


def domains_of(data_dir: Path) -> list[str]:
    """The names of the libvirt domains (defined or running) whose launcher metadata names `data_dir`."""
    names = []
    with contextlib.closing(conn()) as connection:
        for dom in connection.listAllDomains():
            with contextlib.suppress(libvirt.libvirtError):  # undefined meanwhile
                meta = read_metadata(dom.XMLDesc(0))
                if meta is not None and meta.data_dir == str(data_dir):
                    names.append(dom.name())
    return sorted(names)


def qemu_pid(uuid: str) -> int:
    """The pid of the instance's QEMU, from libvirtd's pidfile."""
    return int((QEMU_PID_DIR / f"launcher-{uuid}.pid").read_text())


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def instance_states(client: Client, uuid: str, after: int) -> list[tuple[str, str | None, bool | None]]:
    """(state, reason, recovered) of the instance's `instance_state` events after seq `after`."""
    return [(e["state"], e.get("reason"), e.get("recovered")) for e in all_events(client)
            if e["seq"] > after and e["type"] == "instance_state" and e.get("instance_uuid") == uuid]


def assert_journal_whole(client: Client) -> None:
    """The journal's events are numbered 1, 2, 3, ... without a gap or a repeat, across every kill."""
    seqs = [e["seq"] for e in all_events(client)]
    assert seqs == list(range(1, len(seqs) + 1))


def small_payload(uuid: str, image_id: str = IMAGE_ID, mem_mb: int = 370, user_data: str = "") -> bytes:
    """start_legacy.yaml for `uuid`, booting `image_id` with one vCPU and `mem_mb`, and `user_data` added at the
    top of its cloud-config."""
    payload = payload_for("start_legacy.yaml", uuid).decode()
    payload = payload.replace(IMAGE_ID, image_id).replace("value: 370", f"value: {mem_mb}")
    payload = payload.replace("       value: 2\n", "       value: 1\n")
    return payload.replace("#cloud-config\n", f"#cloud-config\n{user_data}").encode()


def import_guest(launcher: LauncherProcess, guest_image: Path, image_id: str = IMAGE_ID) -> Path:
    """Import the test guest into the launcher's image store (from its drop dir) as `image_id`; the image's path."""
    staged = launcher.data_dir / "import" / "guest.qcow2"
    staged.write_bytes(guest_image.read_bytes())
    done = launcher.cli("images", "import", str(staged), "--id", image_id)
    assert done.returncode == 0, done.stderr
    staged.unlink()
    return launcher.data_dir / "images" / f"{image_id}.img"


def resumed_to_running(launcher: LauncherProcess, uuid: str, seq: int) -> Client:
    """Start the killed launcher again: the interrupted START is carried on (`pending`, `start_resumed`,
    recovered) to `running`, and the guest boots once, on a disk of its own."""
    client = launcher.start(timeout=60)
    wait_for(f"{uuid} running", lambda: state(client, uuid) == "running")
    states = wait_for("the running event", lambda: (found := instance_states(client, uuid, seq))
                      and found[-1][0] == "running" and found)
    assert states == [("pending", "start_resumed", True), ("running", None, None)]
    line = wait_guest_ready(launcher, uuid)
    assert line["boots"] == "1" and len(guest_lines(launcher, uuid)) == 1  # one boot, on a fresh overlay
    assert domains_of(launcher.data_dir) == [f"launcher-{uuid}"]
    record = record_of(launcher, uuid)
    assert (record.created, record.goal) == (True, "running")
    return client


def stop_delete_and_nothing_left(launcher: LauncherProcess, client: Client, uuid: str) -> None:
    """STOP and DELETE work on the instance; then no domain, no instance dir, no half-written file is left, and the
    journal is whole."""
    assert client.request("POST", f"/v1/instances/{uuid}/stop", wait=1, timeout=120)["state"] == "exited"
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    assert domains_of(launcher.data_dir) == []
    assert not instance_dir(launcher, uuid).exists()
    assert half_written(launcher.data_dir) == []
    assert_journal_whole(client)


# ------------------------------------------------------------------------------------------------ kill -9 in a START


class HeldImage:
    """An HTTP server (threads of the test) for `qemu.image_url`: it serves `image` at /<id>.qcow2. The first GET
    gets the Content-Length and the first half of the bytes (whole chunks of the import, which writes chunk by
    chunk), then nothing until `release()`; later GETs get the whole image. `<id>.qcow2.sha256` is 404 (no
    published digest)."""

    def __init__(self, image: Path) -> None:
        self.data = image.read_bytes()
        self.half = len(self.data) // 2 // CHUNK_SIZE * CHUNK_SIZE
        self.half_sent = threading.Event()
        self.released = threading.Event()
        self.gets = 0
        held = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if not self.path.endswith(".qcow2"):
                    self.send_error(404)
                    return
                held.gets += 1
                first = held.gets == 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(held.data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the launcher may be killed meanwhile
                    self.wfile.write(held.data[:held.half] if first else held.data)
                    self.wfile.flush()
                    if first:
                        held.half_sent.set()
                        held.released.wait(300)
                        self.wfile.write(held.data[held.half:])

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{{id}}.qcow2"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held_image(guest_image: Path) -> Iterator[HeldImage]:
    server = HeldImage(guest_image)
    try:
        yield server
    finally:
        server.close()


def test_kill_9_while_the_backing_image_is_imported(qemu_factory: Any, held_image: HeldImage) -> None:
    """Killed while ensure_backing_image downloads the image (half of it in the store's `.tmp/`): the restarted
    launcher removes the half-written import, carries the START on (the image imported whole, once), and the guest
    boots once; no domain was left by the dead launcher, and STOP and DELETE then clean up everything."""
    launcher = qemu_factory({"image_url": held_image.url_template})
    client = launcher.client()
    uuid, image_id = new_uuid(), "held-guest"
    assert start(client, small_payload(uuid, image_id))["state"] == "pending"  # acknowledged: durable
    imports = launcher.data_dir / "images" / ".tmp"
    wait_for("half the image in the store's .tmp/", lambda: held_image.half_sent.is_set() and any(
        path.stat().st_size == held_image.half for path in imports.iterdir()), timeout=60)
    launcher.kill(signal.SIGKILL)
    held_image.release()
    seq = journal_seq(launcher.data_dir)
    assert [path.name.split(".")[0] for path in imports.iterdir()] == [image_id]  # the half-written import
    assert not (launcher.data_dir / "images" / f"{image_id}.img").exists()
    assert not {"overlay.qcow2", "seed.iso"} & {p.name for p in instance_dir(launcher, uuid).iterdir()}
    assert record_of(launcher, uuid).created is False
    assert domains_of(launcher.data_dir) == []

    client = resumed_to_running(launcher, uuid, seq)
    assert [i["id"] for i in client.request("GET", "/v1/images")["images"]] == [image_id]
    assert held_image.gets == 2  # the second launcher downloaded it again, whole
    assert half_written(launcher.data_dir) == []
    stop_delete_and_nothing_left(launcher, client, uuid)


@contextlib.contextmanager
def write_lease(path: Path) -> Iterator[int]:
    """Hold a write lease on `path` (fcntl F_SETLEASE): while it is held, anyone else's open() of the file blocks
    in the kernel (for at most /proc/sys/fs/lease-break-time, 45 s by default). Yields the file's inode."""
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # how the kernel tells the holder to let go
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        yield os.fstat(fd).st_ino
    finally:
        os.close(fd)  # the lease goes with it: the blocked open() returns
        signal.signal(signal.SIGIO, previous)


def lease_being_broken(inode: int) -> bool:
    """Whether someone's open() waits for the lease on `inode` (/proc/locks: "LEASE  BREAKING ... <dev>:<inode>")."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:3] == ["LEASE", "BREAKING"] and fields[5].endswith(f":{inode}"):
            return True
    return False


def qemu_img_for(directory: Path) -> list[psutil.Process]:
    """The qemu-img processes working on a file of `directory`."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "qemu-img" and any(str(directory) in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_kill_9_while_the_overlay_is_made(qemu_factory: Any, guest_image: Path) -> None:
    """Killed while create_image's `qemu-img create` makes the overlay (held in its open() of the backing image):
    nothing has the overlay's name (the orphaned qemu-img can only have written its temp file); the restarted
    launcher makes the overlay again, on the same backing image, and the guest boots once."""
    launcher = qemu_factory()
    client = launcher.client()
    uuid = new_uuid()
    image = import_guest(launcher, guest_image)
    with write_lease(image) as inode:
        assert start(client, small_payload(uuid))["state"] == "pending"
        wait_for("qemu-img create to open the backing image", lambda: lease_being_broken(inode), timeout=60)
        [qemu_img] = wait_for("the overlay's qemu-img", lambda: qemu_img_for(instance_dir(launcher, uuid)))
        assert "create" in qemu_img.cmdline() and state(client, uuid) == "pending"
        launcher.kill(signal.SIGKILL)
    wait_for("the orphaned qemu-img to end", lambda: gone(qemu_img.pid), timeout=60)
    seq = journal_seq(launcher.data_dir)
    left = {p.name for p in instance_dir(launcher, uuid).iterdir()}
    assert not {"overlay.qcow2", "seed.iso"} & left, left
    assert record_of(launcher, uuid).created is False
    assert domains_of(launcher.data_dir) == []

    client = resumed_to_running(launcher, uuid, seq)
    overlay = instance_dir(launcher, uuid) / "overlay.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True, timeout=60).stdout)
    assert info["backing-filename"] == str(image)
    assert half_written(launcher.data_dir) == []  # the orphan's overlay.qcow2.tmp, if any, was replaced
    stop_delete_and_nothing_left(launcher, client, uuid)


@contextlib.contextmanager
def frozen(daemon: str) -> Iterator[None]:
    """The system's `daemon` (libvirtd, virtlogd) stopped with SIGSTOP (there is no second system daemon to freeze
    instead; tests/test_qemu.py's bounded-calls test freezes libvirtd the same way); SIGCONT whatever happens,
    then wait until libvirt answers again."""
    pid = int(subprocess.run(["pgrep", "-x", daemon], capture_output=True, text=True, check=True).stdout.split()[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        wait_for("libvirtd to answer", lambda: subprocess.run(
            ["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30).returncode == 0, timeout=60)


def test_kill_9_while_the_domain_is_defined(qemu_factory: Any, guest_image: Path) -> None:
    """Killed in start_vm while libvirtd is frozen (SIGSTOP): the overlay and seed are made, the domain may or may
    not have been defined by the time libvirtd reads the dead launcher's request, but never started. The
    restarted launcher carries the START on (start_vm defines the domain again) and the guest boots once; one
    domain only, removed by DELETE."""
    launcher = qemu_factory()
    client = launcher.client()
    uuid = new_uuid()
    import_guest(launcher, guest_image)  # ensure_backing_image then finds it at once
    qemu_group = grp.getgrnam("libvirt-qemu").gr_gid
    directory = instance_dir(launcher, uuid)
    with frozen("libvirtd"):
        assert start(client, small_payload(uuid))["state"] == "pending"
        # start_vm hands the instance dir to QEMU's group right before it calls defineXML, which cannot return.
        wait_for("start_vm", lambda: "step seed:" in instance_log(launcher, uuid)
                 and directory.stat().st_gid == qemu_group, timeout=60)
        assert state(client, uuid) == "pending" and "start_failure" not in instance_log(launcher, uuid)
        launcher.kill(signal.SIGKILL)
    seq = journal_seq(launcher.data_dir)
    assert {"overlay.qcow2", "seed.iso"} <= {p.name for p in directory.iterdir()}
    assert record_of(launcher, uuid).created is False
    dom = domain_of(uuid)
    assert dom is None or not dom.isActive()  # defined or not, never started

    client = resumed_to_running(launcher, uuid, seq)
    assert half_written(launcher.data_dir) == []
    stop_delete_and_nothing_left(launcher, client, uuid)


def test_kill_9_while_the_domain_is_started(qemu_factory: Any, guest_image: Path) -> None:
    """Killed in start_vm after the domain was defined, while libvirt starts it (held by virtlogd, which must open
    the domain's logs first, frozen with SIGSTOP): libvirtd finishes that start on its own once virtlogd runs
    again, so the VM runs while the record still says `created: false` (start_vm never returned). The restarted
    launcher reconnects to it (`running`, `recovered`: the same QEMU, no second boot) and completes the record;
    one domain, removed by DELETE."""
    launcher = qemu_factory()
    client = launcher.client()
    uuid = new_uuid()
    import_guest(launcher, guest_image)
    with frozen("virtlogd"):
        assert start(client, small_payload(uuid))["state"] == "pending"
        wait_for("the domain defined", lambda: "step define:" in instance_log(launcher, uuid), timeout=60)
        assert state(client, uuid) == "pending" and "step start:" not in instance_log(launcher, uuid)
        launcher.kill(signal.SIGKILL)
    seq = journal_seq(launcher.data_dir)
    assert record_of(launcher, uuid).created is False
    dom = domain_of(uuid)
    assert dom is not None
    wait_for("libvirtd to finish the start", dom.isActive, timeout=60)
    pid = qemu_pid(uuid)

    client = launcher.start(timeout=60)
    wait_for("the recovered event", lambda: instance_states(client, uuid, seq))
    assert instance_states(client, uuid, seq) == [("running", None, True)]
    assert wait_for("the record completed", lambda: record_of(launcher, uuid).created, timeout=30)
    assert qemu_pid(uuid) == pid and wait_guest_ready(launcher, uuid)["boots"] == "1"
    assert len(guest_lines(launcher, uuid)) == 1 and domains_of(launcher.data_dir) == [f"launcher-{uuid}"]
    assert half_written(launcher.data_dir) == []
    stop_delete_and_nothing_left(launcher, client, uuid)


def test_kill_9_once_the_vm_runs(qemu_factory: Any) -> None:
    """Killed once the START is done (`running`, the guest booted): the restarted launcher reconnects to the same
    QEMU process (same pid, same domain id), reports it `running` and `recovered`, and the guest never boots
    again; its stats come back."""
    launcher = qemu_factory(intervals={"instance_stats_s": 1, "stats_snapshot_s": 1})
    client = launcher.client()
    uuid = new_uuid()
    assert start(client, small_payload(uuid), wait=1, timeout=120)["state"] == "running"
    wait_guest_ready(launcher, uuid)
    dom = domain_of(uuid)
    assert dom is not None
    before = (qemu_pid(uuid), dom.ID())
    launcher.kill(signal.SIGKILL)
    seq = journal_seq(launcher.data_dir)

    client = launcher.start(timeout=60)
    restarted = time.time()
    wait_for("the recovered event", lambda: instance_states(client, uuid, seq))
    assert instance_states(client, uuid, seq) == [("running", None, True)]
    assert state(client, uuid) == "running"
    dom = domain_of(uuid)
    assert dom is not None and (qemu_pid(uuid), dom.ID()) == before
    assert len(guest_lines(launcher, uuid)) == 1  # no second boot
    _stats_resume(client, [uuid], restarted)
    stop_delete_and_nothing_left(launcher, client, uuid)


# ------------------------------------------------------------------------------------------------ a full data dir

TMPFS_MB = 40  # the two images of the test (11 MB each) and a few MB of instance files fit; the test fills the rest
IMPORT_ROOM = 6 << 20  # bytes left free for an import of the 11 MB image: it runs out of room half-way


@pytest.fixture
def small_data_dir(qemu_test_root: QemuTestRoot) -> Iterator[Path]:
    """A real tmpfs of `TMPFS_MB` MiB mounted as the data dir of `qemu_factory(name="data")` (under the test root,
    so QEMU's user can reach it; the launcher's config and output stay outside). Afterwards (after
    `qemu_factory`'s teardown, which killed the launcher and hard-reset its VMs) the domains and the volume pool
    of the data dir go, then the mount."""
    mount = qemu_test_root.path / "data"
    mount.mkdir(mode=0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0711", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        try:
            remove_domains_under(mount)  # QEMU lets go of the files on the mount
            remove_pools_under(mount)
        finally:  # even if libvirtd is away
            if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mount)], check=False)
    assert not os.path.ismount(mount)


def test_full_data_dir_fails_starts_cleanly_and_start_works_again(small_data_dir: Path, qemu_factory: Any) -> None:
    """The data dir's file system fills up under a running VM: a START whose image import runs out of room fails
    with `image_failure` saying so (the half-written import removed, the instance with it, no domain); a START
    whose record the disk refuses is `507 storage_full` with nothing written; a STOP too, and the VM keeps
    running; the launcher serves throughout; once there is room again, STARTs work (the same image imported)."""
    launcher = qemu_factory(name="data", admission={"keep_free_disk_mb": 0})
    client = launcher.client()
    assert launcher.data_dir == small_data_dir
    running, cut_short, refused, later = (new_uuid() for _ in range(4))
    second_image = "clear-1ff6bf3883708a56446d863f20c810c99b3aea6f"  # the test guest too, under another id
    assert start(client, small_payload(running), wait=1, timeout=120)["state"] == "running"
    wait_guest_ready(launcher, running)

    filler = Filler(small_data_dir)
    filler.free(IMPORT_ROOM)
    assert start(client, small_payload(cut_short, second_image))["state"] == "pending"  # the record fits
    [failure] = wait_for("the start_failure", lambda: [e for e in all_events(client) if e["type"] == "start_failure"])
    assert (failure["instance_uuid"], failure["reason"]) == (cut_short, "image_failure")
    assert "No space left on device" in failure["detail"], failure
    wait_for("the failed instance to go", lambda: not instance_dir(launcher, cut_short).exists())
    assert half_written(small_data_dir) == []  # the import's temp file went with the failure
    assert [i["id"] for i in client.request("GET", "/v1/images")["images"]] == [IMAGE_ID]

    filler = Filler(small_data_dir)  # now to the last byte
    with pytest.raises(ClientError) as start_refused:
        start(client, small_payload(refused), wait=1, timeout=120)
    assert (start_refused.value.status, start_refused.value.code) == (507, "storage_full")
    assert start_refused.value.reason.startswith("node storage full: cannot write the instance dir: ")
    with pytest.raises(ClientError) as stop_refused:
        client.request("POST", f"/v1/instances/{running}/stop", wait=1, timeout=120)
    assert stop_refused.value.code == "storage_full"
    assert serving(launcher)
    assert {i["instance_uuid"]: i["state"] for i in client.request("GET", "/v1/instances")["instances"]} == \
        {running: "running"}
    assert not instance_dir(launcher, refused).exists() and half_written(small_data_dir) == []
    assert domains_of(small_data_dir) == [f"launcher-{running}"]
    dom = domain_of(running)
    assert dom is not None and dom.isActive()

    filler.free()
    for uuid in (cut_short, later):  # the same uuid again, and its image, now fit
        assert start(client, small_payload(uuid, second_image), wait=1, timeout=120)["state"] == "running"
        assert wait_guest_ready(launcher, uuid)["boots"] == "1"
    for uuid in (running, cut_short):
        assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    stop_delete_and_nothing_left(launcher, client, later)


# ------------------------------------------------------------------------------------ a guest that ignores hot-unplug

DETACH_TIMEOUT_S = 5.0  # qemu.volumes.detach_timeout_s of the test
IGNORE_UNPLUG = "test_guest_mode: ignore-unplug\n"  # the test guest's mode (tests/guest/init)


def test_detach_from_a_guest_that_ignores_the_unplug_request(qemu_factory: Any) -> None:
    """A guest that keeps a hot-plugged disk (it ignores the unplug request): DETACH fails with `502
    detach_failure` once `detach_timeout_s` has passed (not later), with a `detach_volume_failure` event, and so
    does a second DETACH; the disk stays the VM's and the instance's (live XML, record, volume's `attached_to`),
    across a kill -9 too; the launcher keeps serving. Once the VM is stopped, DETACH only changes the record, and
    the volume is free."""
    launcher = qemu_factory({"volumes": {"detach_timeout_s": DETACH_TIMEOUT_S}})
    client = launcher.client()
    uuid, volume = new_uuid(), new_uuid()
    client.request("POST", "/v1/volumes", json.dumps({"id": volume, "size_mb": 64}).encode(), "application/json")
    assert start(client, small_payload(uuid, user_data=IGNORE_UNPLUG), wait=1, timeout=120)["state"] == "running"
    wait_guest_ready(launcher, uuid)
    assert client.request("POST", f"/v1/instances/{uuid}/volumes/{volume}", wait=1, timeout=60)["state"] == "running"
    holds = wait_for("the guest to hold the disk", lambda: [
        line for line in console_lines(launcher, uuid) if line.startswith("guest-holds-disks ")], timeout=60)
    assert f"vdb:{volume[:20]}" in holds[0] and "gpes=-" not in holds[0]  # it saw the disk, then stopped listening

    started = time.monotonic()
    with pytest.raises(ClientError) as refused:
        client.request("DELETE", f"/v1/instances/{uuid}/volumes/{volume}", wait=1, timeout=120)
    took = time.monotonic() - started
    assert (refused.value.status, refused.value.code) == (502, "detach_failure")
    assert f"did not let go of volume {volume} within {DETACH_TIMEOUT_S:g} s" in refused.value.reason
    # The bound is the configured one: it waited that long, and not a libvirt wait of its own on top of it (the
    # margin is for a busy machine: the unplug's libvirt calls and the answer).
    assert DETACH_TIMEOUT_S <= took < DETACH_TIMEOUT_S + 4, took
    [event] = wait_for("the failure event", lambda: [e for e in all_events(client)
                                                     if e["type"] == "detach_volume_failure"])
    assert (event["instance_uuid"], event["volume_id"], event["reason"]) == (uuid, volume, "detach_failure")
    assert_still_attached(client, uuid, volume)
    assert disk_lines(launcher, uuid)[-1]["disks"] == f"vda:-,vdb:{volume[:20]}"  # the guest still has it
    assert serving(launcher)
    with pytest.raises(ClientError) as again:  # QEMU's request is still pending: asked again, the guest is no better
        client.request("DELETE", f"/v1/instances/{uuid}/volumes/{volume}", wait=1, timeout=120)
    assert again.value.code == "detach_failure", again.value
    assert_still_attached(client, uuid, volume)

    launcher.kill(signal.SIGKILL)
    client = launcher.start(timeout=60)
    wait_for("recovery", lambda: state(client, uuid) == "running")
    assert_still_attached(client, uuid, volume)

    assert client.request("POST", f"/v1/instances/{uuid}/stop", wait=1, timeout=120)["state"] == "exited"
    detached = client.request("DELETE", f"/v1/instances/{uuid}/volumes/{volume}", wait=1, timeout=60)
    assert detached["state"] == "exited"
    assert instance_volumes(client, uuid) == [] and record_of(launcher, uuid).volumes == ()
    assert client.request("GET", f"/v1/volumes/{volume}")["attached_to"] is None
    assert client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)["state"] == "deleted"
    assert client.request("DELETE", f"/v1/volumes/{volume}") == {"removed": volume}
    assert domains_of(launcher.data_dir) == [] and half_written(launcher.data_dir) == []
    assert_journal_whole(client)


def console_lines(launcher: LauncherProcess, uuid: str) -> list[str]:
    path = instance_dir(launcher, uuid) / "console.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def assert_still_attached(client: Client, uuid: str, volume: str) -> None:
    """The volume is the instance's disk in the live domain, in its record and in the volume store."""
    assert domain_serials(uuid) == [None, volume]
    assert instance_volumes(client, uuid) == [volume]
    assert client.request("GET", f"/v1/volumes/{volume}")["attached_to"] == uuid


# ------------------------------------------------------------------------------------------------ 20 VMs and kill -9


def booted(launcher: LauncherProcess, uuids: list[str]) -> bool:
    """Whether every guest has printed its guest-ready line once; AssertionError at once if a guest kernel
    panicked (it never will)."""
    for uuid in uuids:
        text = "\n".join(console_lines(launcher, uuid))
        assert "Kernel panic" not in text, f"{uuid}'s guest panicked:\n{text[-2000:]}"
    return all(len(guest_lines(launcher, u)) == 1 for u in uuids)

TINY_VMS = 20
TINY_MEM_MB = 96  # the test guest boots with 96 MiB under SeaBIOS (not with 64: its console stays empty)


def test_twenty_running_vms_survive_kill_9_of_the_launcher(qemu_factory: Any) -> None:
    """20 tiny VMs running; `kill -9` of the launcher; the next launcher finds all 20 running, each the same QEMU
    process in the same domain (same pid, same domain id, no second boot), reports each `running` and
    `recovered` once and nothing `exited`, and has stats for each; then DELETE removes every domain."""
    launcher = qemu_factory(intervals={"instance_stats_s": 1, "stats_snapshot_s": 1})
    client = launcher.client()
    uuids = [new_uuid() for _ in range(TINY_VMS)]
    for uuid in uuids:
        assert start(client, small_payload(uuid, mem_mb=TINY_MEM_MB))["state"] == "pending"
    wait_for("20 running instances", lambda: all(state(client, u) == "running" for u in uuids), timeout=600,
             every=1)
    wait_for("20 booted guests", lambda: booted(launcher, uuids), timeout=600, every=1)
    before = {u: (qemu_pid(u), domain_of(u).ID()) for u in uuids}  # type: ignore[union-attr]
    launcher.kill(signal.SIGKILL)
    seq = journal_seq(launcher.data_dir)

    client = launcher.start(timeout=60)
    restarted = time.time()
    wait_for("20 recovered instances", lambda: all(state(client, u) == "running" for u in uuids), timeout=120)
    recovered = wait_for("20 recovered events", lambda: len(
        found := [e for e in all_events(client) if e["seq"] > seq and e["type"] == "instance_state"]) >= TINY_VMS
        and found)
    assert sorted((e["instance_uuid"], e["state"], e.get("recovered")) for e in recovered) == \
        sorted((u, "running", True) for u in uuids)
    assert {u: (qemu_pid(u), domain_of(u).ID()) for u in uuids} == before  # type: ignore[union-attr]
    assert all(len(guest_lines(launcher, u)) == 1 for u in uuids)  # none booted again
    _stats_resume(client, uuids, restarted)
    assert_journal_whole(client)

    for uuid in uuids:
        client.request("DELETE", f"/v1/instances/{uuid}")
    wait_for("every instance deleted", lambda: client.request("GET", "/v1/instances")["instances"] == [],
             timeout=300, every=1)
    assert domains_of(launcher.data_dir) == []
    assert all(gone(pid) for pid, _ in before.values())  # their QEMUs have ended
    assert half_written(launcher.data_dir) == []
