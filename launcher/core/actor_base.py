"""`ActorBase`: an instance actor's state, what the supervisor may call on it, and the primitives its command
handlers share: bounded virtualizer calls, record writes, the monitor session, power-off, reporting.

The actor is one class, `launcher.core.actor.InstanceActor`, assembled from one module per concern, each a
subclass of this one: `actor_start` (START, RESTART, the boot), `actor_stop` (STOP, DELETE), `actor_volumes`
(ATTACH, DETACH), and `actor` itself (the task's loop, the monitor's reports, recovery). All of them run in the
actor's own task only, one message at a time (docs/concurrency.md); the methods under "called by the supervisor"
are the exception: synchronous, from the supervisor's dispatch or the stats poller, and they never block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from launcher.core import lifecycle
from launcher.core.config import Config
from launcher.core.lifecycle import PUBLIC_STATE, State, Verb
from launcher.core.messages import POLL_STATS, ActorCommand, Message, Request, SessionInbox, Ticket
from launcher.core.metrics import Metrics
from launcher.core.recovery import RecoveryPlan
from launcher.durable import datadir
from launcher.durable.events import EventJournal
from launcher.durable.logs import InstanceLogs
from launcher.durable.persist import Persister
from launcher.durable.records import record_json, spec_json, storage_ids
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError, VirtualizerError
from launcher.plugin.protocol import MonitorEvent, Virtualizer, VmStats, start_path_of
from launcher.plugin.spec import InstanceSpec

log = logging.getLogger("launcher.core.actor")
T = TypeVar("T")


@attrs.define(eq=False)
class ActorContext:
    """What every actor shares: configuration, the journal, the log writer and the supervisor's hooks."""

    config: Config
    journal: EventJournal
    logs: InstanceLogs
    persister: Persister
    on_gone: Callable[[ActorBase], None]  # the instance is deleted; drop it from the table
    # A volume the supervisor reserved for the instance is not the instance's (any more): an ATTACH failed, or a
    # DETACH was carried out.
    release_volume: Callable[[ActorBase, str], None]
    recovery: RecoveryPlan  # this start-up's host-reboot policy and boot slots
    monitors: trio.Nursery | None = None  # where monitor sessions run; set by the supervisor
    metrics: Metrics = attrs.Factory(Metrics)  # the START steps' durations are observed there


@attrs.define(eq=False)
class _Record:
    """What the actor knows of its instance.json (launcher/durable/records.py)."""

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


class ActorBase:
    """The state of one instance's actor and the primitives its handlers share (see the module docstring)."""

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
        """An actor for `spec` on virtualizer `vm`, not yet running (`run`). A new instance (START) has the
        defaults; a recovered one comes with its record's `created`, `goal` and `volumes` (None: the START's)
        and `recovered=True`."""
        self.ctx = ctx
        self.vm = vm
        self.spec = spec
        self.uuid = spec.instance_uuid
        self.dir: Path = ctx.config.instances_dir / self.uuid
        self.state = State.PENDING
        self.stats = VmStats()
        # The instance's volumes, in disk order (launcher/durable/records.py); None: the START's.
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
        """The state the outside world sees (`lifecycle.PUBLIC_STATE`): pending, running, exited or deleted."""
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

    # ----------------------------------------------------------------- boot slots and the monitor session

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

    def _open_monitor(self, recover: bool) -> None:
        assert self.ctx.monitors is not None
        self._session.number += 1
        self._session.scope = trio.CancelScope()
        self.ctx.monitors.start_soon(self._monitor, self._session.scope, self._session.number, recover)

    async def _monitor(self, scope: trio.CancelScope, session: int, recover: bool) -> None:
        inbox = SessionInbox(self._send, session)
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
        self._emit_state(start_path=self.start_path)

    @property
    def start_path(self) -> str:
        """How the VM that runs now (or ran last) was started: cold, pool or template (`start_path_of`)."""
        return start_path_of(self.vm)

    def _on_down(self) -> None:
        """The VM is down (a monitor said so): the instance is exited. The caller reports it at once."""
        self._close_monitor()
        self.vm.lost_vm()
        self.state = State.EXITED
        self.stats = VmStats()

    async def _poll_stats(self) -> None:
        try:
            self.stats = await self._call("stats", errors.INTERNAL, self.ctx.config.timeouts.stats_s,
                                          self.vm.stats, quiet=True)
        except VirtualizerError as exc:
            self._log(f"stats failed: {exc.reason}")
            self.stats = VmStats()

    # ----------------------------------------------------------------- power off

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

    def _gone(self, reason: str) -> None:
        self.state = State.DELETED
        self._emit_state(reason=reason)
        self.ctx.on_gone(self)

    # ----------------------------------------------------------------- helpers

    def _refused(self, verb: Verb, ticket: Ticket, failure_event: str, **extra: str) -> bool:
        """Judge a command against the state the instance is in now (the table in launcher/core/lifecycle.py, which
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
        await self.ctx.persister.create(self.dir / datadir.INSTANCE_FILE, record, on_durable=on_durable)

    async def _set_goal(self, goal: str) -> None:
        """Write instance.json with `goal` (and `created`, `volumes`); durable when this returns. Raises OSError."""
        encoded = self._record.spec_json or spec_json(self.spec)
        record = record_json(encoded, self._record.created, goal, self.volumes)
        await self.ctx.persister.write(self.dir / datadir.INSTANCE_FILE, record)
        self._record.spec_json = None  # not needed again: keep idle instances small
        self._record.goal = goal

    async def _commit_goal(self, goal: str, ticket: Ticket, failure_event: str, code: str, **extra: str) -> bool:
        """`_set_goal` before a command is acknowledged: if the write fails, the command fails (`code`, or
        storage_full) and False is returned."""
        try:
            await self._set_goal(goal)
        except OSError as exc:
            self._fail(ticket, failure_event, errors.write_failure(exc, datadir.INSTANCE_FILE, code), **extra)
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



def _ms(started: float) -> str:
    return f"{(trio.current_time() - started) * 1000:.1f} ms"
