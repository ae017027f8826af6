"""STOP and DELETE: the VM goes down first, and only then is anything removed; part of `InstanceActor` (see
`actor_base`)."""

from __future__ import annotations

from launcher.core.actor_base import ActorBase
from launcher.core.commands import DeleteCommand, StopCommand
from launcher.core.lifecycle import State, Verb
from launcher.core.messages import Ticket
from launcher.plugin import errors
from launcher.plugin.errors import VirtualizerError


class Stopping(ActorBase):
    """The STOP and DELETE handlers."""

    async def _stop(self, command: StopCommand, ticket: Ticket) -> None:
        """STOP: the goal `exited` is durable before it is acknowledged, then the VM is powered off (ACPI, then
        forced after the grace); the instance is `exited` once the VM is down."""
        if self._refused(Verb.STOP, ticket, "stop_failure"):
            return
        grace = self.ctx.config.timeouts.stop_grace_s if command.grace_s is None else command.grace_s
        goal = self._record.goal
        if not await self._commit_goal("exited", ticket, "stop_failure", errors.STOP_FAILURE):
            return
        self._log(f"STOP accepted (grace {grace:g} s)")
        ticket.accept()
        previous, self.state = self.state, State.STOPPING
        if not await self._power_off_or_undo(grace, ticket, "stop_failure", state=previous, goal=goal):
            return
        self.state = State.EXITED
        self._abandon_boot("stopped before it was running")
        ticket.finish("exited")
        self._emit_state(reason="stopped")

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
            if not await self._power_off_or_undo(grace, ticket, "delete_failure", state=previous, goal=goal):
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

    async def _power_off_or_undo(self, grace: float, ticket: Ticket, failure_event: str, *, state: State,
                                 goal: str) -> bool:
        """Power the VM off for a STOP or DELETE whose new goal is already durable. If the VM may still be up,
        undo: the instance is in `state` again, its record says `goal` again (a failed write is logged), the
        command fails with `failure_event`, and False is returned."""
        try:
            await self._power_off(grace)
        except VirtualizerError as exc:
            self.state = state
            await self._set_goal_quietly(goal)
            self._fail(ticket, failure_event, exc)
            return False
        return True
