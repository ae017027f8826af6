"""docs/openapi.yaml describes the real API: schemathesis generates requests from it for every operation and
sends them to a real launcher, checking that no answer is a 5xx and that every answer's status, content type
and body are the documented ones.

schemathesis's own pytest plugin does not run under pytest 9 (`Function._nodeid`), so the cases are driven
through hypothesis here, one operation after the other."""

from __future__ import annotations

from typing import Any

import schemathesis
from conftest import ROOT, LauncherProcess
from http_faults import token
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

OPENAPI = ROOT / "docs" / "openapi.yaml"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_every_operation_answers_as_documented(launcher: LauncherProcess) -> None:
    schema = schemathesis.openapi.from_path(OPENAPI)
    base_url = (launcher.data_dir / "api-url").read_text().strip()
    headers = {"Authorization": f"Bearer {token(launcher)}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 26
    calls: dict[str, int] = {}
    for operation in operations:

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)
            calls[operation.label] = calls.get(operation.label, 0) + 1

        call()
    assert len(calls) == 26, calls
    assert launcher.proc is not None and launcher.proc.poll() is None
    assert "Traceback" not in launcher.output()
