"""Fuzzing with hypothesis: the payload parser in-process, and every HTTP endpoint of a real `launcher serve`.

Properties: the parser returns a command or refuses with invalid_payload / invalid_data (never another
exception); the launcher never answers 500 (`internal_error`), never hangs (every exchange is bounded), never
exits, and creates no file outside its data dir. The suite runs a few thousand cases; bench/fuzz.py runs
millions."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import ROOT, LauncherProcess
from fuzz_cases import CONTENT_TYPES, bodies, check_answer, check_parser_case, exchange, requests
from http_faults import address, assert_serving, token
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def fast(max_examples: int) -> settings:
    """No per-case deadline (the machine is shared), no example database in the work tree."""
    return settings(max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@fast(2500)
@given(body=bodies, content_type=st.sampled_from(CONTENT_TYPES))
def test_the_parser_returns_a_command_or_a_coded_refusal(body: bytes, content_type: str) -> None:
    check_parser_case(body, content_type)


def files_under(*roots: Path) -> set[Path]:
    found = set()
    for root in roots:
        for directory, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".cache", ".hypothesis")]
            found.update(Path(directory, name) for name in files)
    return found


def test_no_endpoint_answers_500_hangs_or_writes_outside_the_data_dir(launcher: LauncherProcess,
                                                                      tmp_path: Path) -> None:
    before = files_under(tmp_path, ROOT)
    where, secret = address(launcher), token(launcher)
    statuses: dict[int, int] = {}

    @fast(1500)
    @given(request=requests(secret))
    def case(request: bytes) -> None:
        status = check_answer(exchange(where, request))
        statuses[status] = statuses.get(status, 0) + 1

    case()
    assert_serving(launcher)
    assert "Traceback" not in launcher.output()  # nothing failed inside, even where the client saw no error
    assert {400, 404, 401} <= set(statuses), statuses  # the cases reached the API, not just its front door
    data_dir = launcher.data_dir
    escaped = {p for p in files_under(tmp_path, ROOT) - before if data_dir not in p.parents
               and p.name != launcher.log_path.name}
    assert not escaped, escaped
    assert not list(Path("/").glob("fuzz-escape*")) and not list(Path("/tmp").glob("fuzz-escape*"))
