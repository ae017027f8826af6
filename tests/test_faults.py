"""Faults injected for real into a running `launcher serve`: a full file system (a small tmpfs as the data dir),
failed appends, ill-shaped records, garbage in the journal. Whatever happens, the launcher keeps serving, loses
nothing it acknowledged, and every other instance comes back."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, LauncherProcess
from test_api import YAML, start_yaml
from test_qemu import wait_for
from test_recovery import all_events, states

from launcher.cli.client import Client, ClientError
from launcher.durable.persist import WAL_FILE, _Op, _record

STORAGE_FULL = "storage_full"
NO_DISK_RESERVE = {"admission": {"keep_free_disk_mb": 0}}  # the tmpfs is tiny: admit on what is there


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs mounted as the launcher's data dir (`launcher_factory(name="data")`); the launcher's
    config and output stay outside it. The test fills it to the last byte."""
    mount = tmp_path / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Filler:
    """Takes every free byte of a file system (one file, written until ENOSPC); `free(n)` gives n back."""

    def __init__(self, mount: Path) -> None:
        self.path = mount / "filler"
        for chunk in (65536, 4096):  # then page by page: tmpfs allocates pages
            with open(self.path, "ab", buffering=0) as file, contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * chunk)
        assert shutil.disk_usage(mount).free < 4096

    def free(self, n: int | None = None) -> None:
        """Give back `n` bytes (everything if None)."""
        if n is None:
            self.path.unlink()
        else:
            os.truncate(self.path, max(0, self.path.stat().st_size - n))


def serving(launcher: LauncherProcess) -> bool:
    return launcher.proc is not None and launcher.proc.poll() is None and \
        launcher.client().request("GET", "/healthz") == {"status": "ok"}


# ------------------------------------------------------------------------------------------------ a full disk


def test_full_disk_fails_commands_with_storage_full_and_keeps_serving(launcher_factory: Any, small_fs: Path) -> None:
    launcher = launcher_factory(NO_DISK_RESERVE, name="data")
    client = launcher.client()
    assert client.request("POST", "/v1/instances", start_yaml("f1-01"), YAML, wait=1)["state"] == "running"
    filler = Filler(small_fs)

    refused_uuids = [f"f1-{n:04}" for n in range(2, 42)]  # their failure events overflow the journal's last page
    for uuid in refused_uuids:
        with pytest.raises(ClientError) as refused:
            client.request("POST", "/v1/instances", start_yaml(uuid), YAML, wait=1)
        assert (refused.value.code, refused.value.status) == (STORAGE_FULL, 507)
        assert refused.value.reason.startswith("node storage full: cannot write the instance dir: ")
    # The journal cannot take the failures' events either: the launcher holds them back, and keeps serving.
    wait_for("the journal to hit the full disk", lambda: "event journal: cannot write" in launcher.output())
    assert serving(launcher)
    assert states(client) == {"f1-01": "running"}
    with pytest.raises(ClientError) as refused:  # a STOP is acknowledged only once its goal is on disk
        client.request("POST", "/v1/instances/f1-01/stop", wait=1)
    assert refused.value.code == STORAGE_FULL and states(client) == {"f1-01": "running"}

    filler.free()
    # Writes resume by themselves: the held-back events reach the journal, in order, and new STARTs work.
    failures = wait_for("every start_failure event", lambda: len(refused_uuids) == len(
        events := [e for e in all_events(client) if e["type"] == "start_failure"]) and events)
    assert [(e["instance_uuid"], e["reason"]) for e in failures] == [(u, STORAGE_FULL) for u in refused_uuids]
    seqs = [e["seq"] for e in all_events(client)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert client.request("POST", "/v1/instances", start_yaml("f1-03"), YAML, wait=1)["state"] == "running"
    assert client.request("POST", "/v1/instances/f1-01/stop", wait=1)["state"] == "exited"
    assert launcher.proc is not None and launcher.proc.poll() is None


def test_attach_on_a_full_disk_changes_nothing(launcher_factory: Any, small_fs: Path) -> None:
    """An ATTACH is recorded before the VM gets the disk: a record the disk refuses fails it with storage_full, and
    the volume stays free. A DETACH whose record cannot be written gives the VM the disk back."""
    launcher = launcher_factory({**NO_DISK_RESERVE, "simulation": {"mode": "process"}}, name="data")
    client = launcher.client()
    volume, other = "0a1b-0f01", "0a1b-0f02"
    for name in (volume, other):
        client.request("POST", "/v1/volumes", json.dumps({"id": name, "size_mb": 64}).encode(), "application/json")
    assert client.request("POST", "/v1/instances", start_yaml("f4-01"), YAML, wait=1)["state"] == "running"
    assert client.request("POST", f"/v1/instances/f4-01/volumes/{other}", wait=1)["state"] == "running"
    # A restart empties the instance log (and finds the VM running: nothing to write), so that the next record
    # needs a page of its own, which the full file system refuses.
    launcher.kill(signal.SIGTERM)
    client = launcher.start()
    wait_for("recovery", lambda: states(client) == {"f4-01": "running"})
    assert (launcher.data_dir / WAL_FILE).stat().st_size == 0
    filler = Filler(small_fs)
    for method in ("POST", "DELETE"):
        target = volume if method == "POST" else other
        with pytest.raises(ClientError) as refused:
            client.request(method, f"/v1/instances/f4-01/volumes/{target}", wait=1)
        assert (refused.value.code, refused.value.status) == (STORAGE_FULL, 507)
        assert refused.value.reason.startswith("node storage full: cannot write instance.json: ")
    assert client.request("GET", "/v1/instances/f4-01")["volumes"] == [other]
    assert [(v["id"], v["attached_to"]) for v in client.request("GET", "/v1/volumes")["volumes"]] == \
        [(volume, None), (other, "f4-01")]
    filler.free()
    assert client.request("POST", f"/v1/instances/f4-01/volumes/{volume}", wait=1)["state"] == "running"
    assert client.request("DELETE", f"/v1/instances/f4-01/volumes/{other}", wait=1)["state"] == "running"
    assert client.request("GET", "/v1/instances/f4-01")["volumes"] == [volume]
    client.request("DELETE", "/v1/instances/f4-01", wait=1)


def test_launcher_starts_and_serves_on_a_full_disk(launcher_factory: Any, small_fs: Path) -> None:
    launcher = launcher_factory(NO_DISK_RESERVE, name="data")
    client = launcher.client()
    client.request("POST", "/v1/instances", start_yaml("f2-01"), YAML, wait=1)
    url = client.host, client.port
    launcher.kill(signal.SIGKILL)
    for _ in range(3):  # until a start-up writes nothing (recovery records what it found), so the next frees nothing
        launcher.start()  # replays and empties the instance log
        wait_for("recovery", lambda: states(launcher.client()) == {"f2-01": "exited"})
        launcher.kill(signal.SIGTERM)
        if (launcher.data_dir / WAL_FILE).stat().st_size == 0:
            break
    launcher.kill(signal.SIGKILL)
    url_file = launcher.data_dir / "api-url"
    url_file.unlink()  # so that it must be written again, on the full disk
    filler = Filler(small_fs)
    output = small_fs.parent / "serve-on-full-disk.log"  # not on the full file system
    with open(output, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "serve", "--config", str(launcher.config_path), "--data-dir",
             str(launcher.data_dir), "--listen", f"{url[0]}:{url[1]}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    launcher.proc = proc
    try:
        wait_for("the API", lambda: _answers(client) or proc.poll() is not None)
        assert proc.poll() is None, output.read_text()
        assert states(client) == {"f2-01": "exited"}  # memory-mode VMs end with their launcher
        assert not url_file.exists()
        filler.free()
        assert wait_for("api-url, written once there is room", url_file.exists)
        assert url_file.read_text() == f"http://{url[0]}:{url[1]}"
    finally:
        proc.kill()
        proc.wait(10)


def _answers(client: Client) -> bool:
    try:
        return bool(client.request("GET", "/healthz"))
    except ClientError:
        return False


def test_failed_append_leaves_no_fragment_for_the_next_start(launcher_factory: Any, small_fs: Path) -> None:
    """A START whose log append is cut short by a full disk leaves nothing in instances.wal; a START acknowledged
    after space returns survives a crash whose file-system writes were lost (its dir removed behind the killed
    launcher's back, as a power cut before writeback would), because the replay finds its record intact."""
    launcher = launcher_factory(NO_DISK_RESERVE, name="data")
    client = launcher.client()
    wal = launcher.data_dir / WAL_FILE
    filler = Filler(small_fs)
    filler.free(8192)  # two pages: less than the next record, so the append is cut short
    user_data = b"#cloud-config\nbootcmd: [echo " + b"x" * 60000 + b"]\n"
    big = b"---\n" + start_yaml("f3-01") + b"...\n---\n" + user_data + b"...\n---\n{}\n"
    with pytest.raises(ClientError) as refused:
        client.request("POST", "/v1/instances", big, YAML, wait=1)
    assert refused.value.code == STORAGE_FULL
    assert "a failed append" not in launcher.output()  # the cut-back itself worked
    log_bytes = wal.read_bytes()  # cut back: whole records only (the failed START's clean-up may follow)
    assert log_bytes.endswith(b"\n") or not log_bytes
    from launcher.durable.persist import _parse_record

    assert all(_parse_record(line) for line in log_bytes.splitlines())
    filler.free()
    assert client.request("POST", "/v1/instances", start_yaml("f3-02"), YAML)["state"] == "pending"  # durable
    applied = launcher.data_dir / "instances" / "f3-02"
    wait_for("the START's files", applied.exists)
    launcher.kill(signal.SIGKILL)
    shutil.rmtree(applied)
    client = launcher.start()
    assert "f3-02" in states(client)
    assert not [e for e in all_events(client) if e["type"] == "wal_record_dropped"]


# ------------------------------------------------------------------------------------------------ bad records


BAD_RECORDS = {
    "ba-0001": b'{"version":1}',
    "ba-0002": b'{"version":1,"spec":5,"created":true}',
    "ba-0003": b'{"version":1,"created":false,"spec":{"instance_uuid":"ba-0003","vcpus":"two"}}',
    "ba-0004": b'{"version":1,"created":false,"spec":{"instance_uuid":"ba-0004","storage":[{"boot":1}]}}',
    "ba-0005": b'{"version":1,"created":"yes","spec":{"instance_uuid":"ba-0005"}}',
    "ba-0006": b'{"version":1,"created":false,"spec":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


def test_ill_shaped_records_go_aside_and_every_other_instance_comes_back(launcher_factory: Any) -> None:
    launcher = launcher_factory()
    client = launcher.client()
    for uuid in ("acce-0001", "acce-0002"):
        client.request("POST", "/v1/instances", start_yaml(uuid), YAML, wait=1)
    launcher.kill(signal.SIGKILL)
    instances = launcher.data_dir / "instances"
    for uuid, data in BAD_RECORDS.items():
        (instances / uuid).mkdir()
        (instances / uuid / "instance.json").write_bytes(data)
    (instances / "ba-0007" / "instance.json").mkdir(parents=True)  # a directory where the file should be

    client = launcher.start()
    assert states(client) == {"acce-0001": "exited", "acce-0002": "exited"}
    corrupt = {e["instance_uuid"]: e["detail"] for e in all_events(client) if e["type"] == "instance_corrupt"}
    assert sorted(corrupt) == [*BAD_RECORDS, "ba-0007"]
    assert corrupt["ba-0003"] == "spec.vcpus: expected int, got str"
    assert corrupt["ba-0005"] == "created: expected true or false, got 'yes'"
    assert sorted(p.name for p in (launcher.data_dir / "corrupt").iterdir()) == sorted(corrupt)


def test_log_records_that_are_not_records_are_skipped_and_reported(launcher_factory: Any) -> None:
    launcher = launcher_factory()
    launcher.kill(signal.SIGKILL)
    data_dir = launcher.data_dir
    good = _record(data_dir, _Op("create", data_dir / "instances" / "ea-0002" / "instance.json",
                                 (b'{"created":false,"spec":{"instance_uuid":"ea-0002"},"version":1}')))
    blocked = data_dir / "instances" / "ea-0003" / "instance.json"
    blocked.mkdir(parents=True)  # the record below cannot be applied: a directory is in the way
    lines = [b'{"x":1}', b"[1, 2]", b'00000000 {"write":"instances/ea-0001/instance.json","data":""}',
             good.rstrip(b"\n"), _record(data_dir, _Op("write", blocked, b"{}")).rstrip(b"\n"), b"torn{"]
    (data_dir / WAL_FILE).write_bytes(b"\n".join(lines))

    client = launcher.start()
    assert "ea-0002" in states(client)  # the good record after the bad ones was replayed
    dropped = [e["detail"] for e in all_events(client) if e["type"] == "wal_record_dropped"]
    assert [re.match(r"record (\d+) of instances.wal", d).group(1) for d in dropped] == ["1", "2", "3", "5", "6"]  # type: ignore[union-attr]
    assert "bad checksum" in dropped[2] and "torn, never acknowledged" in dropped[4]
    assert [e["instance_uuid"] for e in all_events(client) if e["type"] == "instance_corrupt"] == ["ea-0003"]


def test_garbage_line_in_the_journal_hides_no_event(launcher_factory: Any) -> None:
    launcher = launcher_factory()
    client = launcher.client()
    for n in range(6):
        client.request("POST", "/v1/instances", start_yaml(f"da7a-{n:04}"), YAML, wait=1)
    launcher.kill(signal.SIGTERM)
    journal = launcher.data_dir / "events.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    middle = len(lines) // 2
    journal.write_bytes(b"".join([*lines[:middle], b"\x00garbage, not an event\n", b"[1]\n", *lines[middle:]]))
    before = [json.loads(line)["seq"] for line in lines]

    client = launcher.start()  # memory holds no old event now: `since=0` reads the file
    seqs = [e["seq"] for e in all_events(client)]
    assert seqs[: len(before)] == before and seqs == list(range(1, len(seqs) + 1))


def test_a_write_error_other_than_enospc_keeps_its_phase_code() -> None:
    from launcher.plugin.errors import IMAGE_FAILURE, write_failure

    error = write_failure(OSError(errno.EIO, "Input/output error"), "x", IMAGE_FAILURE)
    assert (error.code, error.reason) == (IMAGE_FAILURE, "cannot write x: [Errno 5] Input/output error")
    error = write_failure(OSError(errno.EDQUOT, "Disk quota exceeded"), "x", IMAGE_FAILURE)
    assert (error.code, error.reason) == (STORAGE_FULL, "node storage full: cannot write x: Disk quota exceeded")


# ------------------------------------------------------------------------------------------------ events vs stats


def test_stats_are_served_live_and_never_crowd_state_changes_out_of_the_journal(launcher_factory: Any) -> None:
    """Snapshots every 50 ms of 30 instances, and a journal that rotates past 20 kB keeping one old file: if the
    snapshots went into the journal, the state changes would be rotated away within a second."""
    launcher = launcher_factory({"intervals": {"stats_snapshot_s": 0.05},
                                 "events": {"rotate_bytes": 20_000, "keep_files": 1, "memory_events": 10}})
    client = launcher.client()
    uuids = [f"5a7e-{n:04}" for n in range(30)]
    for uuid in uuids:
        client.request("POST", "/v1/instances", start_yaml(uuid), YAML, wait=1)
    snapshots = []
    stream = client.stream("/v1/stats", read_timeout=10, follow=1)
    buffered = b""
    for chunk in stream:
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        snapshots += [json.loads(line) for line in lines if line]
        if len(snapshots) >= 25:
            break
    stream.close()
    taken = [s["taken_at"] for s in snapshots]
    assert taken == sorted(taken) and len(set(taken)) >= 20  # each line a newer snapshot
    assert {i["instance_uuid"] for i in snapshots[-1]["instances"]} == set(uuids)
    events = all_events(client)  # since=0: nothing has expired
    assert events[0]["seq"] == 1 and not [e for e in events if e["type"] == "stats"]
    running = {e["instance_uuid"] for e in events if e.get("state") == "running"}
    assert running == set(uuids)
