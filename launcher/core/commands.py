"""The commands the core carries out: what each ciao command document says, once the parser
(`launcher.transport.payloads`) has validated it. The core depends on these classes, never on the parser.

`COMMAND_KEYS` are ciao's names of the commands (a document's single top-level key, and the `command` label of
the launcher's metrics); `COMMAND_NAMES` gives the name of each class.
"""

from __future__ import annotations

from typing import Any

import attrs

from launcher.plugin.spec import InstanceSpec

RESOURCE_FIELDS = ("vcpus", "mem_mb", "disk_mb")


@attrs.frozen
class StartCommand:
    """A parsed START. `spec` holds what the payload said; the resources it did not name are listed in
    `unnamed` and hold the class defaults until `with_defaults` applies the node's."""

    spec: InstanceSpec
    unnamed: frozenset[str] = frozenset()

    def with_defaults(self, *, vcpus: int, mem_mb: int, disk_mb: int) -> InstanceSpec:
        """The spec to run: each resource the START did not name takes the node's default given here."""
        defaults = {"vcpus": vcpus, "mem_mb": mem_mb, "disk_mb": disk_mb}
        values: dict[str, Any] = {name: defaults[name] for name in self.unnamed}
        return attrs.evolve(self.spec, **values)


@attrs.frozen
class StopCommand:
    """ciao's STOP: power the instance's VM off (ACPI first, forced after the grace); the instance stays."""

    instance_uuid: str
    grace_s: float | None = None  # seconds before a forced power-off; None: the configured default


@attrs.frozen
class RestartCommand:
    """ciao's RESTART: boot an exited instance again from its saved spec."""

    instance_uuid: str


@attrs.frozen
class DeleteCommand:
    """ciao's DELETE: the VM down (gracefully first with `stop`), then everything of the instance removed."""

    instance_uuid: str
    stop: bool = False  # ciao HEAD: the instance is stopped for good (e.g. migrated), not discarded
    grace_s: float | None = None


@attrs.frozen
class AttachVolumeCommand:
    """ciao's AttachVolume: give the instance the volume as one more disk (hot-plugged if its VM runs)."""

    instance_uuid: str
    volume_uuid: str


@attrs.frozen
class DetachVolumeCommand:
    """ciao's DetachVolume: take the volume from the instance (hot-unplugged if its VM runs)."""

    instance_uuid: str
    volume_uuid: str


@attrs.frozen
class EvacuateCommand:
    """ciao's EVACUATE: the node enters maintenance and every instance is stopped."""


@attrs.frozen
class RestoreCommand:
    """ciao's RESTORE: the node leaves maintenance."""


Command = (StartCommand | StopCommand | RestartCommand | DeleteCommand | AttachVolumeCommand | DetachVolumeCommand
           | EvacuateCommand | RestoreCommand)

COMMAND_KEYS = ("start", "stop", "restart", "delete", "attach_volume", "detach_volume", "evacuate", "restore")
COMMAND_NAMES: dict[type, str] = {
    StartCommand: "start", StopCommand: "stop", RestartCommand: "restart", DeleteCommand: "delete",
    AttachVolumeCommand: "attach_volume", DetachVolumeCommand: "detach_volume",
    EvacuateCommand: "evacuate", RestoreCommand: "restore",
}
