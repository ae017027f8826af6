"""The HTTP API and the CLI, against a real `launcher serve` process."""

from __future__ import annotations

import http.client
import json
import signal
import time
from typing import Any

import pytest
from conftest import LauncherProcess, example

from launcher.cli.client import Client, ClientError

LEGACY = "d7d86208-b46c-4465-9018-fe14087d415f"
YAML = "application/yaml"


def start_yaml(uuid: str, mem_mb: int = 64) -> bytes:
    return (f"start:\n  instance_uuid: {uuid}\n  image_uuid: test-image\n  fw_type: legacy\n"
            f"  requested_resources:\n    - type: vcpus\n      value: 1\n      mandatory: true\n"
            f"    - type: mem_mb\n      value: {mem_mb}\n      mandatory: true\n").encode()


def wait_until(predicate: Any, timeout: float = 30.0) -> Any:
    """`predicate()` once it is true, else its last value after `timeout` s: a bound that only stops a hang, on
    a busy 2-core machine; no test here relies on anything happening sooner."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def error_of(call: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


def raw(client: Client, method: str, path: str, headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(client.host, client.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data.startswith(b"{") else {"text": data.decode()}


def test_auth(launcher: LauncherProcess) -> None:
    client = launcher.client()
    assert raw(client, "GET", "/healthz") == (200, {"status": "ok"})
    status, answer = raw(client, "GET", "/v1/instances")
    assert status == 401 and answer["error"] == "unauthorized"
    status, answer = raw(client, "GET", "/v1/instances", {"Authorization": "Bearer wrong"})
    assert status == 401
    assert (launcher.data_dir / "api-token").stat().st_mode & 0o777 == 0o600


def test_start_stop_restart_delete_lifecycle(launcher: LauncherProcess) -> None:
    client = launcher.client()
    answer = client.request("POST", "/v1/instances", example("start_legacy.yaml"), YAML)
    assert answer["instance_uuid"] == LEGACY and answer["state"] in ("pending", "running")
    assert client.request("POST", "/v1/instances", example("start_legacy.yaml"), YAML, wait=True)["state"] == "running"
    shown = client.request("GET", f"/v1/instances/{LEGACY}")
    assert shown["state"] == "running" and shown["vcpus"] == 2 and shown["mem_mb"] == 370
    assert "user_data" not in shown["spec"] and shown["spec"]["user_data_bytes"] > 0
    assert client.request("POST", f"/v1/instances/{LEGACY}/stop", wait=True)["state"] == "exited"
    assert error_of(lambda: client.request("POST", f"/v1/instances/{LEGACY}/stop")).status == 409
    assert client.request("POST", f"/v1/instances/{LEGACY}/restart", wait=True)["state"] == "running"
    assert error_of(lambda: client.request("POST", f"/v1/instances/{LEGACY}/restart")).code == "already_running"
    assert client.request("DELETE", f"/v1/instances/{LEGACY}", wait=True)["state"] == "deleted"
    gone = error_of(lambda: client.request("GET", f"/v1/instances/{LEGACY}"))
    assert (gone.status, gone.code) == (404, "no_instance")


def test_commands_endpoint_dispatches_on_the_top_level_key(launcher: LauncherProcess) -> None:
    client = launcher.client()
    client.request("POST", "/v1/commands", example("start_legacy.yaml"), YAML, wait=True)
    assert client.request("POST", "/v1/commands", example("stop.yaml"), YAML, wait=True)["state"] == "exited"
    assert client.request("POST", "/v1/commands", example("restart.yaml"), YAML, wait=True)["state"] == "running"
    assert client.request("POST", "/v1/commands", example("evacuate.yaml"), YAML)["state"] == "MAINTENANCE"
    refused = error_of(lambda: client.request("POST", "/v1/instances", start_yaml("ab-01"), YAML))
    assert (refused.status, refused.code) == (503, "node_maintenance")
    assert client.request("POST", "/v1/commands", example("restore.yaml"), YAML)["state"] == "READY"
    body = json.dumps({"delete": {"instance_uuid": LEGACY}}).encode()
    assert client.request("POST", "/v1/commands", body, "application/json", wait=True)["state"] == "deleted"


def test_bad_input_gets_a_code_and_the_launcher_keeps_serving(launcher: LauncherProcess) -> None:
    client = launcher.client()
    cases = [
        (b"start: [unclosed", YAML, 400, "invalid_payload"),
        (b"{not json", "application/json", 400, "invalid_payload"),
        (b"\xff\xfe", YAML, 400, "invalid_payload"),
        (start_yaml("not-a-uuid!"), YAML, 400, "invalid_data"),
        (start_yaml("aa-01").replace(b"fw_type: legacy", b"fw_type: bios"), YAML, 400, "invalid_data"),
        (start_yaml("aa-01") + b"  surprise: 1\n", YAML, 400, "invalid_data"),
        (b"x" * ((1 << 20) + 1), YAML, 400, "invalid_payload"),
        (b"start: {}", "text/html", 400, "invalid_payload"),
    ]
    for body, content_type, status, code in cases:
        exc = error_of(lambda: client.request("POST", "/v1/instances", body, content_type))
        assert (exc.status, exc.code) == (status, code), (body[:60], exc.reason)
        assert exc.reason
    # Refused at dispatch, by the virtualizer's rules: each names its field and the launcher keeps serving.
    for body, reason in [
        (start_yaml("aa-02").replace(b"  image_uuid: test-image\n", b""),
         "start.image_uuid: required unless a storage entry has boot: true"),
        (start_yaml("aa-03") + b"  docker_image: busybox:latest\n",
         "start.docker_image: must be empty for a VM (it names a container's image)"),
        (start_yaml("aa-04") + b"  vm_type: docker\n",
         "start.vm_type: 'docker' is not enabled on this node (enabled: simulation)"),
    ]:
        exc = error_of(lambda: client.request("POST", "/v1/instances", body, YAML))
        assert (exc.status, exc.code, exc.reason) == (400, "invalid_data", reason)
    assert [i["instance_uuid"] for i in client.request("GET", "/v1/instances")["instances"]] == []
    fw = error_of(lambda: client.request("POST", "/v1/instances",
                                         start_yaml("aa-01").replace(b"legacy", b"bios"), YAML))
    assert "fw_type" in fw.reason
    for method, path, status, code in [
        ("POST", "/v1/instances/abcd/stop", 404, "no_instance"),
        ("POST", "/v1/instances/..%2Fetc/stop", 404, "not_found"),  # decoded to a path no route matches
        ("POST", "/v1/instances/zz..x/stop", 400, "invalid_data"),
        ("GET", "/v1/nothing", 404, "not_found"),
        ("PUT", "/v1/instances", 404, "not_found"),
        ("POST", "/v1/instances/abcd/stop?grace=-1", 400, "invalid_data"),
    ]:
        exc = error_of(lambda: client.request(method, path))
        assert (exc.status, exc.code) == (status, code), path
    assert client.request("POST", "/v1/instances", start_yaml("aa-02"), YAML, wait=True)["state"] == "running"
    assert list((launcher.data_dir / "instances").iterdir()) == [launcher.data_dir / "instances" / "aa-02"]


def test_json_start_and_idempotent_repeat(launcher: LauncherProcess) -> None:
    client = launcher.client()
    body = example("start.json")
    first = client.request("POST", "/v1/instances", body, "application/json", wait=True)
    again = client.request("POST", "/v1/instances", body, "application/json")
    assert again == {**first, "done": True}
    changed = json.loads(body)
    changed["start"]["fw_type"] = "efi" if changed["start"].get("fw_type") != "efi" else "legacy"
    exc = error_of(lambda: client.request("POST", "/v1/instances", json.dumps(changed).encode(), "application/json"))
    assert (exc.status, exc.code) == (409, "already_running")


def test_node_stats_and_metrics(launcher_factory: Any) -> None:
    launcher = launcher_factory({"intervals": {"stats_snapshot_s": 0.2, "instance_stats_s": 0.2}})
    client = launcher.client()
    client.request("POST", "/v1/instances", start_yaml("ee-01", mem_mb=640), YAML, wait=True)
    node = client.request("GET", "/v1/node")
    assert node["status"] == "READY" and node["instances"] == 1 and node["allocated"]["mem_mb"] == 640
    assert node["mem_total_mb"] > 0 and node["cpus_online"] > 0
    def measured() -> dict[str, Any] | None:
        """The STATS snapshot once it has the instance's memory figure (snapshots are taken every 0.2 s)."""
        stats: dict[str, Any] = client.request("GET", "/v1/stats")
        return stats if [i.get("memory_usage_mb") for i in stats["instances"]] == [64] else None

    stats = wait_until(measured)
    assert stats is not None, client.request("GET", "/v1/stats")
    [instance] = stats["instances"]
    assert instance["state"] == "running" and instance["memory_usage_mb"] == 64  # simulation: mem_mb / 10
    assert stats["status"] == "READY" and stats["node_uuid"] == node["node_uuid"]
    conn = http.client.HTTPConnection(client.host, client.port)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {client.token}"})
    text = conn.getresponse().read().decode()
    assert 'launcher_instances{state="running"} 1.0' in text
    assert "launcher_allocated_memory_bytes 6.7108864e+08" in text  # 640 MiB
    assert 'launcher_instance_memory_bytes{instance_uuid="ee-01"} 6.7108864e+07' in text  # 64 MiB


def test_events_resume_without_gap_and_expire(launcher_factory: Any) -> None:
    launcher = launcher_factory({"events": {"rotate_bytes": 2000, "keep_files": 1, "memory_events": 5}})
    client = launcher.client()
    for n in range(4):
        client.request("POST", "/v1/instances", start_yaml(f"cc-{n:02}"), YAML, wait=True)
    lines = b"".join(client.stream("/v1/events")).splitlines()
    events = [json.loads(line) for line in lines]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap
    middle = seqs[len(seqs) // 2]
    resumed = [json.loads(line)["seq"] for line in b"".join(client.stream("/v1/events", since=middle)).splitlines()]
    expected = [s for s in seqs if s > middle]
    assert resumed[: len(expected)] == expected  # later events may have become durable since the first read
    assert resumed == list(range(middle + 1, middle + 1 + len(resumed)))
    for n in range(30):  # push the first events out of the kept files
        client.request("POST", "/v1/instances", start_yaml(f"cd-{n:02}"), YAML)

    def expired() -> ClientError | None:
        try:
            list(client.stream("/v1/events", since=1))
        except ClientError as exc:
            return exc
        return None

    # The STARTs' events are written (and the files rotated) a moment after their answers: wait for it.
    error = wait_until(expired)
    assert error is not None and (error.status, error.code) == (410, "events_expired")


def test_events_follow_streams_new_events(launcher: LauncherProcess) -> None:
    client = launcher.client()
    stream = client.stream("/v1/events", read_timeout=10, follow=True)  # fails rather than hangs
    client.request("POST", "/v1/instances", start_yaml("dd-01"), YAML)
    seen: list[dict[str, Any]] = []
    buffer = b""
    for chunk in stream:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        seen += [json.loads(line) for line in complete if line]
        if any(e.get("state") == "running" and e.get("instance_uuid") == "dd-01" for e in seen):
            break
    stream.close()
    assert [e["type"] for e in seen][:1] == ["node_status"]


def test_instance_log_follow(launcher: LauncherProcess) -> None:
    client = launcher.client()
    client.request("POST", "/v1/instances", start_yaml("ff-01"), YAML, wait=True)
    text = b""
    for chunk in client.stream("/v1/instances/ff-01/log", read_timeout=10, follow=True):
        text += chunk
        if b"VM is running" in text:
            break
    assert b"START accepted" in text and b"start_vm ok in" in text


def test_cli(launcher: LauncherProcess, tmp_path: Any) -> None:
    payload = tmp_path / "start.yaml"
    payload.write_bytes(example("start_legacy.yaml"))
    started = launcher.cli("start", str(payload), "--wait")
    assert started.returncode == 0, started.stderr
    assert f"{LEGACY}: running" in started.stdout
    listed = launcher.cli("ls")
    assert LEGACY in listed.stdout and "running" in listed.stdout and listed.stdout.startswith("UUID")
    as_json = json.loads(launcher.cli("ls", "--json").stdout)
    assert [i["instance_uuid"] for i in as_json["instances"]] == [LEGACY]
    assert json.loads(launcher.cli("show", LEGACY, "--json").stdout)["state"] == "running"
    assert "READY" in launcher.cli("node").stdout
    assert launcher.cli("stop", LEGACY, "--wait").stdout.strip() == f"{LEGACY}: exited"
    failed = launcher.cli("stop", LEGACY)
    assert failed.returncode == 1 and "already_stopped" in failed.stderr
    events = launcher.cli("events", "--json").stdout.splitlines()
    assert any(json.loads(e).get("state") == "exited" for e in events)
    assert "START accepted" in launcher.cli("logs", LEGACY).stdout
    assert launcher.cli("delete", LEGACY, "--wait").returncode == 0
    missing = launcher.cli("show", LEGACY)
    assert missing.returncode == 1 and "no_instance" in missing.stderr


def test_sigterm_ends_the_launcher_promptly(launcher_factory: Any) -> None:
    launcher = launcher_factory({"simulation": {"failures": [{"phase": "ensure", "action": "hang"}]}})
    client = launcher.client()
    for n in range(5):
        client.request("POST", "/v1/instances", start_yaml(f"ab-{n:02}"), YAML)
    assert launcher.proc is not None
    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.proc.wait(timeout=30) == 0  # not held up by the STARTs that hang
    assert "Traceback" not in launcher.output()


def test_a_wait_longer_than_the_clients_socket_timeout_is_waited_for(launcher_factory: Any) -> None:
    """`?wait=1&timeout=S` beyond the client's own socket timeout: the client waits for the launcher's answer
    (it used to give up first, while the launcher was still waiting on the command)."""
    launcher = launcher_factory({"simulation": {"boot_delay_s": 1.5}})
    client = launcher.client()
    client.timeout = 0.5
    answer = client.request("POST", "/v1/instances", start_yaml(LEGACY), YAML, wait=1, timeout=30)
    assert answer == {"instance_uuid": LEGACY, "state": "running", "done": True}


def test_a_launcher_that_does_not_answer_is_a_client_error(launcher: LauncherProcess) -> None:
    client = launcher.client()
    client.timeout = 0.5
    assert launcher.proc is not None
    launcher.proc.send_signal(signal.SIGSTOP)
    try:
        error = error_of(lambda: client.request("GET", "/v1/instances"))
    finally:
        launcher.proc.send_signal(signal.SIGCONT)
    assert (error.code, error.reason) == ("no_answer", f"the launcher at {client.host}:{client.port} did not "
                                                       "answer within 0.5 s")
