"""`launcher.plugin.tools.run_tool`: real processes (sh, sleep, a binary that does not exist), no mocks.

Each failure is one ToolError whose message names the tool and says what happened; a tool that overruns its
bound, or whose caller is cancelled, is killed at once (SIGKILL, even when it ignores SIGTERM) and reaped."""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import pytest
import trio

from launcher.plugin.tools import STDERR_TAIL, ToolError, run_tool


def _is_gone(pid: int) -> bool:
    """Whether `pid` no longer exists (run_tool reaped it: a zombie would still answer kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _pid_from(path: Path) -> int:
    """The pid a tool wrote into `path` once it started."""
    while not path.exists() or not path.read_text().strip():
        await trio.sleep(0.01)
    return int(path.read_text())


async def test_a_tool_that_succeeds_gives_its_output() -> None:
    done = await run_tool(["sh", "-c", "echo out; echo err >&2"], timeout_s=10)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"out\n", b"err\n")


async def test_stdout_to_dev_null() -> None:
    done = await run_tool(["sh", "-c", "echo out"], timeout_s=10, capture_stdout=False)
    assert done.returncode == 0 and done.stdout is None


async def test_a_failing_tool_says_its_status_and_the_end_of_its_stderr() -> None:
    script = "echo first line >&2; printf 'x%.0s' $(seq 600) >&2; echo ' last words' >&2; exit 3"
    with pytest.raises(ToolError) as caught:
        await run_tool(["sh", "-c", script], timeout_s=10, name="frobnicate")
    error = caught.value
    message = str(error)
    assert message.startswith("frobnicate exited with status 3: ") and message.endswith("x last words")
    assert "first line" not in message  # only the tail ...
    assert len(message) == len("frobnicate exited with status 3: ") + STDERR_TAIL
    assert error.stderr.startswith("first line\n")  # ... but the whole stderr is kept
    assert (error.tool, error.returncode, error.timed_out) == ("frobnicate", 3, False)


async def test_the_tool_is_named_after_its_file_by_default() -> None:
    with pytest.raises(ToolError) as caught:
        await run_tool(["/bin/sh", "-c", "exit 1"], timeout_s=10)
    assert str(caught.value) == "sh exited with status 1 (nothing on stderr)"


async def test_a_tool_killed_by_a_signal_says_which() -> None:
    with pytest.raises(ToolError) as caught:
        await run_tool(["sh", "-c", "echo dying >&2; kill -SEGV $$"], timeout_s=10)
    assert str(caught.value) == "sh was killed by SIGSEGV: dying"
    assert caught.value.returncode == -11


async def test_a_tool_that_overruns_its_bound_is_killed(tmp_path: Path) -> None:
    """It ignores SIGTERM, so only SIGKILL ends it; run_tool returns well before the tool's own end (30 s)."""
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(ToolError) as caught:
        await run_tool(["sh", "-c", f"trap '' TERM; echo $$ > {pidfile}; exec sleep 30"], timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert str(caught.value) == "sh took more than 0.5 s (killed)"
    assert caught.value.timed_out and caught.value.returncode is None
    assert _is_gone(int(pidfile.read_text()))


async def test_a_missing_binary() -> None:
    with pytest.raises(ToolError) as caught:
        await run_tool(["/nonexistent/qemu-img", "info"], timeout_s=10)
    assert str(caught.value) == "cannot run qemu-img: /nonexistent/qemu-img not found (is it installed?)"
    with pytest.raises(ToolError) as caught:
        await run_tool(["no-such-tool-anywhere"], timeout_s=10)
    assert str(caught.value) == "cannot run no-such-tool-anywhere: no-such-tool-anywhere not found (is it installed?)"


async def test_a_file_that_is_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(ToolError) as caught:
        await run_tool([script], timeout_s=10)
    assert str(caught.value) == "cannot run tool: Permission denied"


async def test_cancelling_the_caller_kills_the_tool(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    async with trio.open_nursery() as nursery:
        argv = ["sh", "-c", f"trap '' TERM; echo $$ > {pidfile}; exec sleep 30"]
        nursery.start_soon(partial(run_tool, argv, timeout_s=60))
        pid = await _pid_from(pidfile)
        started = time.monotonic()
        nursery.cancel_scope.cancel()
    assert time.monotonic() - started < 3
    assert _is_gone(pid)
