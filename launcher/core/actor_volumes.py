"""ATTACH and DETACH: one volume more or less for the instance, in its record and in its VM; part of
`InstanceActor` (see `actor_base`)."""

from __future__ import annotations

from launcher.core.actor_base import ActorBase
from launcher.core.commands import AttachVolumeCommand, DetachVolumeCommand
from launcher.core.lifecycle import Verb
from launcher.core.messages import Ticket
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError, VirtualizerError
from launcher.plugin.volumes import MAX_VOLUMES


class VolumeChanges(ActorBase):
    """The ATTACH and DETACH handlers."""

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

