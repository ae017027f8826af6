"""The test guest image of tests/guest/ (conftest's `guest_image`) booted with plain QEMU (TCG, q35, legacy BIOS)
and a NoCloud seed: it reports its seed and first boot on the serial console, then powers off on an ACPI power
button press."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pycdlib

BOOT_TIMEOUT_S = 180.0  # TCG on a busy 2-core machine; about 15 s when idle
POWEROFF_TIMEOUT_S = 20.0
INSTANCE_ID = "i-5f0c2d"
HOSTNAME = "guest-image-test"
USER_DATA = b"#cloud-config\nruncmd: [true]\n"


def write_nocloud_seed(path: Path) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    meta_data = f"instance-id: {INSTANCE_ID}\nlocal-hostname: '{HOSTNAME}'\n".encode()
    for name, data in (("meta-data", meta_data), ("user-data", USER_DATA)):
        iso_name = name.upper().replace("-", "_") + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), f"/{iso_name}", rr_name=name, joliet_path=f"/{name}")
    iso.write(str(path))
    iso.close()


def wait_for_console(console: Path, text: str, qemu: subprocess.Popen[bytes], timeout: float) -> str:
    """The first console line containing `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = console.read_text(errors="replace").splitlines() if console.exists() else []
        found = [line for line in lines if text in line]
        if found:
            return found[0]
        assert qemu.poll() is None, f"qemu exited ({qemu.returncode}) before {text!r}, see {console.parent}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} on the console within {timeout:g} s:\n{console.read_text()}")


def qmp(path: Path, command: str, timeout: float = 10.0) -> None:
    """Run one QMP command, without arguments."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        replies = sock.makefile("rw")
        replies.readline()  # greeting
        for execute in ("qmp_capabilities", command):
            replies.write(json.dumps({"execute": execute}) + "\n")
            replies.flush()
            while "return" not in (reply := json.loads(replies.readline())):  # skip events
                assert "error" not in reply, reply


def test_guest_boots_reports_its_seed_and_powers_off(tmp_path: Path, guest_image: Path) -> None:
    qemu_binary = shutil.which("qemu-system-x86_64")
    assert qemu_binary, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    overlay, seed = tmp_path / "disk.qcow2", tmp_path / "seed.iso"
    console, monitor, log = tmp_path / "console.log", tmp_path / "qmp.sock", tmp_path / "qemu.log"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(guest_image), "-F", "qcow2",
                    str(overlay)], check=True, timeout=30)
    write_nocloud_seed(seed)
    with log.open("wb") as out:
        qemu = subprocess.Popen([
            qemu_binary, "-accel", "tcg", "-machine", "q35", "-m", "256", "-display", "none", "-no-reboot",
            "-nic", "none", "-serial", f"file:{console}", "-qmp", f"unix:{monitor},server=on,wait=off",
            "-drive", f"file={overlay},if=virtio",
            "-drive", f"file={seed},media=cdrom,if=none,id=cd0", "-device", "ide-cd,drive=cd0,bus=ide.0",
        ], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        line = wait_for_console(console, "guest-ready ", qemu, BOOT_TIMEOUT_S)
        assert dict(re.findall(r"(\S+?)=(\S*)", line)) == {
            "instance-id": INSTANCE_ID,
            "hostname": HOSTNAME,
            "user-data-sha256": hashlib.sha256(USER_DATA).hexdigest(),
            "datasource": "nocloud",
            "boots": "1",
            "disks": "vda:-",  # its own disk, without a serial
            "marks": "none",  # no data disk
        }, line

        qmp(monitor, "system_powerdown")
        assert qemu.wait(timeout=POWEROFF_TIMEOUT_S) == 0
        assert "guest-poweroff" in console.read_text()
    finally:
        qemu.kill()
        qemu.wait(timeout=10)
