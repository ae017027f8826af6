"""An instance's states, and the one table of what each command does in each of them.

`RULES[verb, status]` is the outcome of a command on an instance in that status: data, read in two places.
`Supervisor.dispatch` reads it synchronously, against the state the instance *will* be in once its queued
commands have run (`InstanceActor.projected`, docs/concurrency.md step 7), and refuses at once what the table
refuses. The actor's handlers (`InstanceActor._stop`, `_restart`, `_delete`, `_change_volume`) read it again when
the command's turn comes, against the state the instance is in then: a VM may have exited, or a START failed,
meanwhile.

docs/api.md's "Command rules" table is `markdown_table()`'s output (tests/test_lifecycle.py keeps the two equal;
`python -m launcher.core.lifecycle` prints it), and tests/test_lifecycle.py drives every cell of `RULES`.
"""

from __future__ import annotations

import enum

import attrs

from launcher.plugin import errors


class State(enum.Enum):
    """An instance's state, as its actor keeps it (docs/architecture.md §6)."""

    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"  # internal: a stop_vm call is under way
    EXITED = "exited"
    DELETING = "deleting"  # internal: DELETE is under way
    DELETED = "deleted"


# What the outside world sees: the internal states are shown as the state they leave.
PUBLIC_STATE = {
    State.PENDING: "pending",
    State.RUNNING: "running",
    State.STOPPING: "running",
    State.EXITED: "exited",
    State.DELETING: "exited",
    State.DELETED: "deleted",
}


class Verb(enum.Enum):
    """The table's rows: a command, and for START whether its payload is the one the instance has."""

    START_SAME = "START, same payload"
    START_OTHER = "START, other payload"
    STOP = "STOP"
    RESTART = "RESTART"
    DELETE = "DELETE"
    ATTACH = "ATTACH"  # attach_volume
    DETACH = "DETACH"  # detach_volume


class Status(enum.Enum):
    """The table's columns: what a command is judged against."""

    PENDING = "pending"
    RUNNING = "running"
    EXITED = "exited"
    DELETING = "being deleted"  # a DELETE is queued or under way
    GONE = "gone"  # no instance has this uuid

    @classmethod
    def of(cls, state: State | None) -> Status:
        """The column for an instance in `state` (None: no such instance)."""
        return cls.GONE if state is None else _STATUS_OF[state]


_STATUS_OF = {
    State.PENDING: Status.PENDING,
    State.RUNNING: Status.RUNNING,
    State.EXITED: Status.EXITED,
    State.DELETED: Status.DELETING,  # projected: a DELETE is queued; the actor is about to leave the table
    # The internal states: no handler ever sees them (the actor handles one command at a time) and no projected
    # state is one of them; judged as "being deleted" (STOP and RESTART refused, as their handlers always were).
    State.STOPPING: Status.DELETING,
    State.DELETING: Status.DELETING,
}


@attrs.frozen
class Refuse:
    """The command is refused with a ciao code; `reason` is what the synchronous refusal says."""

    code: str
    reason: str


@attrs.frozen
class Run:
    """The command is queued (the supervisor) or carried out (the actor); the instance is then in `target`."""

    target: State
    note: str = ""  # for docs/api.md


@attrs.frozen
class Change:
    """The command is queued (the supervisor) or carried out (the actor) without changing the instance's state."""

    note: str = ""  # for docs/api.md


@attrs.frozen
class Follow:
    """A repeated START: nothing is queued; the caller is answered with the instance once it settles."""


@attrs.frozen
class Create:
    """A new instance (admission decides whether there is room for it)."""


Outcome = Refuse | Run | Change | Follow | Create

_NO_INSTANCE = Refuse(errors.NO_INSTANCE, "no such instance")
_BEING_DELETED = Refuse(errors.INSTANCE_EXISTS, "the instance is being deleted")
_RUNNING = Refuse(errors.ALREADY_RUNNING, "instance is running or starting")
_OTHER = "an instance with this uuid exists with a different payload"

_P, _R, _E, _D, _G = Status.PENDING, Status.RUNNING, Status.EXITED, Status.DELETING, Status.GONE

RULES: dict[tuple[Verb, Status], Outcome] = {
    (Verb.START_SAME, _P): Follow(),
    (Verb.START_SAME, _R): Follow(),
    (Verb.START_SAME, _E): Follow(),
    (Verb.START_SAME, _D): _BEING_DELETED,
    (Verb.START_SAME, _G): Create(),
    (Verb.START_OTHER, _P): Refuse(errors.ALREADY_RUNNING, _OTHER),
    (Verb.START_OTHER, _R): Refuse(errors.ALREADY_RUNNING, _OTHER),
    (Verb.START_OTHER, _E): Refuse(errors.INSTANCE_EXISTS, _OTHER),
    (Verb.START_OTHER, _D): _BEING_DELETED,
    (Verb.START_OTHER, _G): Create(),
    (Verb.STOP, _P): Run(State.EXITED, "the START answers `exited`"),
    (Verb.STOP, _R): Run(State.EXITED),
    (Verb.STOP, _E): Refuse(errors.ALREADY_STOPPED, "instance is not running"),
    (Verb.STOP, _D): _NO_INSTANCE,
    (Verb.STOP, _G): _NO_INSTANCE,
    (Verb.RESTART, _P): _RUNNING,
    (Verb.RESTART, _R): _RUNNING,
    (Verb.RESTART, _E): Run(State.RUNNING),
    (Verb.RESTART, _D): _NO_INSTANCE,
    (Verb.RESTART, _G): _NO_INSTANCE,
    (Verb.DELETE, _P): Run(State.DELETED, "it cancels a START still preparing the image"),
    (Verb.DELETE, _R): Run(State.DELETED),
    (Verb.DELETE, _E): Run(State.DELETED),
    (Verb.DELETE, _D): _NO_INSTANCE,
    (Verb.DELETE, _G): _NO_INSTANCE,
    (Verb.ATTACH, _P): Change("hot-plugged once the START has started the VM"),
    (Verb.ATTACH, _R): Change("hot-plugged"),
    (Verb.ATTACH, _E): Change("a disk from the next boot"),
    (Verb.ATTACH, _D): _NO_INSTANCE,
    (Verb.ATTACH, _G): _NO_INSTANCE,
    (Verb.DETACH, _P): Change("hot-unplugged once the START has started the VM"),
    (Verb.DETACH, _R): Change("hot-unplugged once the guest lets go"),
    (Verb.DETACH, _E): Change("gone from the next boot"),
    (Verb.DETACH, _D): _NO_INSTANCE,
    (Verb.DETACH, _G): _NO_INSTANCE,
}


def judge(verb: Verb, state: State | None) -> Outcome:
    """What `verb` does to an instance in `state` (None: no instance has its uuid)."""
    return RULES[verb, Status.of(state)]


def _cell(outcome: Outcome) -> str:
    if isinstance(outcome, Refuse):
        return f"`{outcome.code}`"
    if isinstance(outcome, Run):
        return f"→ {outcome.target.value}" + (f" ({outcome.note})" if outcome.note else "")
    if isinstance(outcome, Change):
        return f"state unchanged ({outcome.note})"
    if isinstance(outcome, Follow):
        return "answers with the instance (idempotent)"
    return "a new instance"


def markdown_table() -> str:
    """`RULES` as docs/api.md shows it."""
    lines = ["| command \\ state | " + " | ".join(s.value for s in Status) + " |",
             "|---" * (len(Status) + 1) + "|"]
    for verb in Verb:
        lines.append(f"| {verb.value} | " + " | ".join(_cell(RULES[verb, s]) for s in Status) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
