"""The supervisor: the instance table, admission, routing, node status and recovery at start-up.

Dispatch is synchronous (docs/concurrency.md, step 7): validate against the instance's *projected* state (the state it
will be in once its queued commands have run), admit, and put the command into the actor's bounded inbox.
Nothing here awaits an actor, so a slow or stuck instance never delays commands to the others. The caller
gets a `Ticket` and waits on it by itself, with its own timeout.

Admission (`launcher.core.admission`) counts what admitted instances were *promised* and what the virtualizers'
prepared slots hold. An admitted START of a ready slot's shape gets that slot set aside for it (`launcher.plugin.warm`);
once the instances are recovered, the supervisor keeps the pools filled while admission has room for their slots.

Several virtualizers (config `virtualizers:`, in `backends`): a START's `vm_type` picks one, an empty one the
first; the supervisor writes the name into the spec before admission, so that the record keeps it and the
instance keeps its virtualizer for life. The chosen backend's `check_start` may refuse the spec first.

Recovery at start-up: each instance dir becomes an actor that reconciles its record with its VM
(InstanceActor._recover); whether the host rebooted since the last run (`bootid`) and the
`recovery:` policy are shared through a RecoveryPlan.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from launcher.core import bootid, lifecycle
from launcher.core.actor import InstanceActor
from launcher.core.actor_base import ActorBase, ActorContext
from launcher.core.admission import Admission, Capacity
from launcher.core.bids import Bid
from launcher.core.commands import (
    AttachVolumeCommand,
    Command,
    DeleteCommand,
    DetachVolumeCommand,
    EvacuateCommand,
    RestartCommand,
    RestoreCommand,
    StartCommand,
    StopCommand,
)
from launcher.core.config import Config
from launcher.core.lifecycle import State, Verb
from launcher.core.messages import Ticket
from launcher.core.metrics import Metrics
from launcher.core.recovery import RecoveryPlan
from launcher.core.resources import Resources
from launcher.core.view import InstanceView
from launcher.durable import datadir
from launcher.durable.events import EventJournal
from launcher.durable.logs import InstanceLogs
from launcher.durable.persist import Persister
from launcher.durable.records import InstanceRecord
from launcher.plugin import errors, files
from launcher.plugin.errors import LauncherError
from launcher.plugin.protocol import (
    Backend,
    ImageCatalog,
    VolumeCatalog,
    image_catalog,
    start_problem,
    template_catalog,
    volume_catalog,
)
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.volumes import local_volumes_mb
from launcher.plugin.warm import SlotShape, WarmPools, warm_pools

log = logging.getLogger(__name__)

READY, FULL, MAINTENANCE = "READY", "FULL", "MAINTENANCE"
_VERB = {StopCommand: Verb.STOP, RestartCommand: Verb.RESTART, DeleteCommand: Verb.DELETE,
         AttachVolumeCommand: Verb.ATTACH, DetachVolumeCommand: Verb.DETACH}
MAINTENANCE_FILE = "maintenance"
MAINTENANCE_QUEUE = 16  # EVACUATE / RESTORE commands waiting for their file write
BID_DISK_READING_S = 0.5  # a bid uses a free-disk reading up to this old (`Supervisor.bid`)


class Supervisor:
    """The node's instance table and its one entrance: `dispatch` (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        backends: Mapping[str, Backend],
        journal: EventJournal,
        logs: InstanceLogs,
        persister: Persister,
        metrics: Metrics,
    ) -> None:
        """A supervisor with an empty table; `run` recovers the instances on disk. `backends`: the enabled
        virtualizers' backends by name, in the config's order (the first is the default)."""
        self.config = config
        self.backends = dict(backends)
        # Instance dirs whose virtualizer is not enabled now: left alone on disk, never driven (`_recover_all`).
        self.unmanaged: dict[str, str] = {}
        self.journal = journal
        self.actors: dict[str, InstanceActor] = {}  # the core's own table; the transport reads `instances()`
        self.admission = Admission(config, {name: pools for name, backend in backends.items()
                                            if (pools := warm_pools(backend)) is not None})
        # volume id → the instance it is reserved for: one of the instance's volumes (`InstanceActor.volumes`), or
        # one an ATTACH queued for it will add. Never two instances: a volume is attached to one VM at most.
        self.volume_users: dict[str, str] = {}
        self.maintenance = (config.data_dir / MAINTENANCE_FILE).exists()
        self._free_disk_reading = (-math.inf, 0)  # (trio time, MiB) of the last statvfs, for bids
        self.status = READY
        self._boot = bootid.detect(config.data_dir)  # two small reads, once, like the maintenance check above
        self.metrics = metrics  # served by the API at /metrics; the actors observe their START steps there
        self._ctx = ActorContext(config, journal, logs, persister, on_gone=self._on_gone,
                                 release_volume=self._release_volume, metrics=self.metrics,
                                 recovery=RecoveryPlan(config.recovery, host_rebooted=self._boot.rebooted))
        self._nursery: trio.Nursery | None = None
        # EVACUATE / RESTORE waiting for the `maintenance` file to be written or removed, one at a time.
        self._maintenance_send, self._maintenance_recv = trio.open_memory_channel[tuple[bool, Ticket]](
            MAINTENANCE_QUEUE)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover the instances on disk, then run every actor until cancelled."""
        async with trio.open_nursery() as nursery, trio.open_nursery() as monitors:
            self._nursery = nursery
            nursery.start_soon(self._apply_maintenance)
            self._ctx.monitors = monitors
            if self._boot.rebooted:
                log.warning("the host rebooted since the launcher last ran (recovery.restart_running: %s)",
                            self.config.recovery.restart_running)
            await self._recover_all()
            nursery.start_soon(self._remember_boot)
            for pools in self.admission.pools.values():
                nursery.start_soon(pools.run, self._room_for_slot)
            self._update_status(force=True)
            task_status.started()
            await trio.sleep_forever()

    # ----------------------------------------------------------------- dispatch

    def dispatch(self, command: Command, *, bid: str = "") -> Ticket:
        """Route one command. Raises LauncherError for a refusal known at once; otherwise the ticket
        reports the outcome. `bid`: the id of the auction bid (`bid`) a START was placed with: its reservation
        is consumed and the START admitted in its place; a START with no live bid of that id (expired, never
        made) is admitted as any other."""
        if isinstance(command, StartCommand):
            return self._dispatch_start(command, bid)
        if isinstance(command, EvacuateCommand):
            return self.evacuate()
        if isinstance(command, RestoreCommand):
            return self.restore()
        actor = self.actors.get(command.instance_uuid)
        outcome = lifecycle.judge(_VERB[type(command)], None if actor is None else actor.projected)
        if isinstance(outcome, lifecycle.Refuse):
            raise LauncherError(outcome.code, outcome.reason, command.instance_uuid)
        assert actor is not None and isinstance(outcome, lifecycle.Run | lifecycle.Change)
        if isinstance(command, AttachVolumeCommand | DetachVolumeCommand):
            return self._dispatch_volume(actor, command)
        assert isinstance(outcome, lifecycle.Run)
        ticket = Ticket(actor.uuid)
        actor.post(command, ticket)
        actor.projected = outcome.target
        if outcome.target is State.DELETED:
            actor.interrupt_start()
        return ticket

    def _dispatch_volume(self, actor: InstanceActor, command: AttachVolumeCommand | DetachVolumeCommand) -> Ticket:
        """ATTACH reserves the volume for the instance at once (so no other instance can have it meanwhile):
        already_attached if it is the instance's, volume_in_use if another's. DETACH: not_attached unless it is
        the instance's. The actor gives the reservation back if the ATTACH fails."""
        volume = command.volume_uuid
        user = self.volume_users.get(volume)
        if isinstance(command, AttachVolumeCommand):
            if user == actor.uuid:
                raise LauncherError(errors.ALREADY_ATTACHED, f"volume {volume} is attached to this instance already",
                                    actor.uuid)
            if user is not None:
                raise LauncherError(errors.VOLUME_IN_USE, f"volume {volume} is used by instance {user}", actor.uuid)
        elif user != actor.uuid:
            raise LauncherError(errors.NOT_ATTACHED, f"volume {volume} is not attached to this instance", actor.uuid)
        ticket = Ticket(actor.uuid)
        actor.post(command, ticket)
        self.volume_users[volume] = actor.uuid
        return ticket

    def _dispatch_start(self, command: StartCommand, bid: str) -> Ticket:
        spec = self._with_defaults(command)
        if bid:
            self.admission.bids.take(bid)
        existing = self.actors.get(spec.instance_uuid)
        if existing is not None:
            return self._repeated_start(existing, spec)
        free_mb = self._read_free_disk_mb()  # read once: statvfs is not free at 500 STARTs/s
        need, slot = self._admit(spec, free_mb)
        if (self.config.instances_dir / spec.instance_uuid).exists():
            # A dir nobody owns (made by hand since start-up): never let a START write into it or remove it.
            raise LauncherError(errors.INSTANCE_EXISTS, "an instance dir with this uuid exists", spec.instance_uuid)
        actor = self._add(spec, created=False, recovered=False)
        if slot is not None:
            self.admission.pools[spec.vm_type].reserve(spec)
        ticket = Ticket(spec.instance_uuid)
        actor.post(StartCommand(spec), ticket)
        self._update_status(free_mb - need.disk_mb)
        return ticket

    def bid(self, command: StartCommand, ttl_s: float) -> Bid:
        """This node's bid in an auction for `command` (the fleet's placement): what it needs, reserved for
        `ttl_s` seconds (`launcher.core.bids`); LauncherError, with the code and reason a START would get now, if
        the node would not admit it (instance_exists if it is here). An offer, which the START checks again: free
        disk as read within BID_DISK_READING_S (a statvfs per bid would cost every node for every placement); a
        stray instance dir made by hand is found by the START alone."""
        spec = self._with_defaults(command)
        if spec.instance_uuid in self.actors:
            raise LauncherError(errors.INSTANCE_EXISTS, "the instance is on this node already", spec.instance_uuid)
        at, free_mb = self._free_disk_reading
        fresh = trio.current_time() - at <= BID_DISK_READING_S
        need, _ = self._admit(spec, free_mb if fresh else self._read_free_disk_mb())
        return self.admission.bids.add(need, ttl_s)

    def _admit(self, spec: InstanceSpec, free_mb: int) -> tuple[Resources, SlotShape | None]:
        """What a new instance of `spec` needs, and the shape of the ready slot it would take (None: none); or
        LauncherError: the node is in maintenance (node_maintenance), has no room (full_cn), or one of its volumes
        is in use (volume_in_use)."""
        if self.maintenance:
            raise LauncherError(errors.NODE_MAINTENANCE, "the node is in maintenance", spec.instance_uuid)
        need = Resources.of(spec)
        pools = self.admission.pools.get(spec.vm_type)
        slot = None if pools is None else pools.ready_for(spec)
        refusal = self.admission.no_room(need, free_mb, len(self.actors), slot=slot)
        if refusal:
            local_mb = local_volumes_mb(spec)
            note = f" (the START's disk includes {local_mb} MiB of local volumes)" if local_mb else ""
            raise LauncherError(errors.FULL_CN, refusal + note, spec.instance_uuid)
        for entry in spec.storage:
            user = self.volume_users.get(entry.id)
            if user is not None:
                raise LauncherError(errors.VOLUME_IN_USE, f"volume {entry.id} is used by instance {user}",
                                    spec.instance_uuid)
        return need, slot

    def _read_free_disk_mb(self) -> int:
        """The data dir's free disk now (statvfs), kept with the time it was read for `bid`."""
        st = os.statvfs(self.config.data_dir)
        free_mb = st.f_bavail * st.f_frsize // 2**20
        self._free_disk_reading = (trio.current_time(), free_mb)
        return free_mb

    def _repeated_start(self, actor: InstanceActor, spec: InstanceSpec) -> Ticket:
        """Same uuid again: identical payload is idempotent; anything else is a conflict (`lifecycle`)."""
        verb = Verb.START_SAME if actor.spec == spec else Verb.START_OTHER
        outcome = lifecycle.judge(verb, actor.projected)
        if isinstance(outcome, lifecycle.Refuse):
            raise LauncherError(outcome.code, outcome.reason, actor.uuid)
        assert isinstance(outcome, lifecycle.Follow)
        return actor.follow()

    def instance(self, uuid: str) -> InstanceView | None:
        """The instance `uuid`, read-only, or None if there is none (deleted, or never started)."""
        return self.actors.get(uuid)

    def instances(self) -> Collection[InstanceView]:
        """Every instance, read-only: a live view of the table (copy it before awaiting while reading it)."""
        return self.actors.values()

    def state_counts(self) -> dict[str, int]:
        """How many instances are in each public state (pending, running, exited all present)."""
        counts = dict.fromkeys(("pending", "running", "exited"), 0)
        for actor in self.actors.values():
            counts[actor.public_state] += 1
        return counts

    def virtualizer_counts(self) -> dict[str, int]:
        """How many instances each enabled virtualizer runs (every one present), and under "unmanaged" how many
        instance dirs are left alone because theirs is not enabled."""
        counts = dict.fromkeys(self.backends, 0)
        for actor in self.actors.values():
            counts[actor.spec.vm_type] += 1
        counts["unmanaged"] = len(self.unmanaged)
        return counts

    def _with_defaults(self, command: StartCommand) -> InstanceSpec:
        """The spec to run: the node's default resources where the START named none, and its virtualizer's name
        in `vm_type`. invalid_data if that virtualizer is not enabled here, or refuses the spec."""
        d = self.config.defaults
        spec = command.with_defaults(vcpus=d.vcpus, mem_mb=d.mem_mb, disk_mb=d.disk_mb)
        backend = self.backends.get(spec.vm_type or self.config.virtualizer)
        if backend is None:
            raise LauncherError(errors.INVALID_DATA, f"start.vm_type: {spec.vm_type!r} is not enabled on this node "
                                f"(enabled: {', '.join(self.backends)})", spec.instance_uuid)
        if not spec.vm_type:
            spec = attrs.evolve(spec, vm_type=backend.name)
        problem = start_problem(backend, spec)
        if problem is not None:
            raise LauncherError(errors.INVALID_DATA, problem, spec.instance_uuid)
        return spec

    def image_store(self) -> ImageCatalog | None:
        """The image store served at /v1/images: the first enabled virtualizer's that keeps one."""
        return next(filter(None, map(image_catalog, self.backends.values())), None)

    def volume_store(self) -> VolumeCatalog | None:
        """The volume store served at /v1/volumes: the first enabled virtualizer's that keeps one."""
        return next(filter(None, map(volume_catalog, self.backends.values())), None)

    # ----------------------------------------------------------------- admission and node status

    @property
    def allocated(self) -> Resources:
        """What admitted instances were promised."""
        return self.admission.allocated

    @property
    def capacity(self) -> Capacity:
        """What the node may promise."""
        return self.admission.capacity

    def warm_pools(self) -> dict[str, WarmPools]:
        """The enabled virtualizers' prepared pools, by virtualizer name (those that have some configured)."""
        return self.admission.pools

    def warm_templates(self) -> dict[str, list[dict[str, Any]]]:
        """The enabled virtualizers' booted templates (those that have some configured), described, by name."""
        return {name: catalog.describe() for name, backend in self.backends.items()
                if (catalog := template_catalog(backend)) is not None}

    def _room_for_slot(self, vcpus: int, mem_mb: int) -> bool:
        """Whether admission has room for one more slot of `vcpus` and `mem_mb` (`WarmPools.run` asks)."""
        need = Resources(vcpus, mem_mb)
        return not self.admission.no_room(need, self._read_free_disk_mb(), len(self.actors),
                                          new_instance=False)

    def _compute_status(self, free_mb: int | None) -> str:
        if self.maintenance:
            return MAINTENANCE
        d = self.config.defaults
        if free_mb is None:
            free_mb = self._read_free_disk_mb()
        return FULL if self.admission.no_room(Resources(d.vcpus, d.mem_mb, d.disk_mb), free_mb,
                                              len(self.actors)) else READY

    def _update_status(self, free_mb: int | None = None, *, force: bool = False) -> None:
        """Recompute the node status (emitting `node_status` if it changed); `free_mb` if just read."""
        status = self._compute_status(free_mb)
        if force or status != self.status:
            self.status = status
            self.journal.emit("node_status", status=status)

    # ----------------------------------------------------------------- evacuate / restore

    def evacuate(self) -> Ticket:
        """Enter maintenance (no START is admitted) and stop every instance that runs or will run, once the
        `maintenance` file that keeps it across restarts is durable (`_apply_maintenance`)."""
        return self._queue_maintenance(True)

    def restore(self) -> Ticket:
        """Leave maintenance once the `maintenance` file is removed for good."""
        return self._queue_maintenance(False)

    def _queue_maintenance(self, on: bool) -> Ticket:
        ticket = Ticket("")
        try:
            self._maintenance_send.send_nowait((on, ticket))
        except trio.WouldBlock:
            raise LauncherError(errors.INSTANCE_BUSY, f"{MAINTENANCE_QUEUE} maintenance changes are already queued") \
                from None
        return ticket

    async def _apply_maintenance(self) -> None:
        """The one task that writes the `maintenance` file, in a worker thread, so that dispatch never blocks on
        the disk. Maintenance changes only once the file says so: a failed write changes nothing."""
        async for on, ticket in self._maintenance_recv:
            try:
                await trio.to_thread.run_sync(_write_maintenance_file, self.config.data_dir, on,
                                              limiter=self._ctx.persister.limiter)
            except OSError as exc:
                ticket.fail(errors.write_failure(exc, MAINTENANCE_FILE, errors.INTERNAL))
                continue
            self.maintenance = on
            if on:
                self._stop_running()
            self._update_status()
            ticket.finish(MAINTENANCE if on else self.status)

    def _stop_running(self) -> None:
        for actor in list(self.actors.values()):
            if actor.projected is State.RUNNING:
                try:
                    self.dispatch(StopCommand(actor.uuid))
                except LauncherError as exc:
                    self.journal.emit("stop_failure", instance_uuid=actor.uuid, reason=exc.code, detail=exc.reason)

    # ----------------------------------------------------------------- the table

    def _add(self, spec: InstanceSpec, *, created: bool, recovered: bool, goal: str = "running",
             volumes: tuple[str, ...] | None = None) -> InstanceActor:
        assert self._nursery is not None
        virtualizer = self.backends[spec.vm_type].new_virtualizer()
        actor = InstanceActor(self._ctx, virtualizer, spec, created=created, recovered=recovered,
                              goal=goal, volumes=volumes)
        self.actors[actor.uuid] = actor
        self.admission.allocated += Resources.of(spec)
        for volume in actor.volumes:
            # Two records naming one volume (made by hand, or by a launcher older than the check): the first keeps it.
            self.volume_users.setdefault(volume, actor.uuid)
        self._nursery.start_soon(actor.run)
        return actor

    def _on_gone(self, actor: ActorBase) -> None:
        if self.actors.get(actor.uuid) is actor:
            del self.actors[actor.uuid]
            self.admission.allocated -= Resources.of(actor.spec)
            for pools in self.admission.pools.values():
                pools.release(actor.uuid)  # a slot still set aside for it is discarded
                pools.wake()  # room freed: a pool short of slots may fill now
            if self.volume_users:  # its volumes, and those ATTACHes still queued for it had reserved
                for volume in [v for v, user in self.volume_users.items() if user == actor.uuid]:
                    del self.volume_users[volume]
            self._update_status()

    def _release_volume(self, actor: ActorBase, volume: str) -> None:
        if self.volume_users.get(volume) == actor.uuid:
            del self.volume_users[volume]

    # ----------------------------------------------------------------- recovery

    async def _remember_boot(self) -> None:
        """Once every recovered instance has settled, record this boot as the one they were recovered in."""
        await self._ctx.recovery.all_settled.wait()
        try:
            await trio.to_thread.run_sync(bootid.remember, self.config.data_dir, self._boot,
                                          limiter=self._ctx.persister.limiter)
        except OSError as exc:
            log.error("cannot record the boot id in %s: %s", self.config.data_dir, exc)

    async def _recover_all(self) -> None:
        """Load every instance dir; the actors then ask the virtualizer whether each VM still runs."""
        instances_dir = self.config.instances_dir
        limiter = self._ctx.persister.limiter
        loaded, broken = await trio.to_thread.run_sync(_scan, instances_dir, limiter=limiter)
        for path, detail in broken:
            aside = await trio.to_thread.run_sync(datadir.move_aside, path, self.config.data_dir / datadir.CORRUPT,
                                                  limiter=limiter)
            log.error("instance dir %s is unreadable (%s): moved to %s", path, detail, aside)
            self.journal.emit("instance_corrupt", instance_uuid=path.name, detail=detail, moved_to=str(aside))
        managed: list[tuple[InstanceRecord, InstanceSpec]] = []
        for record in loaded:
            name = record.spec.vm_type or self.config.virtualizer  # "": a record of a one-virtualizer launcher
            if name in self.backends:
                spec = record.spec if record.spec.vm_type else attrs.evolve(record.spec, vm_type=name)
                managed.append((record, spec))
                continue
            uuid = record.spec.instance_uuid
            self.unmanaged[uuid] = name
            log.error("instance %s runs on the %s virtualizer, which is not enabled (virtualizers: %s): it is left "
                      "as it is, and not served", uuid, name, ", ".join(self.backends))
            self.journal.emit("instance_unmanaged", instance_uuid=uuid, vm_type=name)
        self._ctx.recovery.expect(len(managed))
        for record, spec in managed:
            self._add(spec, created=record.created, recovered=True, goal=record.goal, volumes=record.volumes)
        if loaded or broken:
            log.info("recovered %d instances, %d unreadable dirs moved aside", len(loaded), len(broken))


def _scan(instances_dir: Path) -> tuple[list[InstanceRecord], list[tuple[Path, str]]]:
    """Read every instance dir (blocking). Finishes removals a crash interrupted."""
    files.make_dirs(instances_dir)
    loaded: list[InstanceRecord] = []
    broken: list[tuple[Path, str]] = []
    for path in sorted(instances_dir.iterdir()):
        if path.name.startswith(".deleting-"):
            shutil.rmtree(path, ignore_errors=True)  # a removal that a crash interrupted
            continue
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            record = InstanceRecord.from_json((path / datadir.INSTANCE_FILE).read_bytes())
            if record.spec.instance_uuid != path.name:
                raise ValueError(f"the record is for instance {record.spec.instance_uuid}")
            datadir.make_private(path)
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested absurdly deep
            broken.append((path, str(exc) or type(exc).__name__))
            continue
        loaded.append(record)
    return loaded, broken


def _write_maintenance_file(data_dir: Path, on: bool) -> None:
    """Make `<data_dir>/maintenance` exist (on) or not, durably: it survives a restart, as in ciao HEAD."""
    path = data_dir / MAINTENANCE_FILE
    if on:
        files.atomic_write(path, b"")
    else:
        path.unlink(missing_ok=True)
        files.fsync_dir(data_dir)
