"""START → running latency of the launcher (qemu virtualizer) against bare libvirt, on the test guest.

    .venv/bin/python bench/start_latency.py [--runs 20]

Each round, interleaved (alternating which goes first):
- launcher: `POST /v1/instances?wait=1` of the example payload (configs/examples/start_legacy.yaml) to a real
  `launcher serve`, timed until it answers `running` (image check, overlay, seed, define, start, monitor);
  then the instance is deleted (not timed). Its per-step times come from the instance's launcher.log.
- bare: the same domain XML (virtualizers.qemu.domain, same image, same overlay and seed made beforehand, not
  timed) defined and started with libvirt-python directly, timed until `create()` returns; then destroyed
  and undefined.

Prints p50/p95 of both, their ratio (target ≤ 1.25) and the median of each launcher step (target: overlay +
seed ≤ 30 ms). Needs what `bash .ci/install` sets up (libvirtd running). Not a test: the machine is noisy.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "guest"), str(ROOT / "tests")]

from build import ensure_guest_image  # noqa: E402  (tests/guest/build.py)
from libvirt_cleanup import remove_pools_under  # noqa: E402  (tests/libvirt_cleanup.py)

from launcher.cli.client import Client  # noqa: E402
from launcher.transport.payloads import parse_start  # noqa: E402
from virtualizers.qemu import cloudinit, domain  # noqa: E402

EXAMPLE = ROOT / "configs" / "examples" / "start_legacy.yaml"
WORK_ROOT = Path("/var/tmp/launcher-bench")  # QEMU runs as libvirt-qemu: it must reach these files
STEPS = ("image", "overlay", "seed", "define", "start")
STEP_RE = re.compile(r"step (\w+): .* in (\d+) ms")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_launcher(work: Path, image_dir: Path) -> tuple[subprocess.Popen[bytes], Client]:
    data_dir = work / "data"
    data_dir.mkdir(mode=0o711)
    config = work / "launcher.yaml"
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "virtualizer": "qemu",
                                      "qemu": {"image_dirs": [str(image_dir)]}}))
    log = open(work / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--config", str(config),
                             "--data-dir", str(data_dir)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (data_dir / "api-url").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"launcher did not start:\n{(work / 'serve.log').read_text()}")
        time.sleep(0.05)
    return proc, Client.discover(None, data_dir)


def work_dir(prefix: str, image: Path, image_id: str) -> Path:
    """A fresh dir under WORK_ROOT (which QEMU may enter) with `images/<image_id>.qcow2` linked to `image`."""
    WORK_ROOT.mkdir(mode=0o711, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK_ROOT))
    work.chmod(0o711)
    (work / "images").mkdir()
    (work / "images" / f"{image_id}.qcow2").symlink_to(image)
    return work


def stop_launcher(proc: subprocess.Popen[bytes], work: Path) -> None:
    """Stop the launcher of `start_launcher`, destroy its VMs (`launcher hard-reset`), remove its volume pool (which
    hard-reset leaves, as it must for a real node) and `work`."""
    proc.terminate()
    proc.wait(timeout=30)
    subprocess.run([sys.executable, "-m", "launcher.cli", "hard-reset", "--yes", "--config",
                    str(work / "launcher.yaml"), "--data-dir", str(work / "data")], cwd=ROOT,
                   capture_output=True, timeout=120)
    remove_pools_under(work)
    shutil.rmtree(work, ignore_errors=True)


def launcher_round(client: Client, payload: bytes, uuid: str) -> tuple[float, dict[str, int]]:
    started = time.perf_counter()
    answer = client.request("POST", "/v1/instances", payload, "application/yaml", wait=1, timeout=120)
    elapsed = time.perf_counter() - started
    if answer.get("state") != "running":
        raise SystemExit(f"START did not reach running: {answer}")
    log = b"".join(client.stream(f"/v1/instances/{uuid}/log", read_timeout=10)).decode()
    steps = {name: int(ms) for name, ms in STEP_RE.findall(log)}
    client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)
    return elapsed, steps


def bare_setup(work: Path, image: Path, payload: bytes) -> str:
    """The overlay, seed and domain XML of a bare instance (same image, same XML builder); its XML."""
    spec = parse_start(payload, "application/yaml", max_bytes=1 << 20).spec
    instance_dir = work / "bare"
    instance_dir.mkdir(mode=0o711)
    overlay = instance_dir / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(overlay)],
                   check=True)
    seed = cloudinit.make_seed("nocloud", spec.instance_uuid, spec.user_data, spec.meta_data, spec.networking)
    cloudinit.write_seed(seed, instance_dir / "seed.iso")
    params = domain.DomainParams(
        instance_uuid="bare0000-0000-4000-8000-000000000000", data_dir=work,
        vcpus=spec.vcpus or 1, mem_mb=spec.mem_mb or 256, kvm=False, machine="q35",
        firmware=domain.Firmware(efi=False), overlay=overlay, seed=instance_dir / "seed.iso",
        network_kind="network", network_source="default", mac="02:00:00:be:4e:01",
        console_log=instance_dir / "console.log", nvram=instance_dir / "nvram.fd")
    return domain.domain_xml(params)


def bare_round(conn: libvirt.virConnect, xml: str) -> float:
    started = time.perf_counter()
    dom = conn.defineXML(xml)
    dom.create()
    elapsed = time.perf_counter() - started
    dom.destroy()
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    image = ensure_guest_image(ROOT / ".cache" / "guest")
    payload = EXAMPLE.read_bytes()
    spec = parse_start(payload, "application/yaml", max_bytes=1 << 20).spec
    uuid = spec.instance_uuid
    work = work_dir("run-", image, spec.image_uuid)
    proc, client = start_launcher(work, work / "images")
    conn = libvirt.open("qemu:///system")
    try:
        xml = bare_setup(work, image, payload)
        launcher_round(client, payload, uuid)  # warm-up: imports the image into the store
        bare_round(conn, xml)
        launcher_times: list[float] = []
        bare_times: list[float] = []
        steps: dict[str, list[int]] = {name: [] for name in STEPS}
        for n in range(args.runs):
            if n % 2:  # alternate which goes first, so neither always follows the other's tear-down
                bare_times.append(bare_round(conn, xml))
            elapsed, step_ms = launcher_round(client, payload, uuid)
            launcher_times.append(elapsed)
            for name in STEPS:
                steps[name].append(step_ms.get(name, -1))
            if not n % 2:
                bare_times.append(bare_round(conn, xml))
    finally:
        stop_launcher(proc, work)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:7.1f} ms"

    print(f"start_latency: {args.runs} runs each, interleaved, TCG guest {image.name}")
    for name, times in (("launcher", launcher_times), ("bare", bare_times)):
        print(f"  {name:<9} START→running p50 {ms(percentile(times, 0.5))}  p95 {ms(percentile(times, 0.95))}")
    ratio50 = statistics.median(launcher_times) / statistics.median(bare_times)
    ratio95 = percentile(launcher_times, 0.95) / percentile(bare_times, 0.95)
    print(f"  ratio     p50 {ratio50:.2f}  p95 {ratio95:.2f}   (target: <= 1.25)")
    medians = {name: statistics.median(values) for name, values in steps.items()}
    print("  launcher steps (median ms): " + "  ".join(f"{name} {medians[name]:.0f}" for name in STEPS))
    print(f"  overlay + seed: {medians['overlay'] + medians['seed']:.0f} ms   (target: <= 30 ms)")


if __name__ == "__main__":
    main()
