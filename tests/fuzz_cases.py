"""Hypothesis strategies for fuzzing the payload parser and the HTTP API, and the checks each case must pass.

Shared by the suite (tests/test_fuzz.py: a few thousand cases) and bench/fuzz.py (as many as asked for)."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import quote

import yaml
from hypothesis import strategies as st

from launcher.core.commands import COMMAND_KEYS
from launcher.plugin.errors import INVALID_DATA, INVALID_PAYLOAD, PayloadError
from launcher.transport import payloads

CONTENT_TYPES = ["application/yaml", "application/json", "text/yaml", "application/x-yaml", "",
                 "application/json; charset=utf-16", "application/yaml; charset=latin-1", "text/plain", "x/y;;;="]
UUIDS = ["ab", "d7d86208-b46c-4465-9018-fe14087d415f", "0", "-", "../..", "a" * 65, "ABCDEF", "💥", "..", ""]
KEYS = sorted({*COMMAND_KEYS, "instance_uuid", "image_uuid", "tenant_uuid", "fw_type", "vm_type",
               "persistence", "requested_resources", "requirements", "networking", "storage", "type", "value",
               "mandatory", "vnic_mac", "private_ip", "subnet", "id", "boot", "size", "grace", "stop", "mem_mb",
               "vcpus", "disk_mb", "hostname", "user_data", "meta_data", "restart", "value_string", "ephemeral"})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.sampled_from(UUIDS), st.text(max_size=20),
                    st.sampled_from(["legacy", "efi", "qemu", "vcpus", "mem_mb", "02:00:de:ad:be:ef", "10.0.0.1",
                                     "10.0.0.0/24", "test-image", "1e9", "0x10", "~", "yes", "null"]))
# Documents shaped like ciao commands: the parser's own key names, nested, with values of any type.
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)),
    max_leaves=25)
YAML_TOKENS = ["start:", "stop:", "\n", "  ", "instance_uuid: ", "image_uuid: ", "ab", "---", "...", "- ", ": ",
               "&a ", "*a", "!!python/object:os.system ", "!!binary ", "{", "}", "[", "]", "'", '"', "#", "%YAML 1.1",
               "requested_resources:", "type: vcpus", "value: 2", "<<: *a", "? ", "|", ">", "\t", "\x00", "\ufeff",
               "#cloud-config", "user_data: ", "meta_data: "]
yaml_like = st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=5), max_size=40).map("".join)


valid_uuids = st.lists(st.sampled_from("0123456789abcdef"), min_size=1, max_size=12).map("".join).map(
    lambda h: f"{h}-0000-4000-8000-000000000000")
plausible = {
    "image_uuid": st.sampled_from(["test-image", "..", "a/b", "", "x" * 300]),
    "fw_type": st.sampled_from(["legacy", "efi", "", "bios"]),
    "vm_type": st.sampled_from(["qemu", "", "docker"]),
    "tenant_uuid": st.sampled_from(["", "67d86208-b46c-4465-9018-fe14087d415f", "-x"]),
    "requirements": st.fixed_dictionaries({}, optional={k: st.integers(-1, 2**20) | scalars for k in (
        "vcpus", "mem_mb", "disk_mb")}),
    "requested_resources": st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["vcpus", "mem_mb", "disk_mb", "network_node", "bogus"]),
         "value": st.integers(-1, 2**21) | scalars}, optional={"mandatory": st.booleans()}), max_size=4),
    "networking": st.fixed_dictionaries({}, optional={
        "vnic_mac": st.sampled_from(["02:00:de:ad:be:ef", "zz", "02:00:de:ad:be"]),
        "private_ip": st.sampled_from(["10.0.0.1", "300.1.1.1", "::1"]),
        "subnet": st.sampled_from(["10.0.0.0/24", "10.0.0.1/24", "x"])}),
    "storage": st.lists(st.fixed_dictionaries({"id": st.sampled_from(UUIDS)},
                                              optional={"boot": st.booleans(), "size": scalars}), max_size=2),
}
# STARTs that are valid but for a field or two: they reach the validation of each field, and the launcher.
near_valid_starts = st.tuples(valid_uuids, st.fixed_dictionaries({}, optional=plausible)).map(
    lambda args: {"start": {"instance_uuid": args[0], **args[1]}})


def encode(document: Any, syntax: str) -> bytes:
    if syntax == "json":
        return json.dumps(document, default=str).encode()
    return yaml.safe_dump(document, default_flow_style=False).encode()


bodies = st.one_of(
    st.binary(max_size=300),
    st.tuples(near_valid_starts, st.sampled_from(["json", "yaml"])).map(lambda args: encode(*args)),
    yaml_like.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.tuples(documents, st.sampled_from(["json", "yaml"])).map(lambda args: encode(*args)),
    st.tuples(documents, st.sampled_from(["json", "yaml"]), st.sampled_from(COMMAND_KEYS)).map(
        lambda args: encode({args[2]: args[0]}, args[1])),
    st.tuples(documents, yaml_like, yaml_like).map(  # ciao's three-document START framing
        lambda args: (encode({"start": args[0]}, "yaml").decode() + "---\n" + args[1] + "\n---\n" + args[2]).encode(
            "utf-8", "surrogatepass")),
)


def check_parser_case(body: bytes, content_type: str) -> str:
    """Both parsers either return a command or refuse with invalid_payload / invalid_data; the outcome's name."""
    outcome = ""
    for parse in (payloads.parse_start, payloads.parse_command):
        try:
            parse(body, content_type)
            outcome += "ok "
        except PayloadError as exc:
            assert exc.code in (INVALID_PAYLOAD, INVALID_DATA), exc
            assert exc.reason, "a refusal without a reason"
            outcome += exc.code + " "
    return outcome.strip()


# ------------------------------------------------------------------------------------------------ HTTP requests

METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "get", "", "G\x00T"]
ENDPOINTS = ["/healthz", "/metrics", "/v1/instances", "/v1/instances/{u}", "/v1/instances/{u}/stop",
             "/v1/instances/{u}/restart", "/v1/instances/{u}/log", "/v1/commands", "/v1/node", "/v1/node/evacuate",
             "/v1/node/restore", "/v1/stats", "/v1/events", "/v1/images", "/v1/images/{u}", "/v1/images/gc",
             "/v1/volumes", "/v1/volumes/{u}", "/v1/volumes/{u}/resize",
             "/", "//", "/v1/", "/v1/instances/{u}/{u}"]
SEGMENTS = st.sampled_from(UUIDS + ["%2e%2e%2ffuzz-escape", "..%2F..%2Ffuzz-escape", "%00", "%ff", "a b", "?", "#"]) \
    | st.text(max_size=12)
QUERY_KEYS = ["wait", "timeout", "grace", "stop", "since", "older_than", "source", "id", "sha256", "x"]
QUERY_VALUES = st.sampled_from(["1", "0", "true", "-1", "1e999", "nan", "inf", "0.01", "", "%", "2", "99999999999",
                                "/etc/passwd", "../fuzz-escape", "file:///etc/hostname"]) | st.text(max_size=8)
HEADER_LINES = st.sampled_from([
    "Content-Type: application/yaml", "Content-Type: application/json", "Transfer-Encoding: chunked",
    "Content-Length: 0", "Content-Length: 5", "Expect: 100-continue", "Connection: keep-alive", "Authorization: x",
    "Authorization: Bearer", "X: \x80\xff", "Upgrade: h2c", "Host: a", "Host: b", "Content-Length: -1",
])


ROUTES = [("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/instances"), ("GET", "/v1/instances"),
          ("GET", "/v1/instances/{u}"), ("DELETE", "/v1/instances/{u}"), ("POST", "/v1/instances/{u}/stop"),
          ("POST", "/v1/instances/{u}/restart"), ("GET", "/v1/instances/{u}/log"), ("POST", "/v1/commands"),
          ("GET", "/v1/node"), ("POST", "/v1/node/evacuate"), ("POST", "/v1/node/restore"), ("GET", "/v1/stats"),
          ("GET", "/v1/events"), ("GET", "/v1/images"), ("POST", "/v1/images"), ("DELETE", "/v1/images/{u}"),
          ("POST", "/v1/images/gc")]


@st.composite
def api_calls(draw: st.DrawFn, token: str) -> bytes:
    """A well-formed call of one of the API's routes (right method, token, Content-Type and Content-Length),
    with fuzzed uuids, query and body: these get past the HTTP layer into the handlers."""
    method, path = draw(st.sampled_from(ROUTES))
    while "{u}" in path:
        path = path.replace("{u}", draw(st.sampled_from(UUIDS) | valid_uuids), 1)
    query = draw(st.lists(st.tuples(st.sampled_from(QUERY_KEYS), QUERY_VALUES.filter(str.isascii)), max_size=3))
    target = path + ("?" + "&".join(f"{k}={quote(v)}" for k, v in query) if query else "")
    syntax = draw(st.sampled_from(["json", "yaml"]))
    commands = st.tuples(st.sampled_from(COMMAND_KEYS), documents).map(lambda args: {args[0]: args[1]})
    body = encode(draw(near_valid_starts | commands), syntax) if method == "POST" else b""
    return (f"{method} {target} HTTP/1.1\r\nHost: launcher\r\nConnection: close\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/{syntax}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@st.composite
def requests(draw: st.DrawFn, token: str) -> bytes:
    """One HTTP request as bytes: half well-formed API calls, half fuzzed at the HTTP level (any method, path,
    header or body), some raw garbage."""
    if draw(st.booleans()):
        return draw(api_calls(token))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    method = draw(st.sampled_from(METHODS))
    path = draw(st.sampled_from(ENDPOINTS))
    while "{u}" in path:
        path = path.replace("{u}", draw(SEGMENTS), 1)
    query = draw(st.lists(st.tuples(st.sampled_from(QUERY_KEYS), QUERY_VALUES), max_size=4))
    # `follow` streams never end on their own; a follower is exercised by the robustness tests instead.
    target = path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")
    body = draw(bodies)
    lines = [f"{method} {target} HTTP/1.1", "Host: launcher", "Connection: close"]
    if draw(st.integers(0, 9)):
        lines.append(f"Authorization: Bearer {token}")
    lines += draw(st.lists(HEADER_LINES, max_size=3))
    if draw(st.integers(0, 9)):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("utf-8", "surrogatepass") + b"\r\n\r\n" + body


def exchange(address: tuple[str, int], request: bytes, timeout: float = 60.0) -> bytes:
    """Send one request on a new connection and read until the launcher closes it (each sends Connection:
    close, and the launcher closes after an error it answers). A launcher that hangs fails with TimeoutError."""
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it refused before reading everything: what it answered is still there to read
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def check_answer(answer: bytes) -> int:
    """No internal error; the status of the first answer (0: none, which a garbage request may get)."""
    assert b"internal_error" not in answer, answer[:2000]
    if not answer:
        return 0
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    status = int(answer[9:12])
    assert status != 500, answer[:2000]
    return status
