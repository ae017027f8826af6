"""START → running latency of a container (docker virtualizer) beside a VM's (qemu virtualizer, TCG here).

    .venv/bin/python bench/container_start.py [--runs 20] [--json]

Two real `launcher serve` processes, one per virtualizer (a launcher runs one virtualizer today). Each round,
interleaved (alternating which goes first): `POST /v1/instances?wait=1` of a container START (the busybox test
image of tests/guest/container.py, imported into the engine by the warm-up round, `runcmd: [[sleep, 600]]`, on the
engine network `launcher-test`) and of the example VM START (configs/examples/start_legacy.yaml, the test guest),
each timed until the launcher answers `running`, then deleted (not timed). The container's step times (image,
disk = create, start) come from its launcher.log.

Prints p50/p95 of both; with --json, the last line is one JSON object with `runs`, `container_running_p50_s`,
`container_running_p95_s`, `vm_running_p50_s`, `vm_running_p95_s` and `container_steps_ms` (medians). Needs what
`bash .ci/install` sets up (libvirtd and dockerd running). Not a test: the machine is noisy.

Until the branch is installed (pip install -e .), the venv lacks the `docker` entry point; the docker launcher is
then given a dist-info dir that declares it (on its PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuid_module
from importlib.metadata import entry_points
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "guest"), str(ROOT / "tests")]

from build import ensure_guest_image  # noqa: E402  (tests/guest/build.py)
from container import ensure_rootfs  # noqa: E402  (tests/guest/container.py)
from libvirt_cleanup import remove_pools_under  # noqa: E402  (tests/libvirt_cleanup.py)

from launcher.cli.client import Client  # noqa: E402
from launcher.transport.payloads import parse_start  # noqa: E402

EXAMPLE = ROOT / "configs" / "examples" / "start_legacy.yaml"
WORK_ROOT = Path("/var/tmp/launcher-bench")  # QEMU runs as libvirt-qemu: it must reach these files
NETWORK, SUBNET = "launcher-test", "172.31.250.0/24"
IMAGE = "launcher-bench/busybox:1"
STEP_RE = re.compile(r"step (\w+): .* in (\d+) ms")
DOCKER = ["docker", "-H", "unix:///run/docker.sock"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def entry_point_env(work: Path) -> dict[str, str]:
    if any(ep.name == "docker" for ep in entry_points(group="launcher.virtualizers")):
        return {}
    info = work / "shim" / "launcher_docker_shim-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: launcher-docker-shim\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[launcher.virtualizers]\ndocker = virtualizers.docker.backend:open_backend\n")
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(work / "shim")])}


def start_launcher(work: Path, settings: dict[str, object],
                   env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Client]:
    data_dir = work / "data"
    data_dir.mkdir(mode=0o711)
    (work / "launcher.yaml").write_text(yaml.safe_dump({"listen": "127.0.0.1:0", **settings}))
    log = open(work / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--config", str(work / "launcher.yaml"),
                             "--data-dir", str(data_dir)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while not (data_dir / "api-url").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"launcher did not start:\n{(work / 'serve.log').read_text()}")
        time.sleep(0.05)
    return proc, Client.discover(None, data_dir)


def stop_launcher(proc: subprocess.Popen[bytes], work: Path, env: dict[str, str]) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    subprocess.run([sys.executable, "-m", "launcher.cli", "hard-reset", "--yes", "--config",
                    str(work / "launcher.yaml"), "--data-dir", str(work / "data")], cwd=ROOT,
                   capture_output=True, timeout=120, env={**os.environ, **env})
    remove_pools_under(work)
    shutil.rmtree(work, ignore_errors=True)


def container_payload(uuid: str) -> bytes:
    return json.dumps({
        "start": {"instance_uuid": uuid, "tenant_uuid": str(uuid_module.uuid4()), "vm_type": "docker",
                  "docker_image": IMAGE, "networking": {"vnic_mac": "02:42:ac:1f:fb:01", "subnet": SUBNET,
                                                        "private_ip": "172.31.250.251"}},
        "user_data": "#cloud-config\n" + json.dumps({"runcmd": [["sleep", "600"]]}),
        "meta_data": json.dumps({"hostname": "bench"}),
    }).encode()


def one_round(client: Client, payload: bytes, content_type: str, uuid: str) -> tuple[float, dict[str, int]]:
    started = time.perf_counter()
    answer = client.request("POST", "/v1/instances", payload, content_type, wait=1, timeout=120)
    elapsed = time.perf_counter() - started
    if answer.get("state") != "running":
        raise SystemExit(f"START did not reach running: {answer}")
    log = b"".join(client.stream(f"/v1/instances/{uuid}/log", read_timeout=10)).decode()
    steps = {name: int(ms) for name, ms in STEP_RE.findall(log)}
    client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)
    return elapsed, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    subprocess.run(["bash", str(ROOT / ".ci" / "docker-up")], check=True, timeout=120)
    if subprocess.run([*DOCKER, "network", "inspect", NETWORK], capture_output=True).returncode != 0:
        subprocess.run([*DOCKER, "network", "create", "--subnet", SUBNET, NETWORK], check=True, capture_output=True)
    guest = ensure_guest_image(ROOT / ".cache" / "guest")
    vm_payload = EXAMPLE.read_bytes()
    vm_spec = parse_start(vm_payload, "application/yaml", max_bytes=1 << 20).spec
    WORK_ROOT.mkdir(mode=0o711, exist_ok=True)
    vm_work = Path(tempfile.mkdtemp(prefix="vm-", dir=WORK_ROOT))
    vm_work.chmod(0o711)
    (vm_work / "images").mkdir()
    (vm_work / "images" / f"{vm_spec.image_uuid}.qcow2").symlink_to(guest)
    c_work = Path(tempfile.mkdtemp(prefix="container-", dir=WORK_ROOT))
    repository, _, tag = IMAGE.rpartition(":")
    (c_work / "images" / repository).mkdir(parents=True)
    (c_work / "images" / repository / f"{tag}.rootfs.tar").symlink_to(ensure_rootfs(ROOT / ".cache" / "container"))
    subprocess.run([*DOCKER, "rmi", "-f", IMAGE], capture_output=True)  # the warm-up round imports it
    env = entry_point_env(c_work)
    vm_proc, vm_client = start_launcher(vm_work, {"virtualizer": "qemu",
                                                  "qemu": {"image_dirs": [str(vm_work / "images")]}}, {})
    c_proc, c_client = None, None
    try:
        c_proc, c_client = start_launcher(c_work, {"virtualizer": "docker", "docker": {
            "image_dir": str(c_work / "images"), "network": NETWORK}}, env)
        c_uuid = str(uuid_module.uuid4())
        one_round(c_client, container_payload(c_uuid), "application/json", c_uuid)  # warm-up: imports the image
        one_round(vm_client, vm_payload, "application/yaml", vm_spec.instance_uuid)
        container_times: list[float] = []
        vm_times: list[float] = []
        steps: dict[str, list[int]] = {"image": [], "disk": [], "start": []}
        for n in range(args.runs):
            if n % 2:
                vm_times.append(one_round(vm_client, vm_payload, "application/yaml", vm_spec.instance_uuid)[0])
            elapsed, step_ms = one_round(c_client, container_payload(c_uuid), "application/json", c_uuid)
            container_times.append(elapsed)
            for name in steps:
                steps[name].append(step_ms.get(name, -1))
            if not n % 2:
                vm_times.append(one_round(vm_client, vm_payload, "application/yaml", vm_spec.instance_uuid)[0])
    finally:
        if c_proc is not None:
            stop_launcher(c_proc, c_work, env)
        stop_launcher(vm_proc, vm_work, {})
        subprocess.run([*DOCKER, "rmi", "-f", IMAGE], capture_output=True)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:7.1f} ms"

    print(f"container_start: {args.runs} runs each, interleaved; container {IMAGE}, VM {guest.name} (TCG)")
    for name, times in (("container", container_times), ("vm", vm_times)):
        print(f"  {name:<9} START→running p50 {ms(percentile(times, 0.5))}  p95 {ms(percentile(times, 0.95))}")
    medians = {name: statistics.median(values) for name, values in steps.items()}
    print("  container steps (median ms): " + "  ".join(f"{name} {medians[name]:.0f}" for name in steps))
    if args.json:
        print(json.dumps({"runs": args.runs,
                          "container_running_p50_s": round(statistics.median(container_times), 4),
                          "container_running_p95_s": round(percentile(container_times, 0.95), 4),
                          "vm_running_p50_s": round(statistics.median(vm_times), 4),
                          "vm_running_p95_s": round(percentile(vm_times, 0.95), 4),
                          "container_steps_ms": medians}))


if __name__ == "__main__":
    main()
