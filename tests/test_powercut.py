"""Power cuts under a real `launcher serve`: nothing acknowledged is lost, nothing is left half-written.

The launcher's data dir is the power-cut file system of tests/powercut_fs.py, which keeps what was not made
durable (fsync of a file, of a directory for its entries, syncfs) apart and drops it when the power is cut. Each
round: mount, start a launcher (its VMs come back as after a host reboot: `recovery.restart_running: always`),
check that it holds every effect acknowledged before the last cut, then storm it with START / STOP / RESTART /
DELETE / ATTACH / DETACH and volume create / resize / delete from a few clients at once, and cut the power after
a (seeded) number of acknowledgements. The launcher is then killed, as the power took it, and the host "reboots"
(the data dir's boot id is another boot's).

What counts as acknowledged is what the API documents: an answer received before the cut. A command whose
answer did not come (the cut took it) may or may not have happened; both outcomes are accepted, nothing else.
The events served to a follower are acknowledged too: after the cut, the journal still has each of them,
unchanged, and its seqs have no gap.

`POWERCUT_SEED` and `POWERCUT_ROUNDS` (environment) replay or lengthen a run; a failure names its seed and round.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import LauncherProcess
from powercut import PowerCutMount, launcher_env, unmount_stale
from test_host_reboot import OTHER_BOOT

from launcher.cli.client import Client, ClientError
from launcher.core.bootid import BOOT_ID_FILE

pytestmark = pytest.mark.powercut

SEED = int(os.environ.get("POWERCUT_SEED", "1707"))
ROUNDS = int(os.environ.get("POWERCUT_ROUNDS", "50"))
WORKERS = 3
JSON = "application/json"
YAML = "application/yaml"
SETTINGS = {
    "simulation": {"mode": "memory", "boot_delay_s": 0.01},
    "recovery": {"restart_running": "always", "max_parallel": 64},
    "events": {"rotate_bytes": 16384, "keep_files": 8},  # rotations, and their renames, under the cuts too
    "admission": {"vcpu_overcommit": 1000.0, "memory_overcommit": 1000.0},
}
UNANSWERED = ("unreachable", "no_answer", "http_error")  # the cut took the answer: the command may have happened


@attrs.define
class Instance:
    """What the acknowledged commands say of one instance: its goal ("running", "exited") or None if deleted,
    and the volumes attached to it; `maybe` holds the other outcome of a command the cut left unanswered."""

    goal: str | None = None
    volumes: frozenset[str] = frozenset()
    maybe: tuple[str | None, frozenset[str]] | None = None

    def outcomes(self) -> list[tuple[str | None, frozenset[str]]]:
        return [(self.goal, self.volumes)] + ([self.maybe] if self.maybe else [])


@attrs.define
class Volume:
    """What the acknowledged commands say of one volume: its size, or None if deleted (or never created)."""

    size_mb: int | None = None
    maybe: int | None | bool = False  # False: no unanswered command on it

    def outcomes(self) -> list[int | None]:
        return [self.size_mb] + ([self.maybe] if self.maybe is not False else [])  # type: ignore[list-item]


class Model:
    """Every instance and volume the storm made, by what the launcher acknowledged (each worker keeps its own),
    and the events served."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.events: dict[int, dict[str, Any]] = {}  # seq -> event, as served to a follower
        self.journal_end = 0  # the last seq of the journal at the last check: the follower starts after it

    @property
    def instances(self) -> dict[str, Instance]:
        return {uuid: instance for worker in self.workers for uuid, instance in worker.instances.items()}

    @property
    def volumes(self) -> dict[str, Volume]:
        return {vid: volume for worker in self.workers for vid, volume in worker.volumes.items()}


class Cut:
    """The instant of the cut, as the clients see it: an answer counts only if it came before."""

    def __init__(self, after_acks: int) -> None:
        self.lock = threading.Lock()
        self.after_acks = after_acks
        self.acks = 0
        self.happened = False
        self.due = threading.Event()

    def acknowledged(self) -> bool:
        """Count one answer (an acknowledgement or a refusal); False if it came after the cut (then it proves
        nothing: a launcher whose disk has gone may refuse a command whose effect was already durable)."""
        with self.lock:
            if self.happened:
                return False
            self.acks += 1
            if self.acks >= self.after_acks:
                self.due.set()
            return True


class Worker:
    """One client: a sequence of commands on its own instances and volumes, chosen by its own seeded rng."""

    def __init__(self, name: str, rng: random.Random) -> None:
        self.name = name
        self.rng = rng
        self.serial = 0
        self.instances: dict[str, Instance] = {}
        self.volumes: dict[str, Volume] = {}
        self.error: BaseException | None = None
        self.round = 0
        self.history: list[str] = []

    def call(self, what: str, call: Any) -> Any:
        """_call(call), noted in `history` (what a failure shows of the ids it names)."""
        answer = _call(call)
        self.history.append(f"round {self.round}: {what} -> {'no answer' if answer is _UNANSWERED else answer}")
        return answer

    def new_id(self) -> str:
        self.serial += 1
        return f"{self.name}-{self.serial:04x}"

    def run(self, client: Client, cut: Cut) -> None:
        """Send commands until the cut is due or one goes unanswered; a bug of the test is kept in `error`."""
        try:
            while not cut.due.is_set():
                self.step(client, cut)
        except _Unanswered:
            return
        except BaseException as exc:
            self.error = exc
            cut.due.set()

    def step(self, client: Client, cut: Cut) -> None:
        instances = [uuid for uuid, instance in self.instances.items() if instance.goal]
        volumes = [vid for vid, volume in self.volumes.items() if volume.size_mb is not None]
        choice = self.rng.random()
        if choice < 0.3 or not instances:
            uuid = self.new_id()
            self.instances[uuid] = instance = Instance()
            body = f"start:\n  instance_uuid: {uuid}\n  image_uuid: test-image\n".encode()
            self.command(cut, f"START {uuid}", instance, ("running", frozenset()),
                         lambda: client.request("POST", "/v1/instances", body, YAML))
        elif choice < 0.45:
            uuid = self.rng.choice(instances)
            instance = self.instances[uuid]
            self.command(cut, f"STOP {uuid}", instance, ("exited", instance.volumes),
                         lambda: client.request("POST", f"/v1/instances/{uuid}/stop"))
        elif choice < 0.55:
            uuid = self.rng.choice(instances)
            instance = self.instances[uuid]
            self.command(cut, f"RESTART {uuid}", instance, ("running", instance.volumes),
                         lambda: client.request("POST", f"/v1/instances/{uuid}/restart"))
        elif choice < 0.65:
            uuid = self.rng.choice(instances)
            instance = self.instances[uuid]
            self.command(cut, f"DELETE {uuid}", instance, (None, frozenset()),
                         lambda: client.request("DELETE", f"/v1/instances/{uuid}"))
        elif choice < 0.75:
            volume_id = self.new_id()
            self.volumes[volume_id] = volume = Volume()
            size = self.rng.randrange(1, 64)
            body = json.dumps({"id": volume_id, "size_mb": size}).encode()
            self.volume_command(cut, f"CREATE {volume_id} {size}", volume, size,
                                lambda: client.request("POST", "/v1/volumes", body, JSON))
        elif choice < 0.8 and volumes:
            volume_id = self.rng.choice(volumes)
            volume = self.volumes[volume_id]
            size = (volume.size_mb or 0) + self.rng.randrange(1, 16)
            body = json.dumps({"size_mb": size}).encode()
            self.volume_command(cut, f"RESIZE {volume_id} {size}", volume, size,
                                lambda: client.request("POST", f"/v1/volumes/{volume_id}/resize", body, JSON))
        elif choice < 0.85 and volumes:
            volume_id = self.rng.choice(volumes)
            self.volume_command(cut, f"DELETE {volume_id}", self.volumes[volume_id], None,
                                lambda: client.request("DELETE", f"/v1/volumes/{volume_id}"))
        elif choice < 0.93 and volumes:
            uuid, volume_id = self.rng.choice(instances), self.rng.choice(volumes)
            instance = self.instances[uuid]
            self.command(cut, f"ATTACH {volume_id} {uuid}", instance, (instance.goal, instance.volumes | {volume_id}),
                         lambda: client.request("POST", f"/v1/instances/{uuid}/volumes/{volume_id}", wait=1),
                         waited=True)
        elif volumes:
            uuid = self.rng.choice(instances)
            instance = self.instances[uuid]
            if instance.volumes:
                volume_id = self.rng.choice(sorted(instance.volumes))
                self.command(cut, f"DETACH {volume_id} {uuid}", instance,
                             (instance.goal, instance.volumes - {volume_id}),
                             lambda: client.request("DELETE", f"/v1/instances/{uuid}/volumes/{volume_id}",
                                                    wait=1), waited=True)

    def command(self, cut: Cut, what: str, instance: Instance, after: tuple[str | None, frozenset[str]],
                call: Any, waited: bool = False) -> None:
        """Send an instance command (`waited`: with ?wait=1); the model takes `after` if it was acknowledged."""
        answer = self.call(what, call)
        if answer is _UNANSWERED or (waited and isinstance(answer, dict) and answer.get("done") is False):
            instance.maybe = after  # the cut took the answer, or the wait for the command ran out
            raise _Unanswered
        if not cut.acknowledged():  # an answer after the cut, even a refusal, proves nothing
            instance.maybe = after
            raise _Unanswered
        if isinstance(answer, ClientError):
            assert instance.goal is not None, f"a START of a new instance was refused: {answer}"
        else:
            instance.goal, instance.volumes = after

    def volume_command(self, cut: Cut, what: str, volume: Volume, size_mb: int | None, call: Any) -> None:
        answer = self.call(what, call)
        if answer is _UNANSWERED:
            volume.maybe = size_mb
            raise _Unanswered
        if not cut.acknowledged():
            volume.maybe = size_mb
            raise _Unanswered
        if isinstance(answer, ClientError):
            assert volume.size_mb is not None, f"a new volume was refused: {answer}"
        else:
            volume.size_mb = size_mb


class _Unanswered(Exception):
    """The worker's last command has no answer it can count: it stops."""


_UNANSWERED = object()


def _call(call: Any) -> Any:
    """The command's answer, the ClientError it was refused with, or _UNANSWERED."""
    try:
        return call()
    except ClientError as exc:
        return _UNANSWERED if exc.code in UNANSWERED else exc
    except (OSError, http.client.HTTPException):
        return _UNANSWERED


def storm(client: Client, workers: Sequence[Worker], model: Model, cut: Cut, round_number: int, where: str,
          launcher: LauncherProcess, cut_power: Callable[[], object], stall_s: float = 120) -> None:
    """One round: the workers and an event follower run until `cut` is due, then `cut_power()` cuts the power and
    takes the launcher down (under the cut's lock: no answer counts after it); then the workers are joined, and
    an error of a worker's own is raised."""
    for worker in workers:
        worker.round = round_number
    threads = [threading.Thread(target=worker.run, args=(client, cut)) for worker in workers]
    follower = threading.Thread(target=follow_events, args=(client, model.journal_end, cut, model), daemon=True)
    for thread in [*threads, follower]:
        thread.start()
    stalled = not cut.due.wait(timeout=stall_s)
    output = launcher.output()[-2000:] if stalled else ""
    with cut.lock:
        cut.happened = True
        cut_power()
    assert not stalled, f"{where}: the storm stalled: {output}"
    for thread in threads:
        thread.join(timeout=90)
        assert not thread.is_alive(), f"{where}: a client is stuck"
    for worker in workers:
        if worker.error is not None:
            raise worker.error


def follow_events(client: Client, since: int, cut: Cut, model: Model) -> None:
    """Record each event served before the cut (until the stream breaks)."""
    buffer = b""
    try:
        for chunk in client.stream("/v1/events", follow=1, since=since):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            with cut.lock:
                if cut.happened:
                    return
                for line in lines:
                    event = json.loads(line)
                    model.events[event["seq"]] = event
    except (ClientError, OSError, http.client.HTTPException):
        return


def wait_settled(client: Client, timeout: float = 60.0) -> dict[str, Any]:
    """GET /v1/instances once no instance is still pending (recovery, or a START, under way)."""
    deadline = time.monotonic() + timeout
    while True:
        table = {i["instance_uuid"]: i for i in client.request("GET", "/v1/instances")["instances"]}
        if all(i["state"] in ("running", "exited") for i in table.values()) or time.monotonic() > deadline:
            return table
        time.sleep(0.05)


def check(client: Client, data_dir: Path, model: Model, where: str) -> None:
    """The launcher holds every acknowledged effect, nothing else, and nothing half-written; then the model takes
    what was found (one of the outcomes it allowed) as the truth for the next round."""
    deadline = time.monotonic() + 60
    while True:
        table, volumes = observe(client)
        problems = differences(model, table, volumes)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if problems:
        ids = {problem.split()[1].rstrip(":") for problem in problems}
        history = [line for worker in model.workers for line in worker.history if set(line.split()) & ids]
        raise AssertionError(f"{where}: {problems[:10]}\nwhat the clients did with them:\n" + "\n".join(history))
    for uuid, instance in model.instances.items():
        instance.goal, instance.volumes = seen(table.get(uuid))
        instance.maybe = None
    for volume_id, volume in model.volumes.items():
        volume.size_mb, volume.maybe = volumes[volume_id]["size_mb"] if volume_id in volumes else None, False
    for path in (data_dir / "instances").glob("*/instance.json"):
        json.loads(path.read_bytes())
    for path in (data_dir / "sim-volumes").glob("*"):
        assert path.suffix == ".json", f"{where}: a temporary file was left behind: {path.name}"
        json.loads(path.read_bytes())
    journal = retained_events(client)
    seqs = [event["seq"] for event in journal]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{where}: the journal has a gap"
    by_seq = {event["seq"]: event for event in journal}
    for seq in [seq for seq in model.events if seq < seqs[0]]:
        del model.events[seq]  # rotated out of the journal (keep_files), as documented
    lost = [event for seq, event in model.events.items() if by_seq.get(seq) != event]
    model.journal_end = seqs[-1]
    assert not lost, f"{where}: events served before the cut are not in the journal as served: {lost[:5]}"


def retained_events(client: Client) -> list[dict[str, Any]]:
    """Every event the journal still keeps (older ones were rotated out: `410 events_expired` names the first)."""
    since = 0
    while True:
        try:
            return [json.loads(line) for line in b"".join(client.stream("/v1/events", since=since)).splitlines()]
        except ClientError as exc:
            oldest = re.search(r"seq (\d+)", exc.reason)
            if exc.code != "events_expired" or oldest is None:
                raise
            since = int(oldest.group(1)) - 1


def observe(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """The instances (once none is pending) and the volumes, by id."""
    table = wait_settled(client)
    return table, {v["id"]: v for v in client.request("GET", "/v1/volumes")["volumes"]}


def seen(found: dict[str, Any] | None) -> tuple[str | None, frozenset[str]]:
    """An instance of GET /v1/instances as the model has it: (state, volumes), (None, {}) if there is none."""
    return (found["state"], frozenset(found["volumes"])) if found else (None, frozenset())


def differences(model: Model, table: dict[str, Any], volumes: dict[str, Any]) -> list[str]:
    """What the launcher holds that no acknowledged history allows ("instance <id>: ..." / "volume <id>: ...")."""
    problems = []
    for uuid, instance in model.instances.items():
        found = seen(table.get(uuid))
        if found not in instance.outcomes():
            problems.append(f"instance {uuid}: {found}, expected one of {instance.outcomes()}")
    problems += [f"instance {uuid}: never acknowledged" for uuid in table.keys() - model.instances.keys()]
    for volume_id, volume in model.volumes.items():
        size = volumes[volume_id]["size_mb"] if volume_id in volumes else None
        if size not in volume.outcomes():
            problems.append(f"volume {volume_id}: size {size}, expected one of {volume.outcomes()}")
    problems += [f"volume {v}: never acknowledged" for v in volumes.keys() - model.volumes.keys()]
    return problems


@pytest.fixture
def power_cut_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(disk, mountpoint): the directory that holds what survives, and where the launcher sees it."""
    disk, mountpoint = tmp_path / "disk", tmp_path / "data"
    disk.mkdir()
    mountpoint.mkdir()
    yield disk, mountpoint
    unmount_stale(mountpoint)


def test_acknowledged_effects_survive_power_cuts(power_cut_dirs: tuple[Path, Path]) -> None:
    disk, mountpoint = power_cut_dirs
    rng = random.Random(SEED)
    workers = [Worker(f"{n + 1:x}", random.Random(rng.random())) for n in range(WORKERS)]
    model = Model(workers)
    for round_number in range(ROUNDS):
        where = f"seed {SEED}, round {round_number}"
        fs = PowerCutMount(disk, mountpoint)
        fs.start()
        launcher = LauncherProcess(mountpoint, SETTINGS, env=launcher_env())
        try:
            client = launcher.start(timeout=60)
            check(client, mountpoint, model, where)
            cut = Cut(after_acks=rng.randrange(1, 30))
            storm(client, workers, model, cut, round_number, where, launcher,
                  cut_power=lambda: (fs.cut(), launcher.kill(), fs.stop()))
        finally:
            launcher.kill()
            fs.stop()
        (disk / BOOT_ID_FILE).write_text(OTHER_BOOT + "\n")  # the power cut was a host reboot
    fs = PowerCutMount(disk, mountpoint)
    fs.start()
    launcher = LauncherProcess(mountpoint, SETTINGS, env=launcher_env())
    try:
        check(launcher.start(timeout=60), mountpoint, model, f"seed {SEED}, after the last round")
    finally:
        launcher.kill()
        fs.stop()
