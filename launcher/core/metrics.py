"""The launcher's Prometheus metrics (`GET /metrics`), in Prometheus' conventions: base units (`_bytes`,
`_seconds`), `_total` counters, histograms, and label sets that stay small whatever clients send.

One `Metrics` per launcher, owned by the supervisor, with a `CollectorRegistry` of its own (not
prometheus_client's global one, so several launchers in one process, as in the in-process tests, never mix
their figures). Who feeds it:
- the API: each command's result (`command_dispatched` / `command_refused`) and each request's latency;
- the instance actors: each successful START step (`step_done`, from `InstanceActor._call`) and the boot
  (`vm_running`, once the monitor reports the VM up after start_vm);
- the virtualizer: the parts of its calls it times itself (`virtualizer_step`, lent as
  `BackendHost.observe_step`);
- the transport's `StateCollector` (`launcher.transport.state_metrics`): the gauges of the live state
  (instances by state, node status, resources, per-instance usage), read at scrape time.

Everything runs in the Trio thread; prometheus_client's locks are uncontended there (a counter increment or a
histogram observation costs 1–1.5 µs here).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from launcher.core.commands import COMMAND_KEYS

if TYPE_CHECKING:
    from launcher.core.messages import Ticket

MIB = 2**20
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The START steps as the actor sees them: each virtualizer call of the START (and RESTART) pipeline, then the
# boot. The qemu virtualizer makes the overlay and the cloud-init seed inside one create_image call, and defines
# and starts the domain inside one start_vm call (its instance log times each part: "step overlay", "step
# seed", "step define", "step start"), so `disk` covers overlay + seed and `start` covers define + start.
STEP_OF_CALL = {"ensure_backing_image": "image", "create_image": "disk", "start_vm": "start"}
STEPS = ("image", "disk", "start", "boot")
# From a cached image's few milliseconds to a large download or a slow TCG boot (many minutes).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                1200.0, 1800.0)
# Requests are answered in well under a millisecond to seconds (a ?wait=1 command up to timeouts.wait_s).
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0, 600.0)
COMMANDS = COMMAND_KEYS  # the `command` label: the ciao command names (launcher.transport.api.COMMAND_KIND)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})  # any other: "other"
UNMATCHED_ROUTE = "unmatched"  # a path no route matches: never the raw path, which a client chooses


class Metrics:
    """The counters and histograms of one launcher, and its registry."""

    def __init__(self) -> None:
        """Every series the launcher exports, registered, the usual ones present from the start at 0."""
        self.registry = CollectorRegistry(auto_describe=True)  # name clashes are refused at registration
        self.commands = Counter(
            "launcher_commands", "Commands received over the API, by kind and result: ok, or the ciao code of "
            "the refusal or failure", ["command", "result"], registry=self.registry)
        self.start_steps = Histogram(
            "launcher_start_step_duration_seconds", "Duration of each successful START/RESTART step: image "
            "(ensure_backing_image), disk (create_image: overlay and seed), start (start_vm: define and start), "
            "boot (start_vm returned until the VM runs)", ["step"], buckets=STEP_BUCKETS, registry=self.registry)
        self.virtualizer_steps = Histogram(
            "launcher_virtualizer_step_duration_seconds", "Duration of each part of a START that the virtualizer "
            "times itself (qemu: overlay, seed, define, start; see BackendHost.observe_step)",
            ["virtualizer", "step"], buckets=STEP_BUCKETS, registry=self.registry)
        self.http_requests = Histogram(
            "launcher_http_request_duration_seconds", "Time to answer an HTTP request (routing, auth and handler; "
            "for a stream, until it begins), by method, route pattern and status code",
            ["method", "route", "code"], buckets=HTTP_BUCKETS, registry=self.registry)
        for command in COMMANDS:  # the usual series exist from the start, at 0, so that rate() sees the first
            self.commands.labels(command, "ok")
        for step in STEPS:
            self.start_steps.labels(step)
        self._booting: WeakKeyDictionary[object, float] = WeakKeyDictionary()  # actor → when start_vm returned

    # ----------------------------------------------------------------- commands

    def command_refused(self, command: str, code: str) -> None:
        """A command refused at once (dispatch raised)."""
        self.commands.labels(command, code).inc()

    def command_dispatched(self, command: str, ticket: Ticket) -> None:
        """A command taken on: counted once its ticket is done (now, if it already is)."""
        if ticket.done.is_set():
            self._ticket_done(command, ticket)
        else:
            ticket.on_done = lambda done: self._ticket_done(command, done)

    def _ticket_done(self, command: str, ticket: Ticket) -> None:
        self.commands.labels(command, "ok" if ticket.error is None else ticket.error.code).inc()

    # ----------------------------------------------------------------- START steps

    def step_done(self, actor: object, call: str, seconds: float) -> None:
        """A virtualizer call of `actor` succeeded after `seconds`; only the START steps' calls are kept."""
        step = STEP_OF_CALL.get(call)
        if step is None:
            return
        self.start_steps.labels(step).observe(seconds)
        if step == "start":
            self._booting[actor] = trio.current_time()

    def vm_running(self, actor: object) -> None:
        """The monitor reports `actor`'s VM up: the boot step ends, if start_vm was called in this launcher's
        life (a VM found running after a launcher restart was not booted by it)."""
        started = self._booting.pop(actor, None)
        if started is not None:
            self.start_steps.labels("boot").observe(trio.current_time() - started)

    def virtualizer_step(self, virtualizer: str, step: str, seconds: float) -> None:
        """A part of a START that the virtualizer timed (`BackendHost.observe_step`)."""
        self.virtualizer_steps.labels(virtualizer, step).observe(seconds)

    # ----------------------------------------------------------------- HTTP

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request: `route` is its pattern (never the raw path), an unknown method counts as other."""
        method = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(method, route, str(status)).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format (0.0.4), without the `_created` series."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated(Collector):
    """The registry's metrics without prometheus_client's `<name>_created` samples (the time each counter
    and histogram series was first touched), which the 0.0.4 text format can only render as extra gauge
    families: one more series for each series, which nothing here reads. Filtered per scrape, not with
    prometheus_client's process-wide `disable_created_metrics()`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric
