"""START and RESTART: the instance's record, its image phases (which a DELETE may interrupt), then the boot,
which the monitor's CONNECTED ends (`launcher.core.actor`); part of `InstanceActor` (see `actor_base`)."""

from __future__ import annotations

import trio

from launcher.core.actor_base import ActorBase, log
from launcher.core.lifecycle import State, Verb
from launcher.core.messages import Ticket
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError, VirtualizerError


class Interrupted(Exception):
    """The START pipeline was cancelled by a DELETE before the VM was started."""


class Starting(ActorBase):
    """The START and RESTART handlers, and the boot they share with recovery."""

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
                raise Interrupted
        except Interrupted:
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
        except OSError as error:  # a full disk: what is on disk stays (docs/operations.md, "What is not covered")
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

