"""ATTACH / DETACH latency on a running guest (qemu virtualizer, the test guest), against bare libvirt.

    .venv/bin/python bench/volume_hotplug.py [--runs 10] [--json]

One instance of the example payload (configs/examples/start_legacy.yaml) runs on a real `launcher serve`; two
volumes of 64 MiB are made through /v1/volumes. Each round, interleaved (alternating which goes first):
- launcher: `POST /v1/instances/{uuid}/volumes/{a}?wait=1`, timed until it answers, and until the guest prints
  the `guest-disks` line that shows the disk (it polls every 0.2 s); then `DELETE …?wait=1`, timed until it
  answers (the guest has let go of the disk by then: the launcher waits for libvirt to drop it);
- bare: volume b's disk (the same `<disk>` element, virtualizers.qemu.domain) attached to the same domain with
  libvirt-python's attachDeviceFlags, then detachDeviceFlags and a poll of the live XML until it is gone (the
  launcher's own wait, every `UNPLUG_POLL_S`).

Prints the median (and the largest) of each and the launcher/bare ratios; `--json` prints them as one JSON object:
{"runs", "attach_s", "attach_seen_by_guest_s", "detach_s", "bare_attach_s", "bare_detach_s", "ratio_attach",
"ratio_detach"}, each figure {"p50", "max"} in seconds (ratios: of the medians). The launcher's ATTACH also
looks the volume up in its pool, reads the live XML for a free target and writes the instance's record (fsync).
Needs what `bash .ci/install` sets up (libvirtd running). Not a test: the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import libvirt

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "guest"), str(ROOT / "bench")]

from build import ensure_guest_image  # noqa: E402  (tests/guest/build.py)
from start_latency import EXAMPLE, start_launcher, stop_launcher, work_dir  # noqa: E402

from launcher.cli.client import Client  # noqa: E402
from launcher.transport.payloads import parse_start  # noqa: E402
from virtualizers.qemu import domain  # noqa: E402
from virtualizers.qemu.virtualizer import UNPLUG_POLL_S  # noqa: E402

VOLUME_A, VOLUME_B = "0b0b0b0b-0000-4000-8000-00000000000a", "0b0b0b0b-0000-4000-8000-00000000000b"
BOOT_TIMEOUT_S = 300.0
POLL_S = 0.02


def wait_console(console: Path, marker: str, timeout: float = 60.0) -> None:
    """Wait until `marker` is on the console."""
    deadline = time.monotonic() + timeout
    while marker not in (console.read_text(errors="replace") if console.exists() else ""):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {marker!r} on the console within {timeout:g} s")
        time.sleep(POLL_S)


def wait_guest_disk(console: Path, volume: str, present: bool, timeout: float = 60.0) -> float:
    """Wait until the guest's last `guest-disks` line shows (or, `present` False, no longer shows) the volume's
    serial; the time.perf_counter() when it did."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in console.read_text(errors="replace").splitlines() if "guest-disks " in line]
        if lines and (f":{volume[:20]}" in lines[-1].split("marks=")[0]) == present:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise SystemExit(f"the guest did not {'show' if present else 'drop'} {volume} within {timeout:g} s")
        time.sleep(POLL_S)


def launcher_round(client: Client, uuid: str, console: Path) -> tuple[float, float, float]:
    """(attach answered, guest saw the disk, detach answered), in seconds."""
    started = time.perf_counter()
    answer = client.request("POST", f"/v1/instances/{uuid}/volumes/{VOLUME_A}", wait=1, timeout=120)
    attached = time.perf_counter() - started
    seen = wait_guest_disk(console, VOLUME_A, True) - started
    if answer.get("state") != "running":
        raise SystemExit(f"ATTACH did not answer running: {answer}")
    started = time.perf_counter()
    answer = client.request("DELETE", f"/v1/instances/{uuid}/volumes/{VOLUME_A}", wait=1, timeout=120)
    detached = time.perf_counter() - started
    if answer.get("state") != "running":
        raise SystemExit(f"DETACH did not answer running: {answer}")
    wait_guest_disk(console, VOLUME_A, False)  # the guest's line, so that the next round starts from a quiet guest
    return attached, seen, detached


def bare_round(dom: libvirt.virDomain, disk_xml: str, console: Path) -> tuple[float, float]:
    """(attach, detach until the live XML has no such disk), in seconds, with libvirt-python only: the same
    poll as the launcher's (`UNPLUG_POLL_S`)."""
    started = time.perf_counter()
    dom.attachDeviceFlags(disk_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    attached = time.perf_counter() - started
    wait_guest_disk(console, VOLUME_B, True)  # as for the launcher: detach a disk the guest has
    started = time.perf_counter()
    dom.detachDeviceFlags(disk_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    deadline = time.monotonic() + 60
    while domain.find_volume_disk(dom.XMLDesc(0), VOLUME_B) is not None:
        if time.monotonic() > deadline:
            raise SystemExit("bare detach: the disk is still there after 60 s")
        time.sleep(UNPLUG_POLL_S)
    detached = time.perf_counter() - started
    wait_guest_disk(console, VOLUME_B, False)
    return attached, detached


def figures(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 4), "max": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()

    image = ensure_guest_image(ROOT / ".cache" / "guest")
    payload = EXAMPLE.read_bytes()
    spec = parse_start(payload, "application/yaml", max_bytes=1 << 20).spec
    work = work_dir("hotplug-", image, spec.image_uuid)
    proc, client = start_launcher(work, work / "images")
    times: dict[str, list[float]] = {name: [] for name in ("attach", "seen", "detach", "bare_attach", "bare_detach")}
    try:
        for volume in (VOLUME_A, VOLUME_B):
            client.request("POST", "/v1/volumes", json.dumps({"id": volume, "size_mb": 64}).encode(),
                           "application/json")
        client.request("POST", "/v1/instances", payload, "application/yaml", wait=1, timeout=120)
        console = work / "data" / "instances" / spec.instance_uuid / "console.log"
        wait_console(console, "guest-ready ", BOOT_TIMEOUT_S)
        dom = libvirt.open("qemu:///system").lookupByName(domain.domain_name(spec.instance_uuid))
        path = client.request("GET", f"/v1/volumes/{VOLUME_B}")["path"]
        disk_xml = domain.volume_disk_xml(domain.VolumeDisk(Path(path), "qcow2", VOLUME_B), "vdz")
        for n in range(args.runs):
            if n % 2:  # alternate which goes first
                attached, detached = bare_round(dom, disk_xml, console)
                times["bare_attach"].append(attached)
                times["bare_detach"].append(detached)
            attached, seen, detached = launcher_round(client, spec.instance_uuid, console)
            times["attach"].append(attached)
            times["seen"].append(seen)
            times["detach"].append(detached)
            if not n % 2:
                attached, detached = bare_round(dom, disk_xml, console)
                times["bare_attach"].append(attached)
                times["bare_detach"].append(detached)
    finally:
        stop_launcher(proc, work)

    result: dict[str, Any] = {
        "runs": args.runs,
        "attach_s": figures(times["attach"]),
        "attach_seen_by_guest_s": figures(times["seen"]),
        "detach_s": figures(times["detach"]),
        "bare_attach_s": figures(times["bare_attach"]),
        "bare_detach_s": figures(times["bare_detach"]),
        "ratio_attach": round(statistics.median(times["attach"]) / statistics.median(times["bare_attach"]), 2),
        "ratio_detach": round(statistics.median(times["detach"]) / statistics.median(times["bare_detach"]), 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"volume_hotplug: {args.runs} rounds each, interleaved, TCG guest {image.name}")
    for label, key in (("launcher ATTACH answered", "attach_s"), ("  … guest shows the disk", "attach_seen_by_guest_s"),
                       ("launcher DETACH answered", "detach_s"), ("bare attachDeviceFlags", "bare_attach_s"),
                       ("bare detach until gone", "bare_detach_s")):
        print(f"  {label:<26} p50 {result[key]['p50'] * 1000:8.1f} ms   max {result[key]['max'] * 1000:8.1f} ms")
    print(f"  ratio launcher/bare (p50): attach {result['ratio_attach']:.2f}  detach {result['ratio_detach']:.2f}")


if __name__ == "__main__":
    main()
