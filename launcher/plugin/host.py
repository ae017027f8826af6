"""What the launcher lends a virtualizer backend (part of the plugin API, `launcher.plugin`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import trio


@attrs.frozen
class BackendHost:
    """What the launcher lends a backend: where its data lives and how it reports.

    `emit(type, **fields)` appends an event to the launcher's journal (e.g. `image_progress`);
    `log(instance_dir, message)` appends a line to that instance's launcher.log. Both are synchronous and
    must be called from the Trio thread. `limiter` bounds the worker threads of blocking work.
    `instance_dir(uuid)` is where the launcher keeps that instance (it may not exist)."""

    data_dir: Path
    limiter: trio.CapacityLimiter
    emit: Callable[..., object]
    log: Callable[[Path, str], None]

    def instance_dir(self, instance_uuid: str) -> Path:
        return self.data_dir / "instances" / instance_uuid
