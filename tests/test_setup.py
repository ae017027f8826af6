"""Set-up problems an operator can act on: `launcher serve` refuses to start with one line that says what to do
and exit status 2, before it serves (a real `launcher serve` process, the real libvirtd); `.ci/libvirt-up`
makes /dev/kvm usable as Debian's udev rule would."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import QEMU_TEST_ROOT, ROOT
from libvirt_cleanup import remove_pools_under

from virtualizers.qemu import preflight

EXIT_USAGE = 2


def serve(tmp: Path, settings: dict[str, Any], data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `launcher serve` with `settings` until it exits (it must: every case here is a set-up error)."""
    config = tmp / "launcher.yaml"
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", **settings}))
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "serve", "--config", str(config),
         "--data-dir", str(data_dir or tmp / "data")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The one line `launcher serve` printed for a set-up error (after any log lines), checked."""
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "Traceback" not in done.stderr and "ExceptionGroup" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("launcher: "), done.stderr
    return last


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A temp dir that QEMU's user can traverse (pytest's own are under a 0700 dir)."""
    QEMU_TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="setup-", dir=QEMU_TEST_ROOT))
    path.chmod(0o711)
    yield path
    remove_pools_under(path)  # the volume pool a launcher that passed its preflight defined there
    subprocess.run(["rm", "-rf", str(path)], check=True)


def test_bad_plugin_section_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = refusal(serve(tmp_path, {"virtualizer": "simulation", "simulation": {"mode": "bogus"}}))
    assert line == "launcher: simulation.mode: must be one of memory, process, got 'bogus'"


def test_bad_qemu_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = refusal(serve(tmp_path, {"virtualizer": "qemu", "qemu": {"seed_format": "iso"}}))
    assert line.startswith("launcher: qemu.seed_format: ")


def test_unreachable_libvirt_is_one_line_and_exit_2(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path}/no-such-socket"
    line = refusal(serve(tmp_path, {"virtualizer": "qemu", "qemu": {"uri": uri}}))
    assert f"cannot connect to libvirt at {uri}" in line and ".ci/libvirt-up" in line


def test_data_dir_qemu_cannot_reach_is_refused_before_serving(tmp_path: Path) -> None:
    """pytest's tmp dirs sit under a 0700 dir: QEMU (libvirt-qemu) could not open the disks there."""
    chain = [*reversed(tmp_path.parents), tmp_path]
    blocked = next(p for p in chain if not stat.S_IMODE(p.stat().st_mode) & stat.S_IXOTH)
    done = serve(tmp_path, {"virtualizer": "qemu"})
    line = refusal(done)
    assert f"which cannot enter {blocked} (mode " in line and "QEMU runs as libvirt-qemu" in line, line
    assert not (tmp_path / "data" / "api-url").exists()  # it never served
    assert remove_pools_under(tmp_path) == []  # refused before its volume pool was defined


def test_data_dir_qemu_can_reach_serves(reachable_tmp: Path) -> None:
    """The counterpart: the same launcher on a traversable path passes the preflight and serves."""
    config = reachable_tmp / "launcher.yaml"
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "virtualizer": "qemu"}))
    data_dir = reachable_tmp / "data"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--config", str(config),
                             "--data-dir", str(data_dir)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (data_dir / "api-url").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert (data_dir / "api-url").exists(), proc.stderr.read() if proc.poll() is not None else "no api-url"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_missing_firmware_is_refused(reachable_tmp: Path) -> None:
    missing = reachable_tmp / "OVMF_CODE.fd"
    line = refusal(serve(reachable_tmp, {"virtualizer": "qemu", "qemu": {"ovmf_code": str(missing)}}))
    assert line == (f"launcher: qemu.ovmf_code: {missing} is not a file (install Debian's ovmf package, "
                    "or set qemu.ovmf_code)")


@pytest.mark.skipif(preflight.kvm_problem() is None, reason="KVM works on this host")
def test_accel_kvm_where_kvm_cannot_run_is_refused(reachable_tmp: Path) -> None:
    line = refusal(serve(reachable_tmp, {"virtualizer": "qemu", "qemu": {"accel": "kvm"}}))
    assert line.startswith("launcher: qemu.accel: kvm, but KVM cannot run on this host: ")
    assert str(preflight.kvm_problem()) in line and "accel: auto" in line


def test_unknown_machine_is_refused_with_libvirts_reason(reachable_tmp: Path) -> None:
    line = refusal(serve(reachable_tmp, {"virtualizer": "qemu", "qemu": {"machine": "no-such-machine"}}))
    assert "cannot run QEMU guests of machine 'no-such-machine'" in line and "qemu.machine" in line


def test_libvirt_up_gives_dev_kvm_group_kvm_mode_0660(tmp_path: Path) -> None:
    """What Debian's udev rule does; without it libvirtd re-probes QEMU forever and every start hangs. The
    script's device step runs on a device node of the test's own (same major/minor as /dev/kvm)."""
    device = tmp_path / "kvm"
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(10, 232))
    os.chown(device, 0, 0)
    done = subprocess.run(["bash", str(ROOT / ".ci" / "libvirt-up")], env={**os.environ, "KVM_DEVICE": str(device)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    info = device.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, grp.getgrnam("kvm").gr_gid)
    assert stat.S_ISCHR(info.st_mode)


def test_dev_kvm_is_usable_by_libvirts_qemu_user() -> None:
    """On this machine, after `.ci/install`: the state libvirt needs to start domains at all."""
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm on this host")
    info = Path("/dev/kvm").stat()
    assert (stat.S_IMODE(info.st_mode) & 0o060, grp.getgrgid(info.st_gid).gr_name) == (0o060, "kvm")
