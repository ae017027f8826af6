"""What the benchmarks that run a real `launcher serve` share: a work dir QEMU can reach, the launcher process
started on a config and stopped with everything it made, and percentiles.

Imported by the scripts of bench/ (which put bench/ on sys.path by being run from it); not a benchmark itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "guest"), str(ROOT / "tests")]

from libvirt_cleanup import remove_pools_under  # noqa: E402  (tests/libvirt_cleanup.py)

from launcher.cli.client import Client  # noqa: E402

WORK_ROOT = Path("/var/tmp/launcher-bench")  # QEMU runs as libvirt-qemu: it must reach these files


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def work_dir(prefix: str) -> Path:
    """A fresh dir under WORK_ROOT, which QEMU (another user) may enter."""
    WORK_ROOT.mkdir(mode=0o711, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK_ROOT))
    work.chmod(0o711)
    return work


def start_launcher(work: Path, config: Path, timeout_s: float = 60.0) -> tuple[subprocess.Popen[bytes], Client]:
    """`launcher serve --config config` on the data dir `work`/data (made here), its output in `work`/serve.log;
    the process and a client once it serves."""
    data_dir = work / "data"
    data_dir.mkdir(mode=0o711)
    log = open(work / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--config", str(config),
                             "--data-dir", str(data_dir)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + timeout_s
    while not (data_dir / "api-url").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"launcher did not start:\n{(work / 'serve.log').read_text()}")
        time.sleep(0.05)
    return proc, Client.discover(None, data_dir)


def stop_launcher(proc: subprocess.Popen[bytes], work: Path, config: Path) -> None:
    """Stop the launcher of `start_launcher`, destroy what it left (`launcher hard-reset`: domains, containers,
    slots), remove its volume pool (which hard-reset leaves, as it must for a real node) and `work`."""
    proc.terminate()
    proc.wait(timeout=30)
    subprocess.run([sys.executable, "-m", "launcher.cli", "hard-reset", "--yes", "--config", str(config),
                    "--data-dir", str(work / "data")], cwd=ROOT, capture_output=True, timeout=120)
    remove_pools_under(work)
    shutil.rmtree(work, ignore_errors=True)
