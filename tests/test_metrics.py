"""`GET /metrics` follows Prometheus' conventions (promtool says so) and counts what happened: commands by kind
and result, the START steps' durations, request latencies by route pattern (docs/observability.md, "Metrics")."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from harness import running_node
from prometheus_client.parser import text_string_to_metric_families

from launcher.cli.client import Client, ClientError
from launcher.core.commands import StopCommand
from launcher.core.metrics import STEPS

YAML = "application/yaml"
MIB = 2**20
BOOT_DELAY_S = 0.2
SETTINGS = {"simulation": {"boot_delay_s": BOOT_DELAY_S, "failures": [{"phase": "create", "match": "^bad"}]}}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def start_yaml(uuid: str) -> bytes:
    return (f"start:\n  instance_uuid: {uuid}\n  image_uuid: test-image\n"
            f"  requested_resources:\n    - type: vcpus\n      value: 1\n      mandatory: true\n"
            f"    - type: mem_mb\n      value: 64\n      mandatory: true\n").encode()


def scrape(client: Client) -> str:
    conn = http.client.HTTPConnection(client.host, client.port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {client.token}"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status == 200, text
    assert response.getheader("content-type", "").startswith("text/plain; version=0.0.4")
    return text


def samples_of(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; KeyError if there is none (so that a misspelt name or label cannot pass as 0)."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        raise KeyError(f"no sample {name}{dict(labels)}")
    return samples[key]


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: it comes with Debian's `prometheus` package, which "
                    "`bash .ci/install` installs (apt-get install --no-install-recommends prometheus)")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        f"promtool check metrics: {done.stdout}{done.stderr}"


def refused(call: Any) -> str:
    with pytest.raises(ClientError) as info:
        call()
    return info.value.code


def test_live_metrics_pass_promtool_and_count_commands_steps_and_requests(launcher_factory: Any) -> None:
    client = launcher_factory(SETTINGS).client()
    for n in range(3):
        assert client.request("POST", "/v1/instances", start_yaml(f"a0-{n}"), YAML, wait=True)["state"] == "running"
    assert refused(lambda: client.request("POST", "/v1/instances", start_yaml("bad0-0"), YAML, wait=True)) == \
        "image_failure"
    # Answered 202 before it fails: its result is counted once known.
    assert client.request("POST", "/v1/instances", start_yaml("bad0-1"), YAML)["done"] is False
    assert client.request("POST", "/v1/instances/a0-0/stop", wait=True)["state"] == "exited"
    assert refused(lambda: client.request("POST", "/v1/instances/a0-0/stop")) == "already_stopped"
    assert refused(lambda: client.request("POST", "/v1/instances/ff-ff/stop")) == "no_instance"
    assert client.request("DELETE", "/v1/instances/a0-1", stop=True, wait=True)["state"] == "deleted"

    deadline = time.monotonic() + 10
    while True:
        text = scrape(client)
        samples = samples_of(text)
        if value(samples, "launcher_commands_total", command="start", result="image_failure") == 2 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    promtool_check(text)

    assert "_mb" not in text and "_created" not in text
    commands = {dict(labels)["command"] + ":" + dict(labels)["result"]: v
                for (name, labels), v in samples.items() if name == "launcher_commands_total" and v}
    assert commands == {"start:ok": 3, "start:image_failure": 2, "stop:ok": 1, "stop:already_stopped": 1,
                        "stop:no_instance": 1, "delete:ok": 1}

    # Every successful step of every START is observed once; bad0-* failed in create_image (the `disk` step).
    counts = {step: value(samples, "launcher_start_step_duration_seconds_count", step=step) for step in STEPS}
    assert counts == {"image": 5, "disk": 3, "start": 3, "boot": 3}
    for step in STEPS:
        assert value(samples, "launcher_start_step_duration_seconds_bucket", step=step, le="+Inf") == counts[step]
    boot_s = value(samples, "launcher_start_step_duration_seconds_sum", step="boot")
    assert 3 * BOOT_DELAY_S * 0.9 <= boot_s < 3 * (BOOT_DELAY_S + 5)  # the simulated boot takes boot_delay_s
    assert value(samples, "launcher_start_step_duration_seconds_bucket", step="boot", le="0.1") == 0

    http_counts = {(dict(labels)["method"], dict(labels)["route"], dict(labels)["code"]): v
                   for (name, labels), v in samples.items() if name == "launcher_http_request_duration_seconds_count"}
    assert http_counts[("POST", "/v1/instances", "200")] == 3
    assert http_counts[("POST", "/v1/instances", "502")] == 1
    assert http_counts[("POST", "/v1/instances", "202")] == 1
    assert http_counts[("POST", "/v1/instances/{uuid}/stop", "409")] == 1
    assert http_counts[("POST", "/v1/instances/{uuid}/stop", "404")] == 1
    assert http_counts[("DELETE", "/v1/instances/{uuid}", "200")] == 1
    # The route label is the pattern, never the path a client sent.
    assert not any("a0-" in route or "ff-ff" in route for _, route, _ in http_counts)

    # Gauges in base units: two 64 MiB instances remain (a0-0 exited, a0-2 running).
    assert value(samples, "launcher_allocated_memory_bytes") == 2 * 64 * MIB
    assert value(samples, "launcher_allocated_vcpus") == 2
    assert value(samples, "launcher_instances", state="running") == 1
    assert value(samples, "launcher_instances", state="exited") == 1


def test_unknown_methods_and_paths_keep_the_labels_bounded(launcher_factory: Any) -> None:
    client = launcher_factory().client()
    for n in range(5):
        conn = http.client.HTTPConnection(client.host, client.port, timeout=30)
        conn.request(f"BREW{n}", f"/nowhere/{n}", headers={"Authorization": f"Bearer {client.token}"})
        assert conn.getresponse().status == 404
        conn.close()
    text = scrape(client)
    promtool_check(text)
    samples = samples_of(text)
    assert value(samples, "launcher_http_request_duration_seconds_count", method="other", route="unmatched",
                 code="404") == 5
    assert "BREW" not in text and "nowhere" not in text


async def test_each_launcher_has_its_own_registry(tmp_path: Path) -> None:
    """Two launchers in one process (as in the in-process tests) never mix their figures."""
    async with running_node(tmp_path / "a") as a, running_node(tmp_path / "b") as b:
        await a.done(a.start("one"))
        await a.wait_state("one", "running")
        await a.done(a.dispatch(StopCommand("one")))
        sa, sb = samples_of(a.supervisor.metrics.render().decode()), samples_of(b.supervisor.metrics.render().decode())
        for step in STEPS:
            assert value(sa, "launcher_start_step_duration_seconds_count", step=step) == 1
            assert value(sb, "launcher_start_step_duration_seconds_count", step=step) == 0
