"""Running an external tool under a bound (part of the plugin API, `launcher.plugin`).

`run_tool` is the one way a virtualizer runs a helper program (``qemu-img``, ``mkswap``, the simulation's
``simvm``, ...): from the Trio thread, stdin from /dev/null, stderr (and, unless told otherwise, stdout)
captured, the whole run bounded by `timeout_s`. Every way it can fail is one exception, `ToolError`, whose
message names the tool and says what happened: it could not be started (not installed, not executable), it
exited with a non-zero status or died of a signal (with the tail of its stderr), or it overran its bound. The
caller turns that into its own error (``image_failure``, ``volume_failure``, ...), adding what it was doing.

A tool that overruns its bound, or whose caller is cancelled, is killed at once (SIGKILL) and reaped before
`run_tool` returns or raises: no tool outlives the call that ran it. (A tool that forks and detaches a child on
purpose, as ``simvm`` does, leaves that child alone; it must not keep the captured pipes open.)
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

STDERR_TAIL = 500  # characters of a failed tool's stderr that its ToolError's message quotes (the end of it)


class ToolError(Exception):
    """`run_tool`'s one failure: ``str(exc)`` names the tool and says what went wrong.

    `tool` is the name the message uses; `returncode` the exit status (negative: the signal that killed it), None
    if it never ran or overran its bound (`timed_out`); `stderr` all it wrote there, decoded (the message quotes
    only its last `STDERR_TAIL` characters), so that a caller can look for a cause such as ENOSPC."""

    def __init__(self, message: str, *, tool: str, returncode: int | None = None, stderr: str = "",
                 timed_out: bool = False) -> None:
        """The error `message` about `tool`, with what is known of the run (see the class)."""
        super().__init__(message)
        self.tool = tool
        self.returncode = returncode
        self.stderr = stderr
        self.timed_out = timed_out


async def run_tool(argv: Sequence[str | os.PathLike[str]], *, timeout_s: float, name: str | None = None,
                   capture_stdout: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` to completion within `timeout_s` seconds; its CompletedProcess (exit status 0, the captured
    output as bytes) if it succeeded.

    `name` is what messages call the tool (default: the file name of ``argv[0]``). `capture_stdout=False` sends
    its stdout to /dev/null (for a tool whose detached child would otherwise hold the pipe open). Raises
    ToolError if it cannot be started, exits non-zero or is killed by a signal, or runs longer than `timeout_s`
    (it is then killed). Cancellation kills it too, and propagates. Call from the Trio thread."""
    tool = name or Path(os.fspath(argv[0])).name
    stdout: dict[str, Any] = {"capture_stdout": True} if capture_stdout else {"stdout": subprocess.DEVNULL}
    with trio.move_on_after(timeout_s) as bound:
        try:
            done = await trio.run_process(list(argv), stdin=subprocess.DEVNULL, capture_stderr=True, check=False,
                                          deliver_cancel=_kill, **stdout)
        except FileNotFoundError:
            raise ToolError(f"cannot run {tool}: {os.fspath(argv[0])} not found (is it installed?)",
                            tool=tool) from None
        except OSError as exc:
            raise ToolError(f"cannot run {tool}: {exc.strerror or exc}", tool=tool) from exc
    if bound.cancelled_caught:
        raise ToolError(f"{tool} took more than {timeout_s:g} s (killed)", tool=tool, timed_out=True)
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")
        raise ToolError(_failure(tool, done.returncode, stderr), tool=tool, returncode=done.returncode,
                        stderr=stderr)
    return done


def _failure(tool: str, returncode: int, stderr: str) -> str:
    """The message for a run that ended with `returncode`: the status or signal, then the end of its stderr."""
    if returncode < 0:
        try:
            what = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            what = f"was killed by signal {-returncode}"
    else:
        what = f"exited with status {returncode}"
    tail = stderr.strip()[-STDERR_TAIL:]
    return f"{tool} {what}: {tail}" if tail else f"{tool} {what} (nothing on stderr)"


async def _kill(process: trio.Process) -> None:
    """How a cancelled run ends its tool: at once (run_process then reaps it)."""
    process.kill()
