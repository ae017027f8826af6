"""The qemu test fixtures leave no libvirt domain behind, whatever the test's outcome (a real pytest run of
tests/cleanup_probe.py, a real launcher, libvirtd and QEMU)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import libvirt
import pytest
from conftest import ROOT


def defined(name: str) -> bool:
    connection = libvirt.open("qemu:///system")
    try:
        return name in connection.listDefinedDomains() or any(
            d.name() == name for d in connection.listAllDomains())
    finally:
        connection.close()


@pytest.mark.parametrize("mode", ["fails", "unusable-config"])
def test_a_failed_qemu_test_leaves_no_domain(mode: str) -> None:
    """`fails`: the test body fails. `unusable-config`: it also breaks what `launcher hard-reset` needs, so only
    the fixture's own sweep through libvirt can remove the domain (the teardown then reports the failed reset)."""
    probe_uuid = str(uuid.uuid4())
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cleanup_probe.py"],
        env={**os.environ, "PROBE_UUID": probe_uuid, "PROBE_MODE": mode},
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failing on purpose" in done.stdout, done.stdout
    if mode == "unusable-config":
        assert "launcher hard-reset failed" in done.stdout, done.stdout  # reported, not hidden
    assert not defined(f"launcher-{probe_uuid}")
