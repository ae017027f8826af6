"""`InstanceActor`: one Trio task per instance, the only caller of that instance's virtualizer.

The actor reads one inbox that carries two kinds of message: `Request`s put there by the supervisor (START,
STOP, RESTART, DELETE, ATTACH, DETACH, each with a `Ticket` the caller can wait on) and `MonitorNote`s posted by
its monitor session (CONNECTED / CLOSED). It handles them one at a time, so virtualizer calls never overlap and
the virtualizer needs no lock (docs/concurrency.md). Every virtualizer call is bounded by a configured timeout; an
overrun or an exception becomes the phase's ciao code, never a crash of the launcher.

States (docs/architecture.md §6): pending → running → exited → deleted, with internal stopping / deleting. The monitor
session runs in its own cancel scope, which only the actor cancels, in the supervisor's monitor nursery (one
nursery per actor would triple the cost of cancelling 10 000 of them at shutdown); each session has a
number, and notes from an older session are
ignored, so a late CLOSED from a monitor that was already ended cannot confuse a newer boot.

The actor also owns its instance directory: it creates it (instance.json written atomically before the
START is acknowledged), and removes it only after the VM is really down. instance.json also holds the
instance's goal (launcher/records.py), written before a STOP, RESTART or DELETE is acknowledged, so that a
launcher restarted after `kill -9` carries on every acknowledged command (`_recover`), and the instance's
volumes (`volumes`: the START's, less those detached, plus those attached since), which the supervisor reserves
for the instance at dispatch (`ActorContext.release_volume` gives one back).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from launcher import lifecycle, store
from launcher.config import Config
from launcher.events import EventJournal
from launcher.lifecycle import State, Verb
from launcher.logs import InstanceLogs
from launcher.metrics import Metrics
from launcher.payloads import (
    AttachVolumeCommand,
    DeleteCommand,
    DetachVolumeCommand,
    RestartCommand,
    StartCommand,
    StopCommand,
)
from launcher.persist import Persister
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError, VirtualizerError
from launcher.plugin.protocol import MonitorEvent, Virtualizer, VmStats
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.volumes import MAX_VOLUMES
from launcher.records import record_json, spec_json, storage_ids
from launcher.recovery import RecoveryPlan

log = logging.getLogger(__name__)
T = TypeVar("T")


# What the outside world sees: the internal states are shown as the state they leave.
PUBLIC_STATE = {
    State.PENDING: "pending",
    State.RUNNING: "running",
    State.STOPPING: "running",
    State.EXITED: "exited",
    State.DELETING: "exited",
    State.DELETED: "deleted",
}


@attrs.define(eq=False)
class Ticket:
    """What the sender of a command waits on.

    `accepted` is set once the command has been taken on (for START: once instance.json is on disk);
    `done` once it has finished (state running / exited / deleted) or failed (`error` set)."""

    instance_uuid: str
    accepted: trio.Event = attrs.Factory(trio.Event)
    done: trio.Event = attrs.Factory(trio.Event)
    state: str | None = None
    error: LauncherError | None = None
    on_done: Callable[[Ticket], None] | None = None  # called once, when done is set (launcher.metrics)

    def accept(self) -> None:
        self.accepted.set()

    def finish(self, state: str) -> None:
        self.state = state
        self.accepted.set()
        self._set_done()

    def fail(self, error: LauncherError) -> None:
        self.error = error
        self.accepted.set()
        self._set_done()

    def _set_done(self) -> None:
        self.done.set()
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done(self)


ActorCommand = StartCommand | StopCommand | RestartCommand | DeleteCommand | AttachVolumeCommand | DetachVolumeCommand


@attrs.frozen
class Request:
    command: ActorCommand
    ticket: Ticket


class _PollStats:
    """Inbox message from the stats poller: time to call vm.stats()."""


POLL_STATS = _PollStats()


@attrs.frozen
class MonitorNote:
    session: int
    event: MonitorEvent


Message = Request | MonitorNote | _PollStats


@attrs.frozen
class _SessionInbox:
    """The inbox a monitor session sees: it tags each event with the session's number."""

    send_channel: trio.MemorySendChannel[Message]
    session: int

    async def send(self, event: MonitorEvent) -> None:
        await self.send_channel.send(MonitorNote(self.session, event))


@attrs.define(eq=False)
class ActorContext:
    """What every actor shares: configuration, the journal, the log writer and the supervisor's hooks."""

    config: Config
    journal: EventJournal
    logs: InstanceLogs
    persister: Persister
    on_gone: Callable[[InstanceActor], None]  # the instance is deleted; drop it from the table
    # A volume the supervisor reserved for the instance is not the instance's (any more): an ATTACH failed, or a
    # DETACH was carried out.
    release_volume: Callable[[InstanceActor, str], None]
    recovery: RecoveryPlan  # this start-up's host-reboot policy and boot slots
    monitors: trio.Nursery | None = None  # where monitor sessions run; set by the supervisor
    metrics: Metrics = attrs.Factory(Metrics)  # the START steps' durations are observed there


class _Interrupted(Exception):
    """The START pipeline was cancelled by a DELETE before the VM was started."""


@attrs.define(eq=False)
class _Record:
    """What the actor knows of its instance.json (launcher/records.py)."""

    created: bool  # the disk was made and the VM started on it
    goal: str  # as instance.json says
    durable: bool  # instance.json is on disk (a START is acknowledged only then)
    awaiting: list[Ticket] = attrs.Factory(list)  # repeated STARTs, acknowledged once the record is durable
    spec_json: bytes | None = None  # the encoded spec, between the two writes of a START


@attrs.define(eq=False)
class _Recovering:
    """What a recovered instance still owes: two marks, each cleared once."""

    unreported: bool  # its next state report is marked `recovered: true`
    unsettled: bool  # RecoveryPlan.settled() is still to be called


@attrs.define(eq=False)
class _Boot:
    """The actor's START or RESTART under way, from its image phases until the VM runs or the boot fails (the
    fields are reset, the object kept)."""

    ticket: Ticket | None = None  # answered when the monitor says CONNECTED, or when the boot fails
    failure_event: str = "start_failure"  # or restart_failure
    # boot_s after start_vm or after the recovery probe began (stop_margin_s more if forcing it off failed); inf: none
    deadline: float = math.inf
    holds_slot: bool = False  # one of RecoveryPlan.boot_slots
    interruptible: trio.CancelScope | None = None  # the image phases, or the wait for a boot slot: a DELETE cancels it
    doomed: bool = False  # a DELETE is queued: a START pipeline before it is abandoned


@attrs.define(eq=False)
class _MonitorSession:
    """The current monitor session, which runs in the supervisor's monitor nursery and only the actor cancels."""

    number: int = 0  # notes from an older session are ignored
    scope: trio.CancelScope | None = None  # None: no session runs
    probing: bool = False  # the recovery session has not yet said whether the VM runs


class InstanceActor:
    def __init__(
        self,
        ctx: ActorContext,
        vm: Virtualizer,
        spec: InstanceSpec,
        *,
        created: bool = False,
        recovered: bool = False,
        goal: str = "running",
        volumes: tuple[str, ...] | None = None,
    ) -> None:
        self.ctx = ctx
        self.vm = vm
        self.spec = spec
        self.uuid = spec.instance_uuid
        self.dir: Path = ctx.config.instances_dir / self.uuid
        self.state = State.PENDING
        self.stats = VmStats()
        # The instance's volumes, in disk order (launcher/records.py); None: the START's.
        self.volumes = storage_ids(spec) if volumes is None else volumes
        # The state this instance will be in once everything queued has run; kept by the supervisor so
        # that it can refuse a command at once without waiting for the actor (docs/concurrency.md, step 7).
        self.projected = State.DELETED if goal == "deleted" else State.RUNNING
        self.queued = 0
        self.activity: str | None = None  # the command being handled, for `show`
        # instance.json is durable: a recovered instance's always is; a new one's once its START's round is.
        self._record = _Record(created=created, goal=goal, durable=recovered)
        self._recovering = _Recovering(unreported=recovered, unsettled=recovered)
        self._booting = _Boot()
        self._session = _MonitorSession()
        self._send, self._recv = trio.open_memory_channel[Message](ctx.config.inbox_size)
        self._poll_posted = False  # a POLL_STATS is in the inbox
        self._followers: list[Ticket] | None = None  # waiting for the instance to settle (rarely any)

    # ----------------------------------------------------------------- called by the supervisor (sync)

    def post(self, command: ActorCommand, ticket: Ticket) -> None:
        """Queue a command. Raises `instance_busy` if the inbox is full. Never blocks."""
        try:
            self._send.send_nowait(Request(command, ticket))
        except trio.WouldBlock:
            raise LauncherError(
                errors.INSTANCE_BUSY, f"{self.queued} commands already queued for this instance", self.uuid
            ) from None
        self.queued += 1

    def poll_stats(self) -> None:
        """Ask a running instance to refresh its stats (from the stats poller; never blocks, and a busy
        instance simply misses one round)."""
        if self.state is State.RUNNING and not self._poll_posted:
            try:
                self._send.send_nowait(POLL_STATS)
                self._poll_posted = True
            except trio.WouldBlock:
                pass

    def interrupt_start(self) -> None:
        """A DELETE arrived: abandon a START that has not yet started the VM, now or when it gets there."""
        self._booting.doomed = True
        if self._booting.interruptible is not None:
            self._booting.interruptible.cancel()

    def follow(self) -> Ticket:
        """A ticket finished with the public state once nothing is queued or under way (running, exited
        or deleted): how a repeated, idempotent START waits."""
        ticket = Ticket(self.uuid)
        if self._record.durable:
            ticket.accept()
        else:
            self._record.awaiting.append(ticket)  # acknowledged with the first START, never before it
        if self._settled():
            ticket.finish(self.public_state)
        else:
            self._followers = (self._followers or []) + [ticket]
        return ticket

    def _current_volumes(self) -> tuple[str, ...]:
        """The virtualizer's view of `volumes` (Virtualizer.init)."""
        return self.volumes

    @property
    def public_state(self) -> str:
        return PUBLIC_STATE[self.state]

    def _settled(self) -> bool:
        return self.queued == 0 and self.state in (State.RUNNING, State.EXITED, State.DELETED)

    def _sync_projection(self) -> None:
        """Once nothing is queued, the projected state is the real one; release followers if settled."""
        if self.queued:
            return
        self.projected = State.RUNNING if self.state is State.PENDING else self.state
        if self._followers and self._settled():
            for ticket in self._followers:
                ticket.finish(self.public_state)
            self._followers = None

    # ----------------------------------------------------------------- the task

    async def run(self) -> None:
        """The actor's task. Returns once the instance is deleted; cancelled when the launcher stops
        (then the VM keeps running, and a restarted launcher reconnects to it)."""
        self.vm.init(self.spec, self.dir, self._current_volumes)
        try:
            if self._recovering.unreported:
                await self._recover_or_exit()
            while self.state is not State.DELETED:
                message = await self._next_message()
                try:
                    await self._handle(message)
                except Exception as exc:  # a bug; the instance must stay reachable
                    log.exception("instance %s: unexpected error", self.uuid)
                    self._log(f"internal error: {exc!r}")
                    if isinstance(message, Request):
                        message.ticket.fail(LauncherError(errors.INTERNAL, repr(exc), self.uuid))
                if isinstance(message, Request):
                    self.queued -= 1
                    self._sync_projection()
        finally:
            self._close_monitor()  # the session lives in the supervisor's nursery (and a boot slot is freed)

    async def _recover_or_exit(self) -> None:
        """Recovery; a bug in it leaves this instance `exited` (reachable: RESTART, DELETE), never the launcher
        down with it."""
        try:
            await self._recover()
        except Exception as exc:
            log.exception("instance %s: recovery failed", self.uuid)
            self._log(f"internal error during recovery: {exc!r}")
            self._close_monitor()
            self.state = State.EXITED
            self._emit_state(reason=errors.INTERNAL)

    async def _next_message(self) -> Message | None:
        """The next inbox message, or None when the boot deadline has passed."""
        if self._booting.deadline == math.inf:
            return await self._recv.receive()  # no cancel scope per message when there is no deadline
        with trio.move_on_at(self._booting.deadline):
            return await self._recv.receive()
        return None

    async def _handle(self, message: Message | None) -> None:
        if message is None:
            await self._on_boot_deadline()
        elif message is POLL_STATS:
            self._poll_posted = False
            if self.state is State.RUNNING:
                await self._poll_stats()
        elif isinstance(message, MonitorNote):
            if message.session == self._session.number and self._session.scope is not None:
                await self._on_monitor(message.event)
        elif isinstance(message, Request):
            self.activity = _ACTIVITY.get(type(message.command)) or \
                type(message.command).__name__.removesuffix("Command").upper()  # e.g. STOP
            try:
                await self._on_request(message.command, message.ticket)
            finally:
                self.activity = None

    async def _on_request(self, command: ActorCommand, ticket: Ticket) -> None:
        if isinstance(command, StartCommand):
            await self._start(ticket)
        elif isinstance(command, StopCommand):
            await self._stop(command, ticket)
        elif isinstance(command, RestartCommand):
            await self._restart(ticket)
        elif isinstance(command, DeleteCommand):
            await self._delete(command, ticket)
        else:
            await self._change_volume(command, ticket)

    # ----------------------------------------------------------------- START / RESTART

    async def _start(self, ticket: Ticket) -> None:
        """START: persist the instance, then ensure image → create image → start VM → monitor."""
        try:
            await self._persist_new(on_durable=lambda: self._record_durable(ticket))  # acknowledged once durable
        except FileExistsError:
            # Never remove a directory this START did not create (ciao checked this first for that reason).
            self._fail(ticket, "start_failure", LauncherError(errors.INSTANCE_EXISTS, f"{self.dir} already exists"))
            self._gone(reason=errors.INSTANCE_EXISTS)
            return
        except OSError as exc:
            await self._fail_start(ticket, errors.write_failure(exc, "the instance dir", errors.IMAGE_FAILURE))
            return
        # Only now: the log is kept in the instance dir, which exists once the record is written.
        self._log(f"START accepted (image {self.spec.image_uuid or '-'}, {self.spec.vcpus} vCPU, "
                  f"{self.spec.mem_mb} MiB)")
        self._emit_state()
        await self._prepare_and_boot(ticket, "start_failure")

    async def _prepare_and_boot(self, ticket: Ticket, failure_event: str, *, limited: bool = False) -> None:
        """Image phases (which a DELETE may interrupt), then boot (see `_boot` for `limited`)."""
        t = self.ctx.config.timeouts
        try:
            with trio.CancelScope() as self._booting.interruptible:
                if self._booting.doomed:
                    self._booting.interruptible.cancel()
                await self._call("ensure_backing_image", errors.IMAGE_FAILURE, t.ensure_image_s,
                                 self.vm.ensure_backing_image)
                await self._call("create_image", errors.IMAGE_FAILURE, t.create_image_s,
                                 self.vm.create_image, self.spec.user_data, self.spec.meta_data, None)
            if self._booting.interruptible.cancelled_caught:
                raise _Interrupted
        except _Interrupted:
            self._abandon_start(ticket)
            return
        except VirtualizerError as exc:
            await self._fail_start(ticket, exc)
            return
        finally:
            self._booting.interruptible = None
        await self._boot(ticket, failure_event, limited=limited)

    def _abandon_start(self, ticket: Ticket) -> None:
        self._log("START abandoned: a DELETE arrived before the VM was started")
        self.state = State.EXITED
        ticket.fail(LauncherError(errors.NO_INSTANCE, "START abandoned: the instance is being deleted", self.uuid))

    async def _fail_start(self, ticket: Ticket, exc: LauncherError) -> None:
        """A START failed before start_vm: remove what was created, and the instance with it; the ticket
        is answered once that is done."""
        await self._call_quietly("delete_image", self.ctx.config.timeouts.delete_image_s, self.vm.delete_image)
        try:
            await self._remove_dir()
        except OSError as error:  # a full disk: what is on disk stays (README "What is not covered")
            log.error("instance %s: cannot remove %s: %s", self.uuid, self.dir, error)
        self._fail(ticket, "start_failure", exc)
        self._gone(reason=exc.code)

    async def _restart(self, ticket: Ticket) -> None:
        if self._refused(Verb.RESTART, ticket, "restart_failure"):
            return
        if not await self._commit_goal("starting", ticket, "restart_failure", errors.LAUNCH_FAILURE):
            return
        self._log("RESTART accepted")
        ticket.accept()
        self.state = State.PENDING
        self._emit_state()
        if not self._record.created:  # an earlier START never finished making the disk: redo it
            await self._prepare_and_boot(ticket, "restart_failure")
        else:
            await self._boot(ticket, "restart_failure")

    async def _boot(self, ticket: Ticket, failure_event: str, *, limited: bool = False,
                    announce: str | None = None) -> None:
        """start_vm, then wait (in the main loop) for the monitor's CONNECTED, bounded by boot_s.

        `limited`: a boot that recovery starts on its own holds one of RecoveryPlan.boot_slots until the VM
        runs or the boot fails. `announce`: the reason of the `pending` event emitted once the boot begins.
        Once start_vm has returned, the record says `created` and goal `running` (a START's or RESTART's
        second write); once it has failed, `created` and goal `exited`."""
        t = self.ctx.config.timeouts
        if limited and not await self._take_boot_slot():
            self._abandon_start(ticket)
            return
        if announce is not None:
            self._emit_state(reason=announce)
        try:
            await self._call("start_vm", errors.LAUNCH_FAILURE, t.start_vm_s, self.vm.start_vm)
        except VirtualizerError as exc:
            self._release_boot_slot()
            self._record.created = True
            await self._set_goal_quietly("exited")  # before anyone hears of the failure
            self.state = State.EXITED
            self._fail(ticket, failure_event, exc)
            self._emit_state(reason=exc.code)
            return
        self._booting.ticket = ticket
        self._booting.failure_event = failure_event
        self._booting.deadline = trio.current_time() + t.boot_s
        self._open_monitor(recover=False)
        if not self._record.created or self._record.goal == "starting":
            self._record.created = True
            await self._set_goal_quietly("running")  # the second write: the VM was started

    async def _take_boot_slot(self) -> bool:
        """Wait for a boot slot; False if a DELETE came first. Bounded: each holder's boot is (boot_s)."""
        with trio.CancelScope() as self._booting.interruptible:
            if self._booting.doomed:
                self._booting.interruptible.cancel()
            await self.ctx.recovery.boot_slots.acquire_on_behalf_of(self)
            self._booting.holds_slot = True
        self._booting.interruptible = None
        return self._booting.holds_slot

    def _release_boot_slot(self) -> None:
        if self._booting.holds_slot:
            self._booting.holds_slot = False
            self.ctx.recovery.boot_slots.release_on_behalf_of(self)

    # ----------------------------------------------------------------- monitor

    def _open_monitor(self, recover: bool) -> None:
        assert self.ctx.monitors is not None
        self._session.number += 1
        self._session.scope = trio.CancelScope()
        self.ctx.monitors.start_soon(self._monitor, self._session.scope, self._session.number, recover)

    async def _monitor(self, scope: trio.CancelScope, session: int, recover: bool) -> None:
        inbox = _SessionInbox(self._send, session)
        with scope:
            try:
                await self.vm.monitor_vm(inbox, recover)
            except Exception:  # a virtualizer bug: without a monitor, the VM counts as lost
                log.exception("instance %s: monitor_vm failed", self.uuid)
                await inbox.send(MonitorEvent.CLOSED)

    def _close_monitor(self) -> None:
        if self._session.scope is not None:
            self._session.scope.cancel()
            self._session.scope = None
        self._booting.deadline = math.inf
        self._session.probing = False
        self._release_boot_slot()

    async def _on_monitor(self, event: MonitorEvent) -> None:
        if self._session.probing:
            self._session.probing = False
            await self._reconcile(event)
        elif event is MonitorEvent.CONNECTED:
            if self.state is State.PENDING:
                self._on_running()
        else:
            self._log("VM is down" if self.state is State.PENDING else "VM exited unexpectedly")
            await self._set_goal_quietly("exited")  # not restarted unasked, not even after a host reboot
            self._on_down()
            if self._booting.ticket is not None:
                exc = LauncherError(errors.LAUNCH_FAILURE, "the VM went down before it was running")
                self._fail(self._booting.ticket, self._booting.failure_event, exc)
                self._booting.ticket = None
            self._emit_state(reason="vm_exited")

    def _on_running(self) -> None:
        self.vm.connected()
        self.state = State.RUNNING
        self._booting.deadline = math.inf
        self._release_boot_slot()
        self.ctx.metrics.vm_running(self)
        self._log("VM is running")
        if self._booting.ticket is not None:
            self._booting.ticket.finish("running")
            self._booting.ticket = None
        self._emit_state()

    def _on_down(self) -> None:
        """The VM is down (a monitor said so): the instance is exited. The caller reports it at once."""
        self._close_monitor()
        self.vm.lost_vm()
        self.state = State.EXITED
        self.stats = VmStats()

    async def _on_boot_deadline(self) -> None:
        now = trio.current_time()
        if self.state is State.PENDING:
            t = self.ctx.config.timeouts
            self._log(f"VM not running after {t.boot_s:g} s: forcing it off")
            try:
                await self._power_off(0.0)
            except VirtualizerError:
                self._booting.deadline = now + t.stop_margin_s  # still up, or unknown: try again later
                return
            await self._set_goal_quietly("exited")
            ticket, self._booting.ticket = self._booting.ticket, None
            self.state = State.EXITED
            exc = LauncherError(errors.LAUNCH_FAILURE, f"the VM was not running within {t.boot_s:g} s")
            if ticket is not None:
                self._fail(ticket, self._booting.failure_event, exc)
            self._emit_state(reason=errors.LAUNCH_FAILURE)
        else:
            self._booting.deadline = math.inf

    async def _poll_stats(self) -> None:
        try:
            self.stats = await self._call("stats", errors.INTERNAL, self.ctx.config.timeouts.stats_s,
                                          self.vm.stats, quiet=True)
        except VirtualizerError as exc:
            self._log(f"stats failed: {exc.reason}")
            self.stats = VmStats()

    # ----------------------------------------------------------------- STOP / DELETE

    async def _stop(self, command: StopCommand, ticket: Ticket) -> None:
        if self._refused(Verb.STOP, ticket, "stop_failure"):
            return
        grace = self.ctx.config.timeouts.stop_grace_s if command.grace_s is None else command.grace_s
        goal = self._record.goal
        if not await self._commit_goal("exited", ticket, "stop_failure", errors.STOP_FAILURE):
            return
        self._log(f"STOP accepted (grace {grace:g} s)")
        ticket.accept()
        previous, self.state = self.state, State.STOPPING
        try:
            await self._power_off(grace)
        except VirtualizerError as exc:
            self.state = previous
            await self._set_goal_quietly(goal)
            self._fail(ticket, "stop_failure", exc)
            return
        self.state = State.EXITED
        self._abandon_boot("stopped before it was running")
        ticket.finish("exited")
        self._emit_state(reason="stopped")

    async def _power_off(self, grace: float) -> None:
        """stop_vm, then end the monitor session. Raises VirtualizerError if the VM may still be up."""
        t = self.ctx.config.timeouts
        await self._call("stop_vm", errors.STOP_FAILURE, grace + t.stop_margin_s, self.vm.stop_vm, grace)
        self._close_monitor()
        self.vm.lost_vm()
        self.stats = VmStats()

    def _abandon_boot(self, why: str) -> None:
        if self._booting.ticket is not None:
            self._booting.ticket.finish(self.public_state)
            self._log(f"boot abandoned: {why}")
            self._booting.ticket = None

    async def _delete(self, command: DeleteCommand, ticket: Ticket) -> None:
        """DELETE from any state a handler sees: the VM goes down first, and only then is anything removed.

        With a VM to power off, the DELETE is acknowledged once the goal `deleted` is durable (a restarted
        launcher finishes it); without one, once the removal is (its one write)."""
        if self._refused(Verb.DELETE, ticket, "delete_failure"):
            return
        t = self.ctx.config.timeouts
        goal = self._record.goal
        power_off = self._session.scope is not None or self.state in (State.PENDING, State.RUNNING)
        # Goal deleted already: recovery is finishing an acknowledged DELETE.
        if power_off and goal != "deleted" and \
                not await self._commit_goal("deleted", ticket, "delete_failure", errors.STOP_FAILURE):
            return
        self._log("DELETE accepted" + (" (stop)" if command.stop else ""))
        previous, self.state = self.state, State.DELETING
        if power_off:
            ticket.accept()
            if command.grace_s is not None:
                grace = command.grace_s
            else:
                grace = t.stop_grace_s if command.stop else t.delete_grace_s
            try:
                await self._power_off(grace)
            except VirtualizerError as exc:
                self.state = previous
                await self._set_goal_quietly(goal)
                self._fail(ticket, "delete_failure", exc)
                return
        self._abandon_boot("deleted")
        await self._call_quietly("delete_image", t.delete_image_s, self.vm.delete_image)
        try:
            await self._remove_dir(on_durable=ticket.accept)
        except OSError as exc:
            # Not removed: the instance stays (its VM is down) and the DELETE can be sent again. If the DELETE
            # was acknowledged (goal `deleted` is on disk), a restarted launcher finishes it.
            self.state = State.EXITED
            self._fail(ticket, "delete_failure",
                       errors.write_failure(exc, "the instance's removal", errors.STOP_FAILURE))
            return
        ticket.finish("deleted")
        self._gone(reason="stop" if command.stop else "deleted")

    def _gone(self, reason: str) -> None:
        self.state = State.DELETED
        self._emit_state(reason=reason)
        self.ctx.on_gone(self)

    # ----------------------------------------------------------------- ATTACH / DETACH

    async def _change_volume(self, command: AttachVolumeCommand | DetachVolumeCommand, ticket: Ticket) -> None:
        """ATTACH or DETACH one volume (the supervisor reserved it for this instance at dispatch; it is given
        back once it is not the instance's)."""
        volume = command.volume_uuid
        try:
            if isinstance(command, AttachVolumeCommand):
                await self._attach(volume, ticket)
            else:
                await self._detach(volume, ticket)
        finally:
            if volume not in self.volumes:
                self.ctx.release_volume(self, volume)

    async def _attach(self, volume: str, ticket: Ticket) -> None:
        """Record the volume (durable before the VM may write to it: a restarted launcher keeps it reserved), then
        attach it: hot-plugged into a VM that runs, a disk from the next boot of one that does not. A failed
        attach is taken out of the record again."""
        event = "attach_volume_failure"
        if self._refused(Verb.ATTACH, ticket, event, volume_id=volume):
            return
        refusal = None
        if volume in self.volumes:
            refusal = LauncherError(errors.ALREADY_ATTACHED, f"volume {volume} is attached already")
        elif len(self.volumes) >= MAX_VOLUMES:
            refusal = LauncherError(errors.ATTACH_FAILURE, f"the instance has {len(self.volumes)} volumes, the most "
                                                           "it may have")
        if refusal is not None:
            self._fail(ticket, event, refusal, volume_id=volume)
            return
        before = self.volumes
        self.volumes = before + (volume,)
        if not await self._commit_goal(self._record.goal, ticket, event, errors.ATTACH_FAILURE, volume_id=volume):
            self.volumes = before
            return
        ticket.accept()
        try:
            await self._call("attach_volume", errors.ATTACH_FAILURE, self.ctx.config.timeouts.volume_s,
                             self.vm.attach_volume, volume)
        except VirtualizerError as exc:
            self.volumes = before
            await self._set_goal_quietly(self._record.goal)
            self._fail(ticket, event, exc, volume_id=volume)
            return
        self._log(f"volume {volume} attached")
        self.ctx.journal.emit("volume_attached", instance_uuid=self.uuid, volume_id=volume, state=self.public_state)
        ticket.finish(self.public_state)

    async def _detach(self, volume: str, ticket: Ticket) -> None:
        """Detach the volume (a VM that runs must let go of it: the virtualizer waits for the guest, bounded),
        then take it out of the record. The boot volume stays."""
        event = "detach_volume_failure"
        if self._refused(Verb.DETACH, ticket, event, volume_id=volume):
            return
        refusal = None
        if volume not in self.volumes:
            refusal = LauncherError(errors.NOT_ATTACHED, f"volume {volume} is not attached to this instance")
        elif any(entry.id == volume and entry.boot for entry in self.spec.storage):
            refusal = LauncherError(errors.DETACH_FAILURE, f"volume {volume} is the instance's boot volume")
        if refusal is not None:
            self._fail(ticket, event, refusal, volume_id=volume)
            return
        ticket.accept()
        timeout = self.ctx.config.timeouts.volume_s
        try:
            await self._call("detach_volume", errors.DETACH_FAILURE, timeout, self.vm.detach_volume, volume)
        except VirtualizerError as exc:
            self._fail(ticket, event, exc, volume_id=volume)
            return
        before = self.volumes
        self.volumes = tuple(v for v in before if v != volume)
        if not await self._commit_goal(self._record.goal, ticket, event, errors.DETACH_FAILURE, volume_id=volume):
            # The record still lists it, in its place: it stays the instance's, and a running VM gets it back.
            self.volumes = before
            await self._call_quietly("attach_volume", timeout, lambda: self.vm.attach_volume(volume))
            return
        self._log(f"volume {volume} detached")
        self.ctx.journal.emit("volume_detached", instance_uuid=self.uuid, volume_id=volume, state=self.public_state)
        ticket.finish(self.public_state)

    # ----------------------------------------------------------------- recovery

    async def _recover(self) -> None:
        """Launcher start-up: finish an acknowledged DELETE, or ask the virtualizer whether the VM runs (the
        answer goes to `_reconcile`), bounded by boot_s."""
        if self._record.goal == "deleted":
            self._log("launcher restarted during a DELETE: finishing it")
            await self._delete(DeleteCommand(self.uuid), Ticket(self.uuid))
            if self.state is not State.DELETED:  # delete_failure: a DELETE may try again
                self.projected = State.EXITED
                self._settle()
            return
        self._log("launcher restarted: looking for the VM")
        self._booting.deadline = trio.current_time() + self.ctx.config.timeouts.boot_s
        self._open_monitor(recover=True)
        self._session.probing = True

    async def _reconcile(self, event: MonitorEvent) -> None:
        """The recovery probe's answer, against the record's goal (the table in README "After a restart")."""
        recovery = self.ctx.recovery
        if event is MonitorEvent.CONNECTED:
            if self._record.goal == "exited":
                self._log("the VM runs, but the instance was stopped: finishing the STOP")
                await self._stop(StopCommand(self.uuid), Ticket(self.uuid))
                return
            self._on_running()
            if not self._record.created or self._record.goal == "starting":  # start_vm had returned; the write was lost
                self._record.created = True
                await self._set_goal_quietly("running")
            return
        if self._record.goal == "exited":
            self._log("the VM is down, as it was when the launcher stopped")
            self._on_down()
            self._emit_state()
        elif not self._record.created:
            self._log("the launcher restarted during a START: carrying it on")
            self._close_monitor()  # still pending: the START goes on
            self._emit_state(reason="start_resumed")
            await self._prepare_and_boot(Ticket(self.uuid), "start_failure", limited=True)
        elif self._record.goal == "starting":
            self._log("the launcher restarted during a RESTART: carrying it on")
            self._close_monitor()  # still pending: the RESTART goes on
            self._emit_state(reason="restart_resumed")
            await self._boot(Ticket(self.uuid), "restart_failure", limited=True)
        elif recovery.host_rebooted and recovery.restarts(self.spec):
            self._log(f"the host rebooted: starting the VM again (recovery.restart_running: {recovery.policy})")
            self._close_monitor()  # still pending: reported once its boot begins (after a boot slot)
            await self._boot(Ticket(self.uuid), "restart_failure", limited=True, announce="host_restart")
        else:
            if recovery.host_rebooted:
                self._log(f"the host rebooted; not restarting the VM (recovery.restart_running: {recovery.policy})")
            else:
                self._log("the VM exited while the launcher was down")
            await self._set_goal_quietly("exited")  # recorded before it is reported
            self._on_down()
            self._emit_state(reason="host_restart" if recovery.host_rebooted else "vm_exited")

    # ----------------------------------------------------------------- helpers

    def _refused(self, verb: Verb, ticket: Ticket, failure_event: str, **extra: str) -> bool:
        """Judge a command against the state the instance is in now (the table in launcher/lifecycle.py, which
        the supervisor read against the projected state); if the table refuses it, fail its ticket."""
        outcome = lifecycle.judge(verb, self.state)
        if isinstance(outcome, lifecycle.Refuse):
            self._fail(ticket, failure_event, LauncherError(outcome.code, f"instance is {self.public_state}"), **extra)
            return True
        return False

    async def _call(self, phase: str, code: str, timeout: float, fn: Callable[..., Awaitable[T]], *args: Any,
                    quiet: bool = False) -> T:
        """One virtualizer call, bounded by `timeout`; any failure becomes VirtualizerError(code)."""
        started = trio.current_time()
        try:
            # fail_after, without its generator-based context manager (three calls per START)
            with trio.CancelScope(deadline=started + timeout) as scope:
                result = await fn(*args)
            if scope.cancelled_caught:
                raise trio.TooSlowError
        except trio.TooSlowError:
            exc = VirtualizerError(code, f"{phase} did not finish within {timeout:g} s", self.uuid)
            self._log(f"{phase} failed: {exc.reason}")
            raise exc from None
        except VirtualizerError as exc:
            exc.instance_uuid = self.uuid
            self._log(f"{phase} failed after {_ms(started)}: {exc.reason}")
            raise
        except Exception as exc:  # the virtualizer's bug, reported as its phase's failure
            log.exception("instance %s: %s raised", self.uuid, phase)
            self._log(f"{phase} failed after {_ms(started)}: {exc!r}")
            raise VirtualizerError(code, f"{phase} raised {exc!r}", self.uuid) from exc
        self.ctx.metrics.step_done(self, phase, trio.current_time() - started)
        if not quiet:
            self._log(f"{phase} ok in {_ms(started)}")
        return result

    async def _call_quietly(self, phase: str, timeout: float, fn: Callable[[], Awaitable[None]]) -> None:
        """A clean-up call whose failure is logged, not fatal (as in ciao's delete)."""
        try:
            await self._call(phase, errors.INTERNAL, timeout, fn)
        except VirtualizerError:
            pass

    def _record_durable(self, ticket: Ticket) -> None:
        """The START's record is on disk: acknowledge it, and any repeat of it that came meanwhile."""
        self._record.durable = True
        ticket.accept()
        for waiting in self._record.awaiting:
            waiting.accept()
        self._record.awaiting = []

    async def _persist_new(self, on_durable: Callable[[], None]) -> None:
        self._record.spec_json = spec_json(self.spec)
        record = record_json(self._record.spec_json, created=False, volumes=self.volumes)
        await self.ctx.persister.create(self.dir / store.INSTANCE_FILE, record, on_durable=on_durable)

    async def _set_goal(self, goal: str) -> None:
        """Write instance.json with `goal` (and `created`, `volumes`); durable when this returns. Raises OSError."""
        encoded = self._record.spec_json or spec_json(self.spec)
        record = record_json(encoded, self._record.created, goal, self.volumes)
        await self.ctx.persister.write(self.dir / store.INSTANCE_FILE, record)
        self._record.spec_json = None  # not needed again: keep idle instances small
        self._record.goal = goal

    async def _commit_goal(self, goal: str, ticket: Ticket, failure_event: str, code: str, **extra: str) -> bool:
        """`_set_goal` before a command is acknowledged: if the write fails, the command fails (`code`, or
        storage_full) and False is returned."""
        try:
            await self._set_goal(goal)
        except OSError as exc:
            self._fail(ticket, failure_event, errors.write_failure(exc, store.INSTANCE_FILE, code), **extra)
            return False
        return True

    async def _set_goal_quietly(self, goal: str) -> None:
        """`_set_goal` where a failed write cannot undo what happened: it is logged."""
        try:
            await self._set_goal(goal)
        except OSError as exc:
            log.error("instance %s: cannot write instance.json: %s", self.uuid, exc)
            self._log(f"cannot write instance.json (goal {goal}): {exc}")

    async def _remove_dir(self, on_durable: Callable[[], None] | None = None) -> None:
        """Remove the instance dir through the log; OSError if the removal cannot be logged (then nothing
        was removed)."""
        self.ctx.logs.discard(self.dir)
        await self.ctx.persister.remove(self.dir, on_durable=on_durable)

    def _fail(self, ticket: Ticket, event: str, exc: LauncherError, **extra: str) -> None:
        exc.instance_uuid = self.uuid
        ticket.fail(exc)
        self._log(f"{event}: {exc.code}: {exc.reason}")
        self.ctx.journal.emit(event, instance_uuid=self.uuid, reason=exc.code, detail=exc.reason, **extra)

    def _emit_state(self, **extra: Any) -> None:
        """Report the public state; a recovered instance's first report is marked `recovered: true`, and its
        first settled one (running, exited, deleted) counts it as settled for the RecoveryPlan."""
        if self._recovering.unreported:
            self._recovering.unreported = False
            extra["recovered"] = True
        self.ctx.journal.emit("instance_state", instance_uuid=self.uuid, state=self.public_state, **extra)
        if self.state in (State.RUNNING, State.EXITED, State.DELETED):
            self._settle()
        self._sync_projection()

    def _settle(self) -> None:
        if self._recovering.unsettled:
            self._recovering.unsettled = False
            self.ctx.recovery.settled()

    def _log(self, message: str) -> None:
        self.ctx.logs.write(self.dir, message)


_ACTIVITY = {AttachVolumeCommand: "ATTACH", DetachVolumeCommand: "DETACH"}


def _ms(started: float) -> str:
    return f"{(trio.current_time() - started) * 1000:.1f} ms"
