"""The open-file limit of `launcher serve`: raised to its hard limit at start, and how much of it connections get.

Every HTTP connection is a file descriptor. Distributions start services with a soft limit of 1024 but a much
higher hard limit (systemd: 524288), which a process may raise itself to without privileges. The launcher
keeps `RESERVED_FDS` for its own files (the event journal, instance logs, libvirt, worker threads' files)."""

from __future__ import annotations

import resource

RESERVED_FDS = 256
UNLIMITED_TARGET = 1 << 20  # the soft limit asked for when the hard limit is unlimited (Linux's nr_open default)


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft  # e.g. above the kernel's nr_open: keep what we have
        return target
    return soft if soft != resource.RLIM_INFINITY else UNLIMITED_TARGET


def connection_budget(configured: int, open_file_limit: int) -> int:
    """How many connections may be open at once: `configured`, unless the open-file limit allows fewer."""
    return max(1, min(configured, open_file_limit - RESERVED_FDS))
