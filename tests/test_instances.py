"""The instance state machine: every cell of command × state, against the in-process supervisor."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from harness import Node, running_node, start_command

from launcher.core.commands import DeleteCommand, RestartCommand, StopCommand
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError

U = "0a1b2c3d-0001"
SLOW_BOOT = {"boot_delay_s": 30.0}


async def running(node: Node, uuid: str = U) -> None:
    ticket = await node.done(node.start(uuid))
    assert ticket.error is None and ticket.state == "running"


async def exited(node: Node, uuid: str = U) -> None:
    await running(node, uuid)
    ticket = await node.done(node.dispatch(StopCommand(uuid)))
    assert ticket.state == "exited"


def refused(node: Node, command: object, code: str) -> LauncherError:
    with pytest.raises(LauncherError) as info:
        node.dispatch(command)  # type: ignore[arg-type]
    assert info.value.code == code
    return info.value


# ----------------------------------------------------------------- state: (none) / deleted


async def test_start_new_instance_runs_and_reports_every_step(tmp_path: Path) -> None:
    async with running_node(tmp_path) as node:
        ticket = node.start(U)
        with trio.fail_after(5):
            await ticket.accepted.wait()
        assert U in (tmp_path / "instances.wal").read_text()  # durable before it is acknowledged
        await node.done(ticket)
        assert (tmp_path / "instances" / U / "instance.json").exists()
        assert ticket.state == "running"
        states = [e["state"] for e in await node.events(type="instance_state", instance_uuid=U)]
        assert states == ["pending", "running"]
        await node.logs.flush()
        timeline = (tmp_path / "instances" / U / "launcher.log").read_text()
        for step in ("START accepted", "ensure_backing_image ok in", "create_image ok in", "start_vm ok in",
                     "VM is running"):
            assert step in timeline


@pytest.mark.parametrize("command", [StopCommand(U), RestartCommand(U), DeleteCommand(U)])
async def test_commands_on_unknown_instance(tmp_path: Path, command: object) -> None:
    async with running_node(tmp_path) as node:
        refused(node, command, errors.NO_INSTANCE)


async def test_commands_after_delete_are_no_instance_and_start_creates_anew(tmp_path: Path) -> None:
    async with running_node(tmp_path) as node:
        await running(node)
        assert (await node.done(node.dispatch(DeleteCommand(U)))).state == "deleted"
        assert not (tmp_path / "instances" / U).exists()
        for command in (StopCommand(U), RestartCommand(U), DeleteCommand(U)):
            refused(node, command, errors.NO_INSTANCE)
        await running(node)  # the uuid is free again


# ----------------------------------------------------------------- state: pending (booting)


async def test_pending_matrix(tmp_path: Path) -> None:
    async with running_node(tmp_path, SLOW_BOOT) as node:
        first = node.start(U)
        await node.wait_state(U, "pending")
        repeat = node.start(U)  # identical payload: idempotent, and settles with the instance
        with trio.fail_after(10):
            await repeat.accepted.wait()  # acknowledged with the first START, never before it is durable
        assert first.accepted.is_set() and not repeat.done.is_set()
        refused(node, start_command(U, vcpus=2), errors.ALREADY_RUNNING)
        refused(node, RestartCommand(U), errors.ALREADY_RUNNING)
        stop = node.dispatch(StopCommand(U, grace_s=0))
        await node.done(stop)
        assert stop.state == "exited"
        await node.done(first)
        assert first.state == "exited"  # the START was overtaken by the STOP, not failed
        assert (await node.done(repeat)).state == "exited"


async def test_delete_while_pending_boot(tmp_path: Path) -> None:
    async with running_node(tmp_path, SLOW_BOOT) as node:
        first = node.start(U)
        await node.wait_state(U, "pending")
        delete = await node.done(node.dispatch(DeleteCommand(U)))
        assert delete.state == "deleted" and first.done.is_set()
        assert not (tmp_path / "instances" / U).exists()


async def test_delete_interrupts_a_start_stuck_in_image_phase(tmp_path: Path) -> None:
    hang = {"failures": [{"phase": "ensure", "action": "hang"}]}
    async with running_node(tmp_path, hang) as node:
        first = node.start(U)
        await first.accepted.wait()
        delete = await node.done(node.dispatch(DeleteCommand(U)))
        assert delete.state == "deleted"
        assert first.error is not None and first.error.code == errors.NO_INSTANCE
        assert not (tmp_path / "instances" / U).exists()


# ----------------------------------------------------------------- state: running


async def test_running_matrix(tmp_path: Path) -> None:
    async with running_node(tmp_path) as node:
        await running(node)
        repeat = node.start(U)
        assert repeat.done.is_set() and repeat.state == "running"
        refused(node, start_command(U, mem_mb=512), errors.ALREADY_RUNNING)
        refused(node, RestartCommand(U), errors.ALREADY_RUNNING)
        assert (await node.done(node.dispatch(StopCommand(U)))).state == "exited"
        await node.done(node.dispatch(RestartCommand(U)))
        assert node.state(U) == "running"
        assert (await node.done(node.dispatch(DeleteCommand(U)))).state == "deleted"
        deleted = await node.events(type="instance_state", instance_uuid=U, state="deleted")
        assert len(deleted) == 1


# ----------------------------------------------------------------- state: exited


async def test_exited_matrix(tmp_path: Path) -> None:
    async with running_node(tmp_path) as node:
        await exited(node)
        repeat = node.start(U)
        assert repeat.done.is_set() and repeat.state == "exited"
        refused(node, start_command(U, vcpus=3), errors.INSTANCE_EXISTS)
        refused(node, StopCommand(U), errors.ALREADY_STOPPED)
        restart = await node.done(node.dispatch(RestartCommand(U)))
        assert restart.state == "running"
        await node.done(node.dispatch(StopCommand(U)))
        assert (await node.done(node.dispatch(DeleteCommand(U)))).state == "deleted"


# ----------------------------------------------------------------- state: stopping / deleting (internal)


async def test_commands_while_stopping_are_judged_on_the_projected_state(tmp_path: Path) -> None:
    async with running_node(tmp_path, {"stop_delay_s": 1.0}) as node:
        await running(node)
        stop = node.dispatch(StopCommand(U))
        await stop.accepted.wait()
        refused(node, StopCommand(U), errors.ALREADY_STOPPED)
        restart = node.dispatch(RestartCommand(U))  # queued behind the STOP
        refused(node, RestartCommand(U), errors.ALREADY_RUNNING)
        await node.done(stop)
        await node.done(restart)
        assert stop.state == "exited" and restart.state == "running"


async def test_commands_while_deleting(tmp_path: Path) -> None:
    async with running_node(tmp_path, {"stop_delay_s": 1.0}) as node:
        await running(node)
        delete = node.dispatch(DeleteCommand(U, stop=True))
        await delete.accepted.wait()
        refused(node, start_command(U), errors.INSTANCE_EXISTS)  # never a second actor on one dir
        for command in (StopCommand(U), RestartCommand(U), DeleteCommand(U)):
            refused(node, command, errors.NO_INSTANCE)
        await node.done(delete)
        assert delete.state == "deleted"


# ----------------------------------------------------------------- failures


@pytest.mark.parametrize("phase, code", [("ensure", errors.IMAGE_FAILURE), ("create", errors.IMAGE_FAILURE)])
async def test_failure_before_start_vm_removes_the_instance(tmp_path: Path, phase: str, code: str) -> None:
    async with running_node(tmp_path, {"failures": [{"phase": phase}]}) as node:
        ticket = await node.done(node.start(U))
        assert ticket.error is not None and ticket.error.code == code
        assert node.state(U) == "deleted"
        assert not (tmp_path / "instances" / U).exists()
        [failure] = await node.events(type="start_failure", instance_uuid=U)
        assert failure["reason"] == code and "injected" in failure["detail"]
        assert node.supervisor.allocated.vcpus == 0


async def test_launch_failure_keeps_the_instance_exited_and_restart_retries(tmp_path: Path) -> None:
    rules = {"failures": [{"phase": "start", "match": "^0a1b", "probability": 1.0}]}
    async with running_node(tmp_path, rules) as node:
        ticket = await node.done(node.start(U))
        assert ticket.error is not None and ticket.error.code == errors.LAUNCH_FAILURE
        assert node.state(U) == "exited"
        assert (tmp_path / "instances" / U).is_dir()
        retry = await node.done(node.dispatch(RestartCommand(U)))
        assert retry.error is not None and retry.error.code == errors.LAUNCH_FAILURE
        assert [e["reason"] for e in await node.events(type="restart_failure")] == [errors.LAUNCH_FAILURE]
        other = await node.done(node.start("ffff-0002"))  # the rule's pattern does not match it
        assert other.state == "running"


async def test_hanging_virtualizer_call_times_out_with_its_code(tmp_path: Path) -> None:
    hang = {"failures": [{"phase": "start", "action": "hang"}]}
    async with running_node(tmp_path, hang, timeouts={"start_vm_s": 0.2}) as node:
        ticket = await node.done(node.start(U))
        assert ticket.error is not None and ticket.error.code == errors.LAUNCH_FAILURE
        assert "within 0.2 s" in ticket.error.reason
        assert node.state(U) == "exited"


async def test_crash_reports_exited(tmp_path: Path) -> None:
    crash = {"failures": [{"phase": "crash", "after_s": 0.1}]}
    async with running_node(tmp_path, crash) as node:
        await running(node)
        await node.wait_state(U, "exited")
        [event] = await node.events(type="instance_state", instance_uuid=U, state="exited")
        assert event["reason"] == "vm_exited"


async def test_boot_timeout_forces_the_vm_off(tmp_path: Path) -> None:
    async with running_node(tmp_path, SLOW_BOOT, timeouts={"boot_s": 0.2}) as node:
        ticket = await node.done(node.start(U))
        assert ticket.error is not None and ticket.error.code == errors.LAUNCH_FAILURE
        assert node.state(U) == "exited"


async def test_full_inbox_is_instance_busy(tmp_path: Path) -> None:
    async with running_node(tmp_path, {"stop_delay_s": 5.0}, inbox_size=2) as node:
        await running(node)
        stop = node.dispatch(StopCommand(U))
        await stop.accepted.wait()  # the actor is busy with it for 5 s; the inbox holds 2 more
        node.dispatch(RestartCommand(U))
        node.dispatch(StopCommand(U))
        refused(node, RestartCommand(U), errors.INSTANCE_BUSY)


async def test_slow_instance_does_not_delay_others(tmp_path: Path) -> None:
    hang = {"failures": [{"phase": "ensure", "match": "^dead", "action": "hang"}]}
    async with running_node(tmp_path, hang) as node:
        stuck = node.start("dead-0001")
        node.dispatch(StopCommand("dead-0001"))  # queued behind the stuck START
        for n in range(5):
            assert (await node.done(node.start(f"beef-{n:04}"), timeout=5)).state == "running"
        assert not stuck.done.is_set()
