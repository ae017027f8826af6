"""The ``qemu-img`` commands of the QEMU virtualizer, each run by `launcher.plugin.tools.run_tool` under a bound.

- `create_overlay`: an instance's ``overlay.qcow2``, a qcow2 child of its backing image whose backing file and
  backing format are explicit (never probed: a raw image could otherwise pass for another format);
- `info`: what an image file is (``qemu-img info --output=json``), for the image store's checks of an import;
- `convert`: a full copy of an image into an existing volume, converted to the volume's format.

Each raises `launcher.plugin.tools.ToolError` (the tool's exit status and stderr, or its timeout); the caller
says what it was doing and which error code that is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.plugin.tools import ToolError, run_tool

QEMU_IMG = "qemu-img"
QEMU_IMG_TIMEOUT_S = 60.0  # bound on `create_overlay` and `info` (a copy's is qemu.volumes.copy_timeout_s)


async def create_overlay(path: Path, backing: Path, backing_format: str, size: int) -> None:
    """Create the qcow2 file `path`, `size` bytes as the guest sees it, on `backing` (of `backing_format`)."""
    await run_tool([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(backing.absolute()), "-F", backing_format,
                    str(path), str(size)], timeout_s=QEMU_IMG_TIMEOUT_S)


async def info(path: Path) -> dict[str, Any]:
    """What qemu-img says of the image file `path` (its JSON: format, virtual-size, backing-filename, ...)."""
    done = await run_tool([QEMU_IMG, "info", "--output=json", str(path)], timeout_s=QEMU_IMG_TIMEOUT_S)
    try:
        found = json.loads(done.stdout)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ToolError(f"{QEMU_IMG} info did not print a JSON object", tool=QEMU_IMG)
    return found


async def convert(source: Path, source_format: str, target: str, target_format: str, *, timeout_s: float) -> None:
    """Copy the image `source` into the existing file `target` (``-n``: not created), converting it."""
    await run_tool([QEMU_IMG, "convert", "-q", "-n", "-t", "writeback", "-f", source_format, "-O", target_format,
                    str(source.absolute()), target], timeout_s=timeout_s)
