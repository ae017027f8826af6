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
    `observe_step(step, seconds)` reports how long a part of a START took (the qemu virtualizer's `overlay`,
    `seed`, `define`, `start`), for `/metrics`' `launcher_virtualizer_step_duration_seconds`; a backend names
    its steps from a small fixed set. `instance_dir(uuid)` is where the launcher keeps that instance (it may
    not exist)."""

    data_dir: Path
    limiter: trio.CapacityLimiter
    emit: Callable[..., object]
    log: Callable[[Path, str], None]
    observe_step: Callable[[str, float], None] = lambda step, seconds: None

    def instance_dir(self, instance_uuid: str) -> Path:
        """Where the launcher keeps instance `instance_uuid` (``<data_dir>/instances/<uuid>``); it may not
        exist. No I/O."""
        return self.data_dir / "instances" / instance_uuid
