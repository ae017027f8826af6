"""`virtualizers.qemu.hypervisor` against the real system libvirtd: what counts as a lost connection, and bounded
calls."""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import libvirt
import pytest
import trio

from launcher.plugin.host import BackendHost
from virtualizers.qemu.backend import open_backend
from virtualizers.qemu.hypervisor import Hypervisor, Unresponsive, open_hypervisor

URI = "qemu:///system"


@asynccontextmanager
async def hypervisor(threads: int = 2, call_timeout_s: float = 30.0) -> AsyncIterator[Hypervisor]:
    async with open_hypervisor(URI, threads=threads, call_timeout_s=call_timeout_s) as opened:
        yield opened


async def test_an_error_of_one_domain_keeps_the_connection(tmp_path: Path) -> None:
    """QEMU's user cannot open a disk under pytest's 0700 tmp dir: libvirt fails that start with
    VIR_ERR_SYSTEM_ERROR, the code that used to be taken for a lost connection (and made the launcher reconnect)."""
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    name = f"launcher-test-{uuid.uuid4()}"
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices><disk type='file' device='disk'>"
           f"<driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/>"
           "</disk></devices></domain>")
    async with hypervisor() as hv:
        with pytest.raises(libvirt.libvirtError) as caught:
            await hv.call(lambda conn: conn.createXML(xml, 0))  # transient: nothing stays defined
        assert caught.value.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR
        assert "Permission denied" in (caught.value.get_error_message() or "")
        assert hv.connected
        assert await hv.call(lambda conn: conn.getLibVersion()) > 0  # the same connection still answers


async def test_a_call_that_does_not_return_is_bounded_and_keeps_only_libvirts_threads(tmp_path: Path) -> None:
    """A libvirt call cannot be interrupted: the stand-in here is a call that blocks in its worker thread until
    released (what a libvirtd that never answers does). It fails with Unresponsive after the bound; while it
    hangs, the hypervisor's other thread still serves calls. The qemu backend is handed the launcher's shared
    worker limiter (`BackendHost.limiter`), as `launcher serve` does: the hung calls take none of its tokens."""
    release = threading.Event()

    def hang(conn: libvirt.virConnect) -> None:
        release.wait(60)

    shared = trio.CapacityLimiter(1)
    host = BackendHost(tmp_path, shared, emit=lambda type_, **fields: None, log=lambda instance_dir, message: None)
    try:
        async with open_backend({"libvirt_threads": 2, "libvirt_timeout_s": 0.5}, host) as backend:
            hv = backend.hypervisor
            with pytest.raises(Unresponsive, match="did not answer within 0.5 s"):
                await hv.call(hang)
            assert await hv.call(lambda conn: conn.getLibVersion()) > 0  # one of two threads is stuck
            with pytest.raises(Unresponsive):
                await hv.call(hang)  # now both are
            with pytest.raises(Unresponsive):
                await hv.call(lambda conn: conn.getLibVersion())  # waits for a thread, within the bound
            assert (shared.borrowed_tokens, hv._limiter.borrowed_tokens) == (0, 2)  # the hung calls hold libvirt's
            with trio.fail_after(5):
                await trio.to_thread.run_sync(lambda: None, limiter=shared)  # the launcher's blocking work goes on
            release.set()
            with trio.fail_after(10):
                while hv._limiter.borrowed_tokens:  # the abandoned threads give their tokens back once done
                    await trio.sleep(0.05)
            assert await hv.call(lambda conn: conn.getLibVersion()) > 0
    finally:
        release.set()
