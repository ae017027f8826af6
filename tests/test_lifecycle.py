"""The command × state table (launcher/core/lifecycle.py): docs/api.md shows it, and every cell is what a launcher
does, judged by the supervisor at once and by the actor when the command's turn comes."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Node, running_node, start_command

from launcher.core import lifecycle
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
from launcher.core.lifecycle import RULES, Change, Create, Follow, Outcome, Refuse, Run, State, Status, Verb
from launcher.core.messages import Ticket
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.spec import StorageEntry

ROOT = Path(__file__).resolve().parent.parent
U = "0a1b2c3d-0009"
V = "0c0c-0009"  # a volume: attached by ATTACH, and before DETACH


def slow(status: Status) -> dict[str, float]:
    """Simulation settings that leave time to act while an instance is pending (booting) or being deleted (its
    VM shutting down)."""
    return {"boot_delay_s": 0.3, "stop_delay_s": 1.0 if status is Status.DELETING else 0.0}


def command_for(verb: Verb) -> Command:
    return {
        Verb.START_SAME: start_command(U),
        Verb.START_OTHER: start_command(U, vcpus=3),
        Verb.STOP: StopCommand(U),
        Verb.RESTART: RestartCommand(U),
        Verb.DELETE: DeleteCommand(U),
        Verb.ATTACH: AttachVolumeCommand(U, V),
        Verb.DETACH: DetachVolumeCommand(U, V),
    }[verb]


async def into(node: Node, status: Status, verb: Verb) -> None:
    """Bring instance U into `status` (GONE: there is none), with volume V made for ATTACH and DETACH, and
    attached to U (by its START) for DETACH."""
    if verb in (Verb.ATTACH, Verb.DETACH):
        volumes = node.supervisor.backends["simulation"].volumes  # type: ignore[attr-defined]
        await volumes.create(V, 64, "qcow2")
    if status is Status.GONE:
        return
    storage = ({"storage": (StorageEntry(V),)} if verb is Verb.DETACH else {})
    ticket = node.start(U, **storage)
    if status is Status.PENDING:
        await node.wait_state(U, "pending")
        return
    assert (await node.done(ticket)).state == "running"
    if status is Status.EXITED:
        assert (await node.done(node.dispatch(StopCommand(U)))).state == "exited"
    elif status is Status.DELETING:
        delete = node.dispatch(DeleteCommand(U, stop=True))  # its VM takes stop_delay_s to shut down
        await delete.accepted.wait()
        assert not delete.done.is_set()


async def check(node: Node, ticket: Ticket, outcome: Outcome, command: Command) -> None:
    """`ticket` (of a command that was not refused at once) ends as `outcome` says."""
    await node.done(ticket)
    if isinstance(outcome, Refuse):
        assert ticket.error is not None and ticket.error.code == outcome.code
        return
    assert ticket.error is None
    if isinstance(outcome, Run):
        assert ticket.state == outcome.target.value and node.state(U) == outcome.target.value
    elif isinstance(outcome, Change):  # ATTACH or DETACH of V, carried out in the state the instance was in
        assert ticket.state == node.state(U)
        attached = V in node.supervisor.actors[U].volumes
        assert attached == isinstance(command, AttachVolumeCommand)
        assert node.supervisor.volume_users.get(V) == (U if attached else None)
    elif isinstance(outcome, Follow):
        assert ticket.state == node.state(U) and ticket.state in ("running", "exited")
    else:
        assert isinstance(outcome, Create)
        assert ticket.state == "running"
    assert len(node.supervisor.actors) == (0 if node.state(U) == "deleted" else 1)


# ----------------------------------------------------------------- the table itself


# The table written out by hand, so that a changed cell fails a test that does not read `RULES` (the cell tests
# below drive each cell as `RULES` says, and docs/api.md's table is generated from it): columns pending, running,
# exited, being deleted, gone; "follow", "create", "→<state>", "same" (state unchanged) or the refusal's code.
EXPECTED = {
    Verb.START_SAME: ("follow", "follow", "follow", "instance_exists", "create"),
    Verb.START_OTHER: ("already_running", "already_running", "instance_exists", "instance_exists", "create"),
    Verb.STOP: ("→exited", "→exited", "already_stopped", "no_instance", "no_instance"),
    Verb.RESTART: ("already_running", "already_running", "→running", "no_instance", "no_instance"),
    Verb.DELETE: ("→deleted", "→deleted", "→deleted", "no_instance", "no_instance"),
    Verb.ATTACH: ("same", "same", "same", "no_instance", "no_instance"),
    Verb.DETACH: ("same", "same", "same", "no_instance", "no_instance"),
}


def _short(outcome: Outcome) -> str:
    if isinstance(outcome, Refuse):
        return outcome.code
    if isinstance(outcome, Run):
        return f"→{outcome.target.value}"
    return {Change: "same", Follow: "follow", Create: "create"}[type(outcome)]


def test_the_table_is_the_one_written_down() -> None:
    assert {cell: _short(outcome) for cell, outcome in RULES.items()} == \
        {(verb, status): EXPECTED[verb][column] for verb in Verb for column, status in enumerate(Status)}


def test_the_table_has_every_cell() -> None:
    assert set(RULES) == {(verb, status) for verb in Verb for status in Status}
    assert {Status.of(state) for state in State} | {Status.of(None)} == set(Status)


def test_the_api_page_shows_the_table() -> None:
    """docs/api.md's "Command rules" table is `markdown_table()`'s output (`python -m launcher.core.lifecycle`)."""
    page = (ROOT / "docs" / "api.md").read_text()
    assert lifecycle.markdown_table() in page, "run `python -m launcher.core.lifecycle` and paste it into docs/api.md"
    assert page.count("| command \\ state |") == 1


# ----------------------------------------------------------------- every cell, through the supervisor


@pytest.mark.parametrize(("verb", "status"), list(RULES), ids=lambda v: v.name)
async def test_every_cell_through_the_supervisor(tmp_path: Path, verb: Verb, status: Status) -> None:
    outcome = RULES[verb, status]
    async with running_node(tmp_path, slow(status)) as node:
        await into(node, status, verb)
        command = command_for(verb)
        if isinstance(outcome, Refuse):
            with pytest.raises(LauncherError) as info:
                node.dispatch(command)
            assert info.value.code == outcome.code and info.value.reason == outcome.reason
            return
        await check(node, node.dispatch(command), outcome, command)


# ----------------------------------------------------------------- the actor's own judgement


@pytest.mark.parametrize("status", [Status.PENDING, Status.RUNNING, Status.EXITED], ids=lambda s: s.name)
@pytest.mark.parametrize("verb", [Verb.STOP, Verb.RESTART, Verb.DELETE, Verb.ATTACH, Verb.DETACH],
                         ids=lambda v: v.name)
async def test_every_cell_the_actor_sees(tmp_path: Path, verb: Verb, status: Status) -> None:
    """A command posted past the supervisor's judgement is judged by the actor, by the same table, against its real
    state. ATTACH and DETACH still take the supervisor's volume reservation (`_dispatch_volume`), so the
    reservation `check` asserts is the supervisor's and the actor's work, not the test's."""
    async with running_node(tmp_path, slow(status)) as node:
        await into(node, status, verb)
        command = command_for(verb)
        assert not isinstance(command, StartCommand | EvacuateCommand | RestoreCommand)  # for the type checker
        actor = node.supervisor.actors[U]
        if isinstance(command, AttachVolumeCommand | DetachVolumeCommand):
            ticket = node.supervisor._dispatch_volume(actor, command)
        else:
            ticket = Ticket(U)
            actor.post(command, ticket)
        await check(node, ticket, RULES[verb, status], command)


async def test_a_stop_queued_behind_a_failing_start_is_judged_again(tmp_path: Path) -> None:
    """Accepted against the projected state (running), refused against the real one (exited by launch_failure)."""
    async with running_node(tmp_path, {"failures": [{"phase": "start"}]}) as node:
        start = node.start(U)
        stop = node.dispatch(StopCommand(U))
        await node.done(start)
        assert start.error is not None and start.error.code == errors.LAUNCH_FAILURE
        await check(node, stop, RULES[Verb.STOP, Status.EXITED], StopCommand(U))
        assert stop.error is not None and stop.error.reason == "instance is exited"
