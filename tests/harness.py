"""An in-process launcher (the real core of `launcher serve`, without HTTP) for tests of the control path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from launcher.core import config as config_module
from launcher.core.commands import RESOURCE_FIELDS, Command, StartCommand
from launcher.core.config import Config
from launcher.core.messages import Ticket
from launcher.core.running import running_core
from launcher.core.supervisor import Supervisor
from launcher.durable.events import EventJournal
from launcher.durable.logs import InstanceLogs
from launcher.plugin.spec import InstanceSpec


@attrs.define
class Node:
    config: Config
    supervisor: Supervisor
    journal: EventJournal
    logs: InstanceLogs

    def dispatch(self, command: Command) -> Ticket:
        return self.supervisor.dispatch(command)

    def start(self, uuid: str, **fields: Any) -> Ticket:
        return self.dispatch(start_command(uuid, **fields))

    async def done(self, ticket: Ticket, timeout: float = 10.0) -> Ticket:
        with trio.fail_after(timeout):
            await ticket.done.wait()
        return ticket

    def state(self, uuid: str) -> str:
        actor = self.supervisor.actors.get(uuid)
        return "deleted" if actor is None else actor.public_state

    async def wait_state(self, uuid: str, state: str, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while self.state(uuid) != state:
                await trio.sleep(0.01)

    async def events(self, **match: Any) -> list[dict[str, Any]]:
        """Durable events whose fields equal `match`."""
        await self.journal.wait_durable(self.journal.last_seq)
        found = []
        async for event in self.journal.events_since(0):
            if all(event.get(k) == v for k, v in match.items()):
                found.append(event)
        return found


def spec(uuid: str, **fields: Any) -> InstanceSpec:
    fields.setdefault("image_uuid", "test-image")
    return InstanceSpec(instance_uuid=uuid, **fields)


@asynccontextmanager
async def running_node(data_dir: Path, simulation: dict[str, Any] | None = None,
                       **settings: Any) -> AsyncIterator[Node]:
    """A launcher without its HTTP API, with the simulation virtualizer (memory mode unless told)."""
    settings.setdefault("virtualizer", "simulation")
    config = config_module.load(None, data_dir=data_dir, simulation=simulation or {}, **settings)
    async with running_core(config) as core:
        yield Node(config, core.supervisor, core.journal, core.logs)


def start_command(uuid: str, **fields: Any) -> StartCommand:
    """A START as the parser makes it: the resources not in `fields` are left to the node's defaults."""
    return StartCommand(spec(uuid, **fields), frozenset(RESOURCE_FIELDS) - fields.keys())
