"""The fake VM process of the simulation virtualizer (``mode: process``).

Run as ``python -m virtualizers.simulation.simvm --uuid U --dir INSTANCE_DIR [...]``, it detaches the way
``qemu -daemonize`` does, so that the VM outlives the launcher that started it:

1. The process the launcher started forks. The child (the VM from now on) calls ``setsid()`` to leave the
   launcher's session, points its stdio away from the launcher's pipes, and atomically writes its pid to
   ``INSTANCE_DIR/vm.pid``. Only then does the first process exit 0 (1 if the VM could not get that far, with
   the reason on stderr), so a launcher that saw exit status 0 can rely on the pidfile.
2. The VM, reparented to init, "boots": it appends ``booting`` to ``INSTANCE_DIR/vm-console.log``, and after
   ``--boot-delay`` seconds touches ``INSTANCE_DIR/vm.up`` and logs ``up``.
3. It then idles until SIGTERM, which it treats as the ACPI power button: it logs ``shutdown requested``,
   takes ``--stop-delay`` seconds to shut down, removes ``vm.up``, logs ``powered off`` and exits 0. With
   ``--crash-after S`` it instead dies with status 1 (logging ``crashed``) S seconds after coming up, unless
   it was powered off first.

The uuid is on the command line so that whoever reads the pidfile can check that the pid still belongs to
this instance's VM and has not been reused. Standard library only: this runs as a separate interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from datetime import UTC, datetime

PIDFILE = "vm.pid"
UP_FILE = "vm.up"
CONSOLE_LOG = "vm-console.log"
_READY = b"ok"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m virtualizers.simulation.simvm",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--uuid", required=True, help="instance uuid (lets the launcher recognise this VM)")
    parser.add_argument("--dir", required=True, help="instance directory (pidfile, console log, vm.up)")
    parser.add_argument("--boot-delay", type=float, default=0.0, help="seconds until the VM is up")
    parser.add_argument("--stop-delay", type=float, default=0.0, help="seconds a graceful shutdown takes")
    parser.add_argument("--crash-after", type=float, default=None, help="die with status 1 this long after up")
    return parser.parse_args(argv)


def _log(message: str) -> None:
    """One line on the fake serial console (our stdout, appended to vm-console.log)."""
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    print(f"{stamp} {message}", flush=True)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _detach(instance_dir: str) -> None:
    """Become the VM: own session, stdio off the launcher's pipes, pidfile written atomically."""
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDONLY)
    console = os.open(os.path.join(instance_dir, CONSOLE_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(console, 1)
    os.dup2(console, 2)  # tracebacks land on the console, where an operator looks
    os.close(devnull)
    os.close(console)
    _remove(os.path.join(instance_dir, UP_FILE))  # left over by an earlier VM that was killed
    tmp = os.path.join(instance_dir, f".{PIDFILE}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, os.path.join(instance_dir, PIDFILE))


def _power_button_within(timeout: float | None) -> bool:
    """Wait up to `timeout` seconds (None: forever) for SIGTERM; True if it came."""
    if timeout is None:
        signal.sigwait({signal.SIGTERM})
        return True
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if signal.sigtimedwait({signal.SIGTERM}, left) is not None:
            return True
    return False


def _run(args: argparse.Namespace, instance_dir: str) -> int:
    """The VM's life after detaching; returns its exit status."""
    up_file = os.path.join(instance_dir, UP_FILE)
    _log(f"booting {args.uuid}")
    if not _power_button_within(args.boot_delay):
        open(up_file, "w").close()
        _log("up")
        if not _power_button_within(args.crash_after):
            _remove(up_file)
            _log("crashed")
            return 1
    _log("shutdown requested")
    time.sleep(args.stop_delay)
    _remove(up_file)
    _log("powered off")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    instance_dir = os.path.abspath(args.dir)
    ready_r, ready_w = os.pipe()
    if os.fork() != 0:
        # The process the launcher waits for: exit once the VM has written its pidfile (or failed to).
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            report = ready.read()
        if report == _READY:
            return 0
        sys.stderr.write(report.decode(errors="replace") or "simvm: the VM process died while starting\n")
        return 1
    os.close(ready_r)
    # SIGTERM stays blocked for the VM's whole life and is taken with sigwait, so one arriving before the
    # VM waits for it is queued, not fatal. (Blocked here, not before the fork: the launcher may SIGTERM
    # the first process to abandon a start.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        _detach(instance_dir)
    except OSError as exc:
        os.write(ready_w, f"simvm: cannot start the VM in {instance_dir}: {exc}\n".encode())
        os._exit(1)
    os.write(ready_w, _READY)
    os.close(ready_w)
    # os._exit: the forked VM must not run the parent's cleanup handlers a second time.
    os._exit(_run(args, instance_dir))


if __name__ == "__main__":
    sys.exit(main())
