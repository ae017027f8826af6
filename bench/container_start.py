"""START → running latency of a container (docker virtualizer) beside a VM (qemu), on one launcher.

    .venv/bin/python bench/container_start.py [--runs 20] [--json]

One real `launcher serve` with `virtualizers: [qemu, docker]` (the Docker Engine of `.ci/docker-up`, libvirtd of
`.ci/libvirt-up`). Each round, interleaved (alternating which goes first): a START of a container
(`vm_type: docker`, the busybox-static image of tests/guest/container.py, its `runcmd` a long sleep, with its
MAC and address on the engine network `launcher-test`, made if missing, as the tests use it) and a
START of a VM (`vm_type: qemu`, the tiny test guest of tests/guest/build.py, legacy firmware), each
`POST /v1/instances?wait=1` timed until the launcher answers `running`; then each is deleted (not timed). The
first round of each (image load into the engine, image import into the qemu store) is a warm-up, not counted.

"running" is the launcher's: for a VM, the domain runs (not: the guest has booted); for a container, the engine
reports its process started. Prints p50/p95 of both and their ratio; with --json the last line is one JSON
object: runs, container_running_p50_s, vm_running_p50_s, their p95s and the ratio of the medians. Not a test:
the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from bench_launcher import ROOT, percentile, start_launcher, stop_launcher, work_dir
from build import ensure_guest_image  # tests/guest/build.py (bench_launcher put it on sys.path)
from container import ensure_rootfs  # tests/guest/container.py

from launcher.cli.client import Client

VM_IMAGE_ID = "bench-guest"
CONTAINER_IMAGE = "launcher-bench/busybox:1"  # found as <image_dir>/launcher-bench/busybox/1.rootfs.tar
CONTAINER_USER_DATA = "#cloud-config\nruncmd:\n  - [sleep, '3600']\n"
NETWORK, SUBNET = "launcher-test", "172.31.250.0/24"  # tests/docker_support.py's
DOCKER = ["docker", "-H", "unix:///run/docker.sock"]


def engine_network() -> None:
    """The engine network the containers join (a bridge with a subnet, no NAT), made if it is missing."""
    if subprocess.run([*DOCKER, "network", "inspect", NETWORK], capture_output=True).returncode != 0:
        subprocess.run([*DOCKER, "network", "create", "--driver", "bridge", "--subnet", SUBNET, NETWORK],
                       check=True, capture_output=True, timeout=60)


def prepare(work: Path) -> Path:
    """The VM image dir and the container image dir under `work`; the launcher's config file."""
    vm_images = work / "vm-images"
    vm_images.mkdir()
    (vm_images / f"{VM_IMAGE_ID}.qcow2").symlink_to(ensure_guest_image(ROOT / ".cache" / "guest"))
    container_images = work / "container-images" / "launcher-bench" / "busybox"
    container_images.mkdir(parents=True)
    shutil.copyfile(ensure_rootfs(), container_images / "1.rootfs.tar")
    config = work / "launcher.yaml"
    config.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "virtualizers": ["qemu", "docker"],
        "qemu": {"image_dirs": [str(vm_images)]},
        "docker": {"image_dir": str(work / "container-images"), "network": NETWORK},
        "admission": {"vcpu_overcommit": 64.0},
    }))
    return config


def start_body(uuid: str, kind: str) -> bytes:
    start: dict[str, Any] = {"instance_uuid": uuid, "vm_type": kind, "requirements": {"vcpus": 1, "mem_mb": 128}}
    if kind == "docker":
        n = int(uuid[1:8], 16)
        start["docker_image"] = CONTAINER_IMAGE
        start["networking"] = {"vnic_mac": f"02:42:be:00:{n >> 8 & 255:02x}:{n & 255:02x}", "subnet": SUBNET,
                               "private_ip": f"172.31.250.{200 + n % 50}"}
        return json.dumps({"start": start, "user_data": CONTAINER_USER_DATA}).encode()
    start.update(image_uuid=VM_IMAGE_ID, fw_type="legacy")
    return json.dumps({"start": start}).encode()


def timed_start(client: Client, uuid: str, kind: str) -> float:
    """One START → running, timed; then the instance is deleted (not timed)."""
    body = start_body(uuid, kind)
    started = time.perf_counter()
    answer = client.request("POST", "/v1/instances", body, "application/json", wait=1, timeout=120)
    elapsed = time.perf_counter() - started
    if answer.get("state") != "running":
        raise SystemExit(f"{kind} START did not reach running: {answer}")
    client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()

    work = work_dir("containers-")
    engine_network()
    config = prepare(work)
    proc, client = start_launcher(work, config)
    times: dict[str, list[float]] = {"docker": [], "qemu": []}
    try:
        timed_start(client, "c0000000-0000-4000-8000-000000000000", "docker")  # warm-up: image into the engine
        timed_start(client, "a0000000-0000-4000-8000-000000000000", "qemu")  # warm-up: image into the store
        for n in range(args.runs):
            order = ("docker", "qemu") if n % 2 == 0 else ("qemu", "docker")
            for kind in order:
                uuid = f"{'c' if kind == 'docker' else 'a'}{n + 1:07x}-0000-4000-8000-000000000000"
                times[kind].append(timed_start(client, uuid, kind))
    finally:
        stop_launcher(proc, work, config)

    figures = {
        "runs": args.runs,
        "container_running_p50_s": round(statistics.median(times["docker"]), 4),
        "container_running_p95_s": round(percentile(times["docker"], 0.95), 4),
        "vm_running_p50_s": round(statistics.median(times["qemu"]), 4),
        "vm_running_p95_s": round(percentile(times["qemu"], 0.95), 4),
    }
    figures["vm_to_container_p50_ratio"] = round(figures["vm_running_p50_s"] / figures["container_running_p50_s"], 2)
    print(f"container_start: {args.runs} runs each, interleaved, one launcher with qemu and docker")
    for label in ("container", "vm"):
        print(f"  {label:<9} START→running p50 {figures[f'{label}_running_p50_s'] * 1000:7.1f} ms  "
              f"p95 {figures[f'{label}_running_p95_s'] * 1000:7.1f} ms")
    print(f"  VM / container p50: {figures['vm_to_container_p50_ratio']:.2f}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
