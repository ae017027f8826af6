"""The messages of an instance actor's inbox, and the `Ticket` a command's sender waits on.

One inbox per actor (`launcher.core.actor`) carries three kinds of message, handled one at a time:
- `Request`: a command (START, STOP, RESTART, DELETE, ATTACH, DETACH) the supervisor posted, with its `Ticket`;
- `MonitorNote`: what the actor's monitor session saw (CONNECTED / CLOSED), tagged with the session's number so
  that a note from an older session is ignored;
- `POLL_STATS`: the stats poller's turn (`launcher.core.stats`).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from launcher.core.commands import (
    AttachVolumeCommand,
    DeleteCommand,
    DetachVolumeCommand,
    RestartCommand,
    StartCommand,
    StopCommand,
)
from launcher.plugin.errors import LauncherError
from launcher.plugin.protocol import MonitorEvent


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
    on_done: Callable[[Ticket], None] | None = None  # called once, when done is set (launcher.core.metrics)

    def accept(self) -> None:
        """The command is taken on (durable where it must be): a caller that waits only for that may go."""
        self.accepted.set()

    def finish(self, state: str) -> None:
        """The command is done and left the instance in the public `state`."""
        self.state = state
        self.accepted.set()
        self._set_done()

    def fail(self, error: LauncherError) -> None:
        """The command failed or was refused with `error`."""
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
    """A command for the actor, and the ticket its sender waits on."""

    command: ActorCommand
    ticket: Ticket


class PollStats:
    """Inbox message from the stats poller: time to call vm.stats()."""


POLL_STATS = PollStats()


@attrs.frozen
class MonitorNote:
    """What monitor session number `session` reported."""

    session: int
    event: MonitorEvent


Message = Request | MonitorNote | PollStats


@attrs.frozen
class SessionInbox:
    """The inbox a monitor session sees: it tags each event with the session's number."""

    send_channel: trio.MemorySendChannel[Message]
    session: int

    async def send(self, event: MonitorEvent) -> None:
        """Post `event` to the actor (waits while its inbox is full)."""
        await self.send_channel.send(MonitorNote(self.session, event))

