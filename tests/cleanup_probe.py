"""Run only by tests/test_fixtures.py, in a pytest of its own (the name keeps the main run from collecting it):
a qemu test that fails on purpose with its domain running, in the way PROBE_MODE says."""

from __future__ import annotations

import os
from typing import Any

from test_qemu import payload_for, start


def test_fails_with_a_running_domain(qemu_factory: Any) -> None:
    launcher = qemu_factory()
    answer = start(launcher.client(), payload_for("start_legacy.yaml", os.environ["PROBE_UUID"]), wait=1,
                   timeout=120)
    assert answer["state"] == "running"
    if os.environ["PROBE_MODE"] == "unusable-config":
        launcher.config_path.write_text("virtualizer: [")  # `launcher hard-reset` cannot even read it
    raise AssertionError("failing on purpose")
