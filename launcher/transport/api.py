"""The HTTP API (contract: docs/api.md and docs/openapi.yaml): routing, auth and the handlers, served by
`launcher.transport.http`.

Handlers never wait on an actor while holding anything: they dispatch (synchronous), then wait on their own
`Ticket` with a timeout. Errors are JSON `{"error", "reason", "instance_uuid"}` with the HTTP status of
`STATUS_OF`. An unexpected exception is a bug: it is logged with its traceback and answered 500, and the
launcher keeps serving.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from launcher.core.commands import (
    AttachVolumeCommand,
    Command,
    DeleteCommand,
    DetachVolumeCommand,
    EvacuateCommand,
    RestartCommand,
    RestoreCommand,
    StartCommand,
    StopCommand,
)
from launcher.core.messages import Ticket
from launcher.core.metrics import CONTENT_TYPE, UNMATCHED_ROUTE
from launcher.core.stats import StatsReporter, instance_figures, node_figures
from launcher.core.supervisor import Supervisor
from launcher.core.view import InstanceView
from launcher.durable.events import EventJournal, EventsExpired
from launcher.durable.logs import InstanceLogs
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.protocol import VolumeInfo
from launcher.transport import payloads
from launcher.transport.http import Handler, Request, Response, Stream
from launcher.transport.image_routes import ImageRoutes
from launcher.transport.state_metrics import StateCollector
from launcher.transport.volume_routes import VolumeRoutes

log = logging.getLogger(__name__)

BID_HEADER = "launcher-bid"  # (lower case, as Request keeps header names) the auction bid a START consumes

STATUS_OF = {
    errors.INVALID_PAYLOAD: 400,
    errors.INVALID_DATA: 400,
    errors.UNAUTHORIZED: 401,
    errors.NO_INSTANCE: 404,
    errors.NOT_FOUND: 404,
    errors.ALREADY_RUNNING: 409,
    errors.ALREADY_STOPPED: 409,
    errors.INSTANCE_EXISTS: 409,
    errors.INSTANCE_CORRUPT: 409,
    errors.IMAGE_IN_USE: 409,
    errors.VOLUME_EXISTS: 409,
    errors.VOLUME_IN_USE: 409,
    errors.ALREADY_ATTACHED: 409,
    errors.NOT_ATTACHED: 409,
    errors.EVENTS_EXPIRED: 410,
    errors.NOT_SUPPORTED: 501,
    errors.REQUEST_TIMEOUT: 408,
    errors.TOO_MANY_CONNECTIONS: 503,
    errors.FULL_CN: 503,
    errors.NODE_MAINTENANCE: 503,
    errors.INSTANCE_BUSY: 503,
    # The command was valid but the virtualizer failed to carry it out.
    errors.IMAGE_FAILURE: 502,
    errors.NETWORK_FAILURE: 502,
    errors.LAUNCH_FAILURE: 502,
    errors.STOP_FAILURE: 502,
    errors.ATTACH_FAILURE: 502,
    errors.DETACH_FAILURE: 502,
    errors.VOLUME_FAILURE: 502,
    errors.STORAGE_FULL: 507,
    errors.INTERNAL: 500,
}

NDJSON = "application/x-ndjson"
COMMAND_KIND: dict[type, str] = {StartCommand: "start", StopCommand: "stop", RestartCommand: "restart",
                                 DeleteCommand: "delete", AttachVolumeCommand: "attach_volume",
                                 DetachVolumeCommand: "detach_volume", EvacuateCommand: "evacuate",
                                 RestoreCommand: "restore"}
ACCEPT_TIMEOUT_S = 30.0  # how long a START answer may wait for instance.json to be written


class Api:
    """The launcher's HTTP API: the route table and a handler per route.

    `handle` is what the HTTP loop calls; it answers every request (a `LauncherError` as its status in `STATUS_OF`,
    any other exception as 500, logged) and records its latency in /metrics. Every route but /healthz wants the
    bearer token. The handlers below are public only to be named in the route table; any of them may raise
    `LauncherError`."""

    def __init__(
        self,
        supervisor: Supervisor,
        journal: EventJournal,
        logs: InstanceLogs,
        stats: StatsReporter,
        token: str,
    ) -> None:
        """Routes over the supervisor's instances, the journal's events, the instance logs and the stats reporter;
        `token` is the bearer token. Registers the state gauges (`StateCollector`) in the supervisor's metrics
        registry, so there is one Api per supervisor."""
        self.supervisor = supervisor
        self.journal = journal
        self.logs = logs
        self.stats = stats
        self.token = token
        self.config = supervisor.config
        self.metrics = supervisor.metrics
        self._volumes: list[VolumeInfo] = []  # the volume store's list, read at each scrape of /metrics
        self.metrics.registry.register(StateCollector(supervisor, journal, lambda: self._volumes))
        u = r"(?P<uuid>[^/]+)"
        v = r"(?P<volume_id>[^/]+)"
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"/healthz"), self.healthz),
            ("GET", re.compile(r"/metrics"), self.get_metrics),
            ("POST", re.compile(r"/v1/instances"), self.start),
            ("GET", re.compile(r"/v1/instances"), self.list_instances),
            ("GET", re.compile(rf"/v1/instances/{u}"), self.show_instance),
            ("DELETE", re.compile(rf"/v1/instances/{u}"), self.delete),
            ("POST", re.compile(rf"/v1/instances/{u}/stop"), self.stop),
            ("POST", re.compile(rf"/v1/instances/{u}/restart"), self.restart),
            ("GET", re.compile(rf"/v1/instances/{u}/log"), self.instance_log),
            ("POST", re.compile(rf"/v1/instances/{u}/volumes/{v}"), self.attach_volume),
            ("DELETE", re.compile(rf"/v1/instances/{u}/volumes/{v}"), self.detach_volume),
            ("POST", re.compile(r"/v1/commands"), self.command),
            ("GET", re.compile(r"/v1/node"), self.node),
            ("POST", re.compile(r"/v1/node/evacuate"), self.evacuate),
            ("POST", re.compile(r"/v1/node/restore"), self.restore),
            ("GET", re.compile(r"/v1/stats"), self.get_stats),
            ("GET", re.compile(r"/v1/events"), self.events),
            *ImageRoutes(supervisor).routes(),
            *VolumeRoutes(supervisor).routes(),
        ]
        # The route label of /metrics' request latencies: the pattern, e.g. /v1/instances/{uuid}
        self.route_names = {pattern: re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern)
                            for _, pattern, _ in self.routes}

    async def handle(self, request: Request) -> Response | Stream:
        """Answer one request; never raises (but for cancellation). Its latency goes to /metrics."""
        started = trio.current_time()
        route, answer = await self._answer(request)
        status = answer.status if isinstance(answer, Response) else 200
        self.metrics.http_request(request.method, route, status, trio.current_time() - started)
        return answer

    async def _answer(self, request: Request) -> tuple[str, Response | Stream]:
        """The answer, and the route pattern that matched (UNMATCHED_ROUTE if none did)."""
        route = UNMATCHED_ROUTE
        try:
            route, handler, params = self._route(request)
            if handler not in (self.healthz,):
                self._authorize(request)
            if params:
                request = attrs.evolve(request, params=params)
            return route, await handler(request)
        except LauncherError as exc:
            return route, Response.json(STATUS_OF.get(exc.code, 500), exc.as_dict())
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("%s %s failed", request.method, request.path)
            return route, Response.json(500, {"error": errors.INTERNAL, "reason": repr(exc), "instance_uuid": ""})

    def _route(self, request: Request) -> tuple[str, Handler, dict[str, str]]:
        methods = []
        wanted = "GET" if request.method == "HEAD" else request.method  # launcher.transport.http drops a HEAD's body
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(request.path)
            if match:
                if method == wanted:
                    return self.route_names[pattern], handler, match.groupdict()
                methods.append(method)
        if methods:
            raise LauncherError(errors.NOT_FOUND, f"{request.method} is not allowed here (use {', '.join(methods)})")
        raise LauncherError(errors.NOT_FOUND, f"no such endpoint: {request.path}")

    def _authorize(self, request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            raise LauncherError(errors.UNAUTHORIZED, "missing or wrong bearer token (see <data_dir>/api-token)")

    # ----------------------------------------------------------------- commands

    async def start(self, request: Request) -> Response:
        """POST /v1/instances: a START body in YAML or JSON (`payloads.parse_start`), answered as `_run` does."""
        command = payloads.parse_start(request.body, request.headers.get("content-type", ""),
                                       max_bytes=self.config.max_payload_bytes)
        return await self._run(request, command)

    async def command(self, request: Request) -> Response:
        """POST /v1/commands: any ciao command document (`payloads.parse_command`), answered as `_run` does."""
        command = payloads.parse_command(request.body, request.headers.get("content-type", ""),
                                         max_bytes=self.config.max_payload_bytes)
        return await self._run(request, command)

    async def command_answer(self, body: bytes, content_type: str, query: dict[str, str], bid: str = "") -> Response:
        """What POST /v1/commands?<query> answers to `body` (with header ``Launcher-Bid: <bid>`` if `bid`), for a
        transport that checked its caller itself (the fleet's command subject): the same parser, dispatch, status
        and JSON body. Never raises (but for cancellation); not counted among the HTTP requests of /metrics (the
        command itself is)."""
        headers = {"content-type": content_type, **({BID_HEADER: bid} if bid else {})}
        request = Request("POST", "/v1/commands", query, headers, body)
        try:
            return await self.command(request)
        except LauncherError as exc:
            return Response.json(STATUS_OF.get(exc.code, 500), exc.as_dict())
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("a command from the fleet failed")
            return Response.json(500, {"error": errors.INTERNAL, "reason": repr(exc), "instance_uuid": ""})

    async def stop(self, request: Request) -> Response:
        """POST /v1/instances/{uuid}/stop, with an optional ?grace=<seconds>."""
        return await self._run(request, StopCommand(self._uuid(request), _number(request, "grace", None)))

    async def restart(self, request: Request) -> Response:
        """POST /v1/instances/{uuid}/restart."""
        return await self._run(request, RestartCommand(self._uuid(request)))

    async def delete(self, request: Request) -> Response:
        """DELETE /v1/instances/{uuid}, with optional ?stop=1 and ?grace=<seconds>."""
        command = DeleteCommand(self._uuid(request), _flag(request, "stop"), _number(request, "grace", None))
        return await self._run(request, command)

    async def attach_volume(self, request: Request) -> Response:
        """POST /v1/instances/{uuid}/volumes/{volume_id}: ATTACH the volume."""
        return await self._run(request, AttachVolumeCommand(self._uuid(request), self._volume_id(request)))

    async def detach_volume(self, request: Request) -> Response:
        """DELETE /v1/instances/{uuid}/volumes/{volume_id}: DETACH the volume."""
        return await self._run(request, DetachVolumeCommand(self._uuid(request), self._volume_id(request)))

    async def evacuate(self, request: Request) -> Response:
        """POST /v1/node/evacuate: ciao's EVACUATE for this node."""
        return await self._run(request, EvacuateCommand())

    async def restore(self, request: Request) -> Response:
        """POST /v1/node/restore: ciao's RESTORE for this node."""
        return await self._run(request, RestoreCommand())

    async def _run(self, request: Request, command: Command) -> Response:
        """Dispatch, then answer once accepted (202) or, with ?wait=1, once finished (200) or failed. The
        command's result (ok or its ciao code) is counted in /metrics once it is known, even after a 202. A START
        with the header ``Launcher-Bid`` consumes that auction bid (`Supervisor.dispatch`; docs/fleet.md)."""
        kind = COMMAND_KIND[type(command)]
        try:
            ticket = self.supervisor.dispatch(command, bid=request.headers.get(BID_HEADER, ""))
        except LauncherError as exc:
            self.metrics.command_refused(kind, exc.code)
            raise
        self.metrics.command_dispatched(kind, ticket)
        if ticket.done.is_set():
            return _ticket_answer(ticket, 200)
        with trio.move_on_after(ACCEPT_TIMEOUT_S):
            await ticket.accepted.wait()
        if _flag(request, "wait"):
            timeout = min(_number(request, "timeout", self.config.timeouts.wait_s) or 0.0, self.config.timeouts.wait_s)
            with trio.move_on_after(timeout):
                await ticket.done.wait()
        if ticket.done.is_set():
            return _ticket_answer(ticket, 200)
        if ticket.error is not None:
            raise ticket.error
        return Response.json(202, {"instance_uuid": ticket.instance_uuid, "state": self._state_of(ticket),
                                   "done": False})

    def _state_of(self, ticket: Ticket) -> str:
        instance = self.supervisor.instance(ticket.instance_uuid)
        return instance.public_state if instance is not None else "deleted"

    # ----------------------------------------------------------------- reads

    async def healthz(self, request: Request) -> Response:
        """GET /healthz: 200 ``{"status": "ok"}`` whenever the loop answers; no token needed."""
        return Response.json(200, {"status": "ok"})

    async def list_instances(self, request: Request) -> Response:
        """GET /v1/instances: a summary of every instance."""
        return Response.json(200, {"instances": [_summary(i) for i in self.supervisor.instances()]})

    async def show_instance(self, request: Request) -> Response:
        """GET /v1/instances/{uuid}: one instance's details; `no_instance` if there is none."""
        return Response.json(200, _details(self._instance(request)))

    async def node(self, request: Request) -> Response:
        """GET /v1/node: the node's status, instance counts, allocation and capacity, and the host's figures
        (read in a worker thread)."""
        s = self.supervisor
        figures = await trio.to_thread.run_sync(node_figures, self.config.data_dir, limiter=self.stats.limiter)
        return Response.json(200, {
            "node_uuid": self.stats.node_id,
            "status": s.status,
            "maintenance": s.maintenance,
            "virtualizer": self.config.virtualizer,  # the default one, which runs an empty vm_type
            "virtualizers": list(self.config.virtualizers),
            "unmanaged_instances": len(s.unmanaged),
            "warm_pools": {name: pools.describe() for name, pools in s.warm_pools().items()},
            "warm_templates": s.warm_templates(),
            "instances": len(s.instances()),
            "instance_states": s.state_counts(),
            "allocated": attrs.asdict(s.allocated),
            "held_by_slots": attrs.asdict(s.admission.held_by_slots()),
            "capacity": attrs.asdict(s.capacity),
            **figures,
        })

    async def get_stats(self, request: Request) -> Response | Stream:
        """GET /v1/stats: the latest STATS snapshot; with ?follow=1, an NDJSON stream of them."""
        if _flag(request, "follow"):
            return Stream(NDJSON, self.stats.follow())
        return Response(200, self.stats.snapshot_json)

    async def get_metrics(self, request: Request) -> Response:
        """GET /metrics: the Prometheus text. Re-reads the volume store's list for the gauges first; if the
        store fails, the gauges keep the last list it gave."""
        store = self.supervisor.volume_store()
        if store is not None:
            try:
                self._volumes = await store.list()
            except LauncherError as exc:  # the gauges keep the last list the store gave
                log.warning("/metrics: cannot list the volumes: %s", exc)
        return Response(200, self.metrics.render(), CONTENT_TYPE)

    async def events(self, request: Request) -> Stream:
        """GET /v1/events?since=<seq>: the journal's events after that seq as NDJSON, and with ?follow=1 the
        new ones as they become durable. `EventsGone` if some of them were rotated away."""
        since = int(_number(request, "since", 0) or 0)
        if since < self.journal.oldest_seq - 1:
            raise EventsGone(self.journal.oldest_seq)
        return Stream(NDJSON, _ndjson(self.journal.events_since(since, follow=_flag(request, "follow"))))

    async def instance_log(self, request: Request) -> Stream:
        """GET /v1/instances/{uuid}/log: the instance's launcher.log as text; with ?follow=1, new lines too."""
        instance = self._instance(request)
        return Stream("text/plain; charset=utf-8", self.logs.follow(instance.dir, follow=_flag(request, "follow")))

    # ----------------------------------------------------------------- helpers

    def _uuid(self, request: Request) -> str:
        value = request.params["uuid"]
        if not payloads.is_valid_uuid(value):
            raise LauncherError(errors.INVALID_DATA, f"instance_uuid: {value!r} is not a valid instance uuid")
        return value

    def _volume_id(self, request: Request) -> str:
        value = request.params["volume_id"]
        if not payloads.is_valid_uuid(value):
            raise LauncherError(errors.INVALID_DATA, f"volume_uuid: {value!r} is not a valid volume uuid")
        return value

    def _instance(self, request: Request) -> InstanceView:
        uuid = self._uuid(request)
        instance = self.supervisor.instance(uuid)
        if instance is None:
            raise LauncherError(errors.NO_INSTANCE, "no such instance", uuid)
        return instance


class EventsGone(LauncherError):
    """`events_expired`: the events a client asked for were rotated away; the answer names `oldest_seq`."""

    def __init__(self, oldest_seq: int) -> None:
        """`oldest_seq` is the oldest event still kept: the client may resume from ``since=oldest_seq - 1``."""
        super().__init__(errors.EVENTS_EXPIRED, f"events before seq {oldest_seq} are no longer kept")
        self.oldest_seq = oldest_seq

    def as_dict(self) -> dict[str, Any]:
        """The error's JSON body, with ``oldest_seq`` added."""
        return {**super().as_dict(), "oldest_seq": self.oldest_seq}


def _flag(request: Request, name: str) -> bool:
    return request.query.get(name, "") in ("1", "true", "yes")


def _number(request: Request, name: str, default: float | None) -> float | None:
    """A non-negative number from the query string, or `default`; invalid_data if malformed."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise LauncherError(errors.INVALID_DATA, f"query parameter {name}: expected a non-negative number")
    return value


def _ticket_answer(ticket: Ticket, status: int) -> Response:
    if ticket.error is not None:
        raise ticket.error
    return Response.json(status, {"instance_uuid": ticket.instance_uuid, "state": ticket.state, "done": True})


def _summary(instance: InstanceView) -> dict[str, Any]:
    return {
        **instance_figures(instance),
        "activity": instance.activity,
        "vm_type": instance.spec.vm_type,
        "image_uuid": instance.spec.image_uuid,
        "docker_image": instance.spec.docker_image,
        "start_path": instance.start_path,
        "vcpus": instance.spec.vcpus,
        "mem_mb": instance.spec.mem_mb,
        "disk_mb": instance.spec.disk_mb,
    }


def _details(instance: InstanceView) -> dict[str, Any]:
    spec = attrs.asdict(instance.spec)
    # user-data often carries secrets (passwords, keys): show its size and digest, not its text.
    user_data = spec.pop("user_data").encode()
    spec["user_data_bytes"] = len(user_data)
    spec["user_data_sha256"] = hashlib.sha256(user_data).hexdigest()
    return {**_summary(instance), "dir": str(instance.dir), "queued": instance.queued, "spec": spec}


async def _ndjson(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield json.dumps(event, separators=(",", ":")).encode() + b"\n"
    except EventsExpired:
        return  # fell behind what is kept: end the stream; the client resumes and gets 410

