"""Do the power-cut tests bite? Make fsyncs no-ops and run them: each variant must fail.

    python tests/powercut_bite.py WORKTREE [PYTEST_ARGS...]

WORKTREE is a scratch git worktree of this repository (`git worktree add /tmp/bite HEAD`): its files are edited
and restored with `git checkout`. Each call of ``os.fsync`` or ``os.fdatasync`` in its ``launcher/`` and
``virtualizers/`` is made a no-op, all together and then one at a time, and the launcher's syncfs once; for each
variant pytest runs (``-m powercut`` unless PYTEST_ARGS say otherwise) and one line says whether it failed. A
variant that passes is a call the tests do not prove needed: either it is redundant, or a test is missing.
`SITES=persist.py:161,files.py` limits the run to the calls at those places (file name, optionally ``:line``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

CALL = re.compile(r"\bos\.f(?:data)?sync\b")
NO_OP = "(lambda _fd: None)"
SYNCFS_CALL = "        if _libc.syncfs(fd) != 0:"


def sync_calls(tree: Path) -> list[tuple[Path, int]]:
    """(file, line number) of every fsync/fdatasync call in code (not in comments or docstrings)."""
    found = []
    for path in sorted([*tree.glob("launcher/**/*.py"), *tree.glob("virtualizers/**/*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if CALL.search(code) and not code.strip().startswith(('"', "'")) and "`" not in code:
                found.append((path, number))
    return found


def restore(tree: Path) -> None:
    subprocess.run(["git", "checkout", "--", "launcher", "virtualizers"], cwd=tree, check=True)


def make_no_ops(calls: list[tuple[Path, int]]) -> None:
    for path, number in calls:
        lines = path.read_text().splitlines(keepends=True)
        lines[number - 1] = CALL.sub(NO_OP, lines[number - 1])
        path.write_text("".join(lines))


def run_tests(tree: Path, pytest_args: list[str], name: str) -> None:
    """Run pytest in `tree` and print whether the variant `name` was caught, with the first failure."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args],
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    first = [line for line in done.stdout.splitlines() if line.startswith(("E ", "FAILED"))][:2]
    verdict = "caught" if done.returncode else "NOT CAUGHT"
    print(f"{name}: {verdict} {' | '.join(first)[:300]}", flush=True)


def main() -> None:
    tree = Path(sys.argv[1]).resolve()
    pytest_args = sys.argv[2:] or ["-m", "powercut"]
    calls = sync_calls(tree)
    only = [place for place in os.environ.get("SITES", "").split(",") if place]
    if only:
        calls = [(path, number) for path, number in calls
                 if any(f"{path.name}:{number}" == place or path.name == place for place in only)]
    else:
        make_no_ops(calls)
        run_tests(tree, pytest_args, "every fsync and fdatasync a no-op")
    try:
        for path, number in calls:
            restore(tree)
            make_no_ops([(path, number)])
            line = path.read_text().splitlines()[number - 1].strip()
            run_tests(tree, pytest_args, f"{path.relative_to(tree)}:{number} {line[:60]}")
        if not only:
            restore(tree)
            persist = tree / "launcher" / "durable" / "persist.py"
            persist.write_text(persist.read_text().replace(SYNCFS_CALL, "        if False:"))
            run_tests(tree, pytest_args, "syncfs a no-op")
    finally:
        restore(tree)


if __name__ == "__main__":
    main()
