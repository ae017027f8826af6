"""`InstanceActor`: one Trio task per instance, the only caller of that instance's virtualizer.

The actor reads one inbox (`launcher.core.messages`) that carries `Request`s put there by the supervisor (START,
STOP, RESTART, DELETE, ATTACH, DETACH, each with a `Ticket` the caller can wait on), `MonitorNote`s posted by its
monitor session (CONNECTED / CLOSED) and the stats poller's turns. It handles them one at a time, so virtualizer
calls never overlap and the virtualizer needs no lock (docs/concurrency.md). Every virtualizer call is bounded by
a configured timeout; an overrun or an exception becomes the phase's ciao code, never a crash of the launcher.

One class, one module per concern, all running in the actor's task:
- `actor_base`: the state, what the supervisor may call (synchronously, never blocking), and the primitives the
  handlers share (bounded calls, record writes, the monitor session, power-off, reports);
- `actor_start`: START and RESTART, and the boot; `actor_stop`: STOP and DELETE; `actor_volumes`: ATTACH and
  DETACH;
- this module: the task's loop, the monitor's reports, the boot deadline, recovery at start-up.

States (docs/architecture.md §6): pending → running → exited → deleted, with internal stopping / deleting. The
monitor session runs in its own cancel scope, which only the actor cancels, in the supervisor's monitor nursery
(one nursery per actor would triple the cost of cancelling 10 000 of them at shutdown); each session has a
number, and notes from an older session are ignored, so a late CLOSED from a monitor that was already ended
cannot confuse a newer boot.

The actor also owns its instance directory: it creates it (instance.json durable before the START is
acknowledged), and removes it only after the VM is really down. instance.json also holds the instance's goal
(`launcher.durable.records`), written before a STOP, RESTART or DELETE is acknowledged, so that a launcher
restarted after `kill -9` carries on every acknowledged command (`_recover`), and the instance's volumes
(`volumes`: the START's, less those detached, plus those attached since), which the supervisor reserves for the
instance at dispatch (`ActorContext.release_volume` gives one back).
"""

from __future__ import annotations

import math

import trio

from launcher.core.actor_base import log
from launcher.core.actor_start import Starting
from launcher.core.actor_stop import Stopping
from launcher.core.actor_volumes import VolumeChanges
from launcher.core.commands import (
    AttachVolumeCommand,
    DeleteCommand,
    DetachVolumeCommand,
    RestartCommand,
    StartCommand,
    StopCommand,
)
from launcher.core.lifecycle import State
from launcher.core.messages import POLL_STATS, ActorCommand, Message, MonitorNote, Request, Ticket
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError, VirtualizerError
from launcher.plugin.protocol import MonitorEvent


class InstanceActor(Starting, Stopping, VolumeChanges):
    """One instance's actor: its task (`run`) reads the inbox and hands each message to its handler."""

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
        """The recovery probe's answer, against the record's goal (the table in docs/operations.md, "After a
        restart")."""
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


_ACTIVITY = {AttachVolumeCommand: "ATTACH", DetachVolumeCommand: "DETACH"}
