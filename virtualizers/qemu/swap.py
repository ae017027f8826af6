"""Swap volumes: a raw volume of the store made Linux swap space with ``mkswap`` (a START's ``swap: true`` entry).

Only for volumes that are regular files (the own dir pool; an operator's dir, fs or netfs pool): `swap_content`
says None for anything else, and the store refuses it with volume_failure naming the pool. A volume whose first
page is blank (just made) is formatted; one that is swap space already (a START carried on) is left alone; any
other content is invalid_data, never overwritten (`VolumeStore.format_swap` decides; this module only looks and
runs the tool).
"""

from __future__ import annotations

import os
import shutil
import stat

from launcher.plugin.tools import run_tool

SWAP_PAGE = 4096  # mkswap's signature ends the first page (x86-64's page size)
SWAP_SIGNATURE = b"SWAPSPACE2"
MKSWAP_TIMEOUT_S = 60.0
MKSWAP_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"  # where Debian keeps it (root's PATH, not every user's)


def swap_content(path: str) -> str | None:
    """What the first page of the file at `path` holds: "swap" (mkswap's signature), "blank" (zeros) or "other";
    None if `path` is not a regular file. Blocks."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as file:
            page = file.read(SWAP_PAGE)
    except OSError:
        return None
    if page[SWAP_PAGE - len(SWAP_SIGNATURE):] == SWAP_SIGNATURE:
        return "swap"
    return "blank" if not page.strip(b"\0") else "other"


async def mkswap(path: str) -> None:
    """Make the file at `path` swap space (``mkswap -q``); ToolError (launcher.plugin.tools) if that fails."""
    await run_tool([shutil.which("mkswap", path=MKSWAP_PATH) or "mkswap", "-q", path], timeout_s=MKSWAP_TIMEOUT_S)
