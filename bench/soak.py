"""Soak: START → STOP → RESTART → DELETE cycles for a long time; does the launcher level off?

Runs a real `launcher serve` with the simulation virtualizer (memory mode) and `--workers` clients, each
cycling its own fresh instance through START, STOP, RESTART and DELETE (every command with `?wait=1`), and,
with `--real-vms N`, a second `launcher serve` with the qemu virtualizer cycling N real TCG guests (the test
guest of tests/guest/) the same way. Every `--sample-s` it records each launcher's RSS, open file
descriptors and threads, and the commands done and failed. The figures must level off (the event ring in
memory fills first: `events.memory_events`, 20 000 by default, which the simulation launcher reaches after
about 4 000 cycles).

    .venv/bin/python bench/soak.py [--minutes 60] [--workers 8] [--real-vms 2] [--sample-s 60] [--json]

`--json` prints one object: {"minutes", "launchers": {name: {"samples": [{"t_s", "rss_mib", "fds", "threads",
"cycles", "failures"}], "first": sample, "last": sample}}}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuid_module
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.cli.client import Client, ClientError  # noqa: E402

REAL_ROOT = Path("/var/tmp/launcher-tests")  # QEMU's user must reach the qemu launcher's data dir
GUEST_IMAGE_ID = "soak-guest"


class Launcher:
    """One `launcher serve` child process with its own data dir."""

    def __init__(self, name: str, data_dir: Path, settings: dict[str, Any]) -> None:
        self.name = name
        self.data_dir = data_dir
        config = data_dir.parent / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "admission": {"vcpu_overcommit": 64.0,
                                                                                  "max_instances": 100000},
                                          **settings}))
        self.log = open(data_dir.parent / f"{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--config", str(config),
                                      "--data-dir", str(data_dir)], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        deadline = time.monotonic() + 60
        while not (data_dir / "api-url").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"launcher {name} did not start: see {self.log.name}")
            time.sleep(0.05)
        self.process = psutil.Process(self.proc.pid)

    def client(self) -> Client:
        return Client.discover(None, self.data_dir)

    def figures(self) -> dict[str, float]:
        return {"rss_mib": round(self.process.memory_info().rss / 2**20, 1), "fds": self.process.num_fds(),
                "threads": self.process.num_threads()}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Cycler:
    """Workers that cycle fresh instances through START, STOP, RESTART and DELETE until told to stop."""

    def __init__(self, launcher: Launcher, payload: Callable[[str], bytes], workers: int, grace: float) -> None:
        self.launcher = launcher
        self.payload = payload
        self.grace = grace
        self.cycles = 0
        self.failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(600)

    def _work(self) -> None:
        client = self.launcher.client()
        while not self._stopping.is_set():
            uuid = str(uuid_module.uuid4())
            steps = [
                ("START", partial(client.request, "POST", "/v1/instances", self.payload(uuid), "application/yaml",
                                  wait=1, timeout=300)),
                ("STOP", partial(client.request, "POST", f"/v1/instances/{uuid}/stop", grace=self.grace, wait=1,
                                 timeout=300)),
                ("RESTART", partial(client.request, "POST", f"/v1/instances/{uuid}/restart", wait=1, timeout=300)),
                ("DELETE", partial(client.request, "DELETE", f"/v1/instances/{uuid}", wait=1, timeout=300)),
            ]
            for name, step in steps:
                try:
                    step()
                except (ClientError, OSError) as exc:
                    self._fail(f"{name}: {getattr(exc, 'code', type(exc).__name__)}")
                    with_cleanup = name != "DELETE"
                    if with_cleanup:
                        try:
                            client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=300)
                        except (ClientError, OSError):
                            pass
                    break
            else:
                with self._lock:
                    self.cycles += 1

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures[what] = self.failures.get(what, 0) + 1


def simulation_payload(uuid: str) -> bytes:
    return (f"start:\n  instance_uuid: {uuid}\n  image_uuid: soak-image\n  fw_type: legacy\n"
            "  requested_resources:\n    - type: vcpus\n      value: 1\n    - type: mem_mb\n      value: 16\n").encode()


def real_payload(uuid: str) -> bytes:
    mac = "02:00:00:%02x:%02x:%02x" % tuple(bytes.fromhex(uuid.replace("-", "")[-6:]))
    return (f"start:\n  instance_uuid: {uuid}\n  image_uuid: {GUEST_IMAGE_ID}\n  fw_type: legacy\n"
            "  requested_resources:\n    - type: vcpus\n      value: 1\n    - type: mem_mb\n      value: 128\n"
            f"  networking:\n    vnic_mac: {mac}\n").encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=8, help="concurrent simulation cyclers")
    parser.add_argument("--real-vms", type=int, default=0, help="concurrent real-VM cyclers (qemu, TCG)")
    parser.add_argument("--sample-s", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    launchers: list[tuple[Launcher, Cycler]] = []
    real_dir: Path | None = None
    try:
        sim = Launcher("simulation", work / "simulation", {"virtualizer": "simulation",
                                                            "simulation": {"boot_delay_s": 0.01}})
        launchers.append((sim, Cycler(sim, simulation_payload, args.workers, grace=0)))
        if args.real_vms:
            real_dir = Path(tempfile.mkdtemp(prefix="soak-", dir=REAL_ROOT))
            real_dir.chmod(0o711)
            images = real_dir / "images-src"
            images.mkdir()
            guest = subprocess.run([sys.executable, str(ROOT / "tests" / "guest" / "build.py")], check=True,
                                   capture_output=True, text=True).stdout.strip()
            (images / f"{GUEST_IMAGE_ID}.qcow2").symlink_to(guest)
            data = real_dir / "qemu"
            data.mkdir(mode=0o711)
            real = Launcher("qemu", data, {"virtualizer": "qemu", "qemu": {"image_dirs": [str(images)]}})
            launchers.append((real, Cycler(real, real_payload, args.real_vms, grace=5)))
        return _soak(args, launchers)
    finally:
        for launcher, cycler in launchers:
            cycler.stop()
            launcher.stop()
        if real_dir is not None:
            subprocess.run([sys.executable, "-m", "launcher.cli", "hard-reset", "--yes", "--config",
                            str(real_dir / "qemu.yaml"), "--data-dir", str(real_dir / "qemu")], cwd=ROOT,
                           capture_output=True, timeout=300)
            shutil.rmtree(real_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _soak(args: argparse.Namespace, launchers: list[tuple[Launcher, Cycler]]) -> int:
    samples: dict[str, list[dict[str, Any]]] = {launcher.name: [] for launcher, _ in launchers}
    started = time.monotonic()

    def sample() -> None:
        for launcher, cycler in launchers:
            row = {"t_s": round(time.monotonic() - started), **launcher.figures(), "cycles": cycler.cycles,
                   "failures": sum(cycler.failures.values())}
            samples[launcher.name].append(row)
            if not args.json:
                print(f"{launcher.name:>10} t={row['t_s']:>5}s rss={row['rss_mib']:>7} MiB fds={row['fds']:>4} "
                      f"threads={row['threads']:>3} cycles={row['cycles']:>6} failures={row['failures']}",
                      flush=True)

    sample()
    for _, cycler in launchers:
        cycler.start()
    end = started + args.minutes * 60
    while time.monotonic() < end:
        time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
        sample()
    for _, cycler in launchers:
        cycler.stop()
    sample()
    result = {"minutes": args.minutes, "launchers": {
        name: {"samples": rows, "first": rows[0], "last": rows[-1],
               "failures": next(c.failures for launcher, c in launchers if launcher.name == name)}
        for name, rows in samples.items()}}
    if args.json:
        print(json.dumps(result))
    else:
        for name, body in result["launchers"].items():
            print(f"{name}: first {body['first']}, last {body['last']}, failures {body['failures']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
