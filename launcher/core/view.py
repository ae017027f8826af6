"""`InstanceView`: what the transport may read of one instance, through the supervisor (`Supervisor.instance`,
`Supervisor.instances`). An `InstanceActor` is one; the transport never sees more of it: no command, no change,
only the values of the moment, read in the Trio thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from launcher.plugin.protocol import VmStats
from launcher.plugin.spec import InstanceSpec


class InstanceView(Protocol):
    """One instance, read-only."""

    @property
    def uuid(self) -> str:
        """The instance's uuid."""

    @property
    def spec(self) -> InstanceSpec:
        """What its START said, resources filled from the node's defaults."""

    @property
    def dir(self) -> Path:
        """Its instance dir (`<data_dir>/instances/<uuid>`), where its log is."""

    @property
    def public_state(self) -> str:
        """pending, running, exited or deleted (docs/api.md "Command rules")."""

    @property
    def activity(self) -> str | None:
        """The command being handled (START, STOP, ...), or None."""

    @property
    def queued(self) -> int:
        """How many commands wait in its inbox, the one being handled included."""

    @property
    def stats(self) -> VmStats:
        """Its VM's figures at the last stats poll (-1 for what the virtualizer cannot know)."""

    @property
    def volumes(self) -> tuple[str, ...]:
        """Its volumes, in disk order."""

    @property
    def start_path(self) -> str:
        """How its VM that runs now (or ran last) was started: cold, pool or template
        (`launcher.plugin.protocol.start_path_of`)."""
