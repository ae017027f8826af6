"""Warm starts: START → `running` and START → guest-ready of the cold, pool and template paths, on one launcher.

    .venv/bin/python bench/warm_start.py [--runs 10] [--paths cold,pool,template] [--json]

One real `launcher serve` with the qemu virtualizer (libvirtd of `.ci/libvirt-up`) and the test guest of
tests/guest/build.py (legacy firmware, 1 vCPU), configured with a prepared pool and a template of two different
memory sizes, so that the START's shape picks its path:

- cold: 128 MiB, which no pool or template has: overlay, seed, define, start, then the guest boots;
- pool: 256 MiB, the pool's shape (`qemu.pools`, size 2): a slot held before its firmware runs is claimed;
- template: 192 MiB, the template's shape (`qemu.templates`): a clone of the booted template is restored and
  re-identified.

Each round runs one START of each path, the order rotating from round to round: `POST /v1/instances?wait=1`
timed until the launcher answers `running`, then the instance's console.log read every 10 ms until the guest's
`guest-ready` line carries this START's instance-id (a clone prints its template's first, then its own once
re-identified). The line's instance-id and hostname must be the START's, and GET /v1/instances/{uuid} must say the
path it was meant to take; a line with another instance's identity counts in `identity_mismatches`. Each
instance is then deleted (not timed), and the next pool START waits until the pool is full again. A first round
(the image import, the template's boot and save) is a warm-up and is not counted.

Prints p50/p95 of each figure and the ratios to cold; with --json the last line is one JSON object with runs,
`<path>_running_p50_s`, `<path>_ready_p50_s` (and p95s) for each path, the ratios and `identity_mismatches`.
Not a test: the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import yaml
from bench_launcher import ROOT, percentile, start_launcher, stop_launcher, work_dir
from build import ensure_guest_image  # tests/guest/build.py (bench_launcher put it on sys.path)

from launcher.cli.client import Client

IMAGE_ID = "bench-guest"
PATHS = ("cold", "pool", "template")
MEM_MB = {"cold": 128, "pool": 256, "template": 192}  # the shape picks the path
READY_TIMEOUT_S = 300.0
READY_RE = re.compile(r"guest-ready (.*)")
STEP_RE = re.compile(r"step (?:overlay|seed|define|start|claim|resume|persist|clone): .*")  # the instance log's


def prepare(work: Path, paths: tuple[str, ...]) -> Path:
    """The image dir and the launcher's config file, with the pool and the template the paths need."""
    images = work / "images"
    images.mkdir()
    (images / f"{IMAGE_ID}.qcow2").symlink_to(ensure_guest_image(ROOT / ".cache" / "guest"))
    shape = {"image_uuid": IMAGE_ID, "vcpus": 1, "fw_type": "legacy"}
    qemu: dict[str, Any] = {"image_dirs": [str(images)]}
    if "pool" in paths:
        qemu["pools"] = [{**shape, "mem_mb": MEM_MB["pool"], "size": 2}]
    if "template" in paths:
        qemu["templates"] = [{**shape, "mem_mb": MEM_MB["template"]}]
    config = work / "launcher.yaml"
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "virtualizer": "qemu", "qemu": qemu,
                                      "admission": {"vcpu_overcommit": 64.0}}))
    return config


def start_body(uuid: str, path: str) -> bytes:
    start = {"instance_uuid": uuid, "image_uuid": IMAGE_ID, "fw_type": "legacy",
             "requirements": {"vcpus": 1, "mem_mb": MEM_MB[path]}}
    meta = {"uuid": uuid, "hostname": f"h{uuid[:8]}"}
    return json.dumps({"start": start, "meta_data": meta}).encode()


def ready_line(console: Path, uuid: str) -> dict[str, str] | None:
    """The first guest-ready line of `console` with instance-id `uuid`, or, if the guest printed one with another
    identity after the lines its template may have left, that one; None if there is none yet."""
    try:
        text = console.read_text(errors="replace")
    except FileNotFoundError:
        return None
    for match in READY_RE.finditer(text):
        fields = dict(re.findall(r"(\S+?)=(\S*)", match.group(1)))
        if fields.get("instance-id") == uuid:
            return fields
    return None


def pool_full(client: Client) -> bool:
    pools = client.request("GET", "/v1/node")["warm_pools"].get("qemu", [])
    return all(pool["ready"] == pool["size"] for pool in pools)


def wait_warm(client: Client) -> None:
    """Until the pools are full and the templates built (the template's first boot and save are no run's)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        node = client.request("GET", "/v1/node")
        if pool_full(client) and all(t["built"] for t in node["warm_templates"].get("qemu", [])):
            return
        time.sleep(0.5)
    raise SystemExit(f"the pool or the template was not ready in {READY_TIMEOUT_S:g} s: {node}")


def timed_start(client: Client, data_dir: Path, uuid: str, path: str) -> tuple[float, float, int]:
    """One START: (seconds to running, seconds to its guest-ready line, identity mismatches); then deleted."""
    if path == "pool":
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not pool_full(client) and time.monotonic() < deadline:
            time.sleep(0.1)
    started = time.perf_counter()
    answer = client.request("POST", "/v1/instances", start_body(uuid, path), "application/json", wait=1,
                            timeout=READY_TIMEOUT_S)
    running = time.perf_counter() - started
    if answer.get("state") != "running":
        raise SystemExit(f"{path} START did not reach running: {answer}")
    console = data_dir / "instances" / uuid / "console.log"
    fields = None
    while fields is None and time.perf_counter() - started < READY_TIMEOUT_S:
        fields = ready_line(console, uuid)
        time.sleep(0.01)
    ready = time.perf_counter() - started
    if fields is None:
        raise SystemExit(f"{path} START {uuid}: no guest-ready line with its identity in {READY_TIMEOUT_S:g} s")
    taken = client.request("GET", f"/v1/instances/{uuid}")["start_path"]
    if taken != path:
        raise SystemExit(f"START {uuid} took the {taken} path, not {path}")
    mismatches = int(fields.get("hostname") != f"h{uuid[:8]}")
    log = b"".join(client.stream(f"/v1/instances/{uuid}/log", read_timeout=10)).decode()
    for step in STEP_RE.finditer(log):
        print(f"    {path} {uuid[:8]}: {step.group(0)}")
    client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)
    return running, ready, mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--paths", default=",".join(PATHS), help="which of cold, pool, template to run")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    paths = tuple(p for p in PATHS if p in args.paths.split(","))

    work = work_dir("warm-")
    config = prepare(work, paths)
    proc, client = start_launcher(work, config)
    running: dict[str, list[float]] = {path: [] for path in paths}
    ready: dict[str, list[float]] = {path: [] for path in paths}
    mismatches = 0
    try:
        wait_warm(client)
        for n in range(args.runs + 1):
            for path in paths[n % len(paths):] + paths[:n % len(paths)]:
                uuid = f"{PATHS.index(path) + 10:02x}{n:06x}-0000-4000-8000-000000000000"
                seconds_running, seconds_ready, wrong = timed_start(client, work / "data", uuid, path)
                mismatches += wrong
                if n > 0:  # round 0 is the warm-up
                    running[path].append(seconds_running)
                    ready[path].append(seconds_ready)
    finally:
        stop_launcher(proc, work, config)

    figures: dict[str, Any] = {"runs": args.runs}
    for path in paths:
        for label, values in (("running", running[path]), ("ready", ready[path])):
            figures[f"{path}_{label}_p50_s"] = round(statistics.median(values), 4)
            figures[f"{path}_{label}_p95_s"] = round(percentile(values, 0.95), 4)
    for path in paths:
        if path != "cold" and "cold" in paths:
            for label in ("running", "ready"):
                figures[f"{path}_{label}_ratio"] = round(figures[f"{path}_{label}_p50_s"]
                                                         / figures[f"cold_{label}_p50_s"], 3)
    figures["identity_mismatches"] = mismatches
    print(f"warm_start: {args.runs} runs of each path, interleaved, one launcher (qemu, the test guest)")
    for path in paths:
        ratios = "" if path == "cold" else (f"   ×{figures.get(f'{path}_running_ratio', '-')} / "
                                            f"×{figures.get(f'{path}_ready_ratio', '-')} of cold")
        print(f"  {path:<8} START→running p50 {figures[f'{path}_running_p50_s'] * 1000:8.1f} ms   "
              f"START→guest-ready p50 {figures[f'{path}_ready_p50_s']:7.2f} s{ratios}")
    print(f"  identity mismatches: {mismatches}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
