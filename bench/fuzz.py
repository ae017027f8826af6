"""Fuzz the payload parser and every HTTP endpoint of a real `launcher serve` for as many cases as asked.

    .venv/bin/python bench/fuzz.py --parser 1000000 --http 200000

The cases and checks are the suite's (tests/fuzz_cases.py; tests/test_fuzz.py runs a few thousand of them):
the parser returns a command or refuses with invalid_payload / invalid_data; the launcher (simulation, memory
mode) never answers 500, never hangs (60 s per exchange), never exits, logs no traceback and writes nothing
outside its data dir. Prints the count of each outcome; the first failing case is shrunk and printed by
hypothesis, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import LauncherProcess  # noqa: E402
from fuzz_cases import CONTENT_TYPES, bodies, check_answer, check_parser_case, exchange, requests  # noqa: E402
from http_faults import address, token  # noqa: E402


def fuzz_settings(cases: int) -> settings:
    return settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def report(what: str, counts: collections.Counter[str], started: float) -> None:
    total = sum(counts.values())
    print(f"{what}: {total} cases in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{k or '-'} {v}" for k, v in counts.most_common()), flush=True)


def fuzz_parser(cases: int) -> None:
    counts: collections.Counter[str] = collections.Counter()
    started = time.monotonic()

    @fuzz_settings(cases)
    @given(body=bodies, content_type=st.sampled_from(CONTENT_TYPES))
    def case(body: bytes, content_type: str) -> None:
        counts[check_parser_case(body, content_type)] += 1
        if sum(counts.values()) % 100_000 == 0:
            report("parser (so far)", counts, started)

    case()
    report("parser", counts, started)


def fuzz_http(cases: int) -> None:
    with tempfile.TemporaryDirectory(prefix="launcher-fuzz-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        launcher = LauncherProcess(data_dir, {"admission": {"vcpu_overcommit": 64.0, "max_instances": 100_000}})
        launcher.start()
        try:
            where, secret = address(launcher), token(launcher)
            counts: collections.Counter[str] = collections.Counter()
            started = time.monotonic()

            @fuzz_settings(cases)
            @given(request=requests(secret))
            def case(request: bytes) -> None:
                counts[str(check_answer(exchange(where, request)))] += 1
                if sum(counts.values()) % 10_000 == 0:
                    report("http (so far)", counts, started)

            case()
            report("http", counts, started)
            assert launcher.proc is not None and launcher.proc.poll() is None, "the launcher exited"
            assert "Traceback" not in launcher.output(), "the launcher logged a traceback"
            outside = [p for p in Path(tmp).rglob("*") if p.is_file() and data_dir not in p.parents
                       and p not in (launcher.config_path, launcher.log_path)]
            assert not outside, f"files outside the data dir: {outside}"
        finally:
            launcher.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parser", type=int, default=100_000, help="parser cases (default 100000)")
    parser.add_argument("--http", type=int, default=10_000, help="HTTP cases (default 10000)")
    args = parser.parse_args()
    if args.parser:
        fuzz_parser(args.parser)
    if args.http:
        fuzz_http(args.http)
    return 0


if __name__ == "__main__":
    sys.exit(main())
