"""`launcher serve`: the running core (`launcher.core.running`) with the stats reporter and the HTTP API over it,
under one root nursery.

Start order: the API token (checked, or created, before anything else: `launcher.transport.api_token`), journal,
per-instance logs and the instance-file persister (so everything after can report), the virtualizer backend,
the supervisor (which recovers the instances on disk), the stats reporter, the HTTP API, then (with a `fleet:`
section) the fleet member, which connects to NATS in the background. On SIGTERM or
SIGINT everything is cancelled in the reverse order: actors and monitors stop, VMs keep running (a restarted
launcher reconnects to them), pending events and log lines are flushed.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from functools import partial
from pathlib import Path

import attrs
import trio

from launcher.cli import fdlimit
from launcher.core.config import Config, HttpLimits
from launcher.core.running import running_core
from launcher.core.stats import StatsReporter, node_uuid
from launcher.durable import datadir
from launcher.plugin import files
from launcher.transport import api_token, http
from launcher.transport.api import Api
from launcher.transport.fleet.node import FleetNode
from launcher.transport.unix_listener import open_unix_listener, remove_socket

log = logging.getLogger(__name__)


# Garbage collector thresholds for `launcher serve` (CPython's defaults are 700, 10, 10). Each instance keeps
# ~100 tracked objects alive, so with the defaults a storm of STARTs triggers a full collection at every 25 % of
# heap growth: 9 of them, ~0.2 s each at 10 000 instances, plus frequent young ones. Measured over 10 000 STARTs:
# 2.7 s of collection with the defaults, 0.7 s with these; young collections stay short (10 000 objects).
GC_THRESHOLDS = (10_000, 10, 100)


async def serve(config: Config) -> None:
    """`launcher serve`: the core, the stats reporter and the HTTP API, until SIGTERM or SIGINT."""
    gc.set_threshold(*GC_THRESHOLDS)
    token = api_token.load_or_create(config.data_dir)  # SetupError: refused before anything starts
    limits = _http_limits(config)
    async with running_core(config) as core:
        async with trio.open_nursery() as work:
            work.start_soon(_cancel_on_signal, work.cancel_scope)
            stats = StatsReporter(core.supervisor, core.limiter, node_uuid(config.data_dir))
            await work.start(stats.run)
            api = Api(core.supervisor, core.journal, core.logs, stats, token)
            host, _, port = config.listen.rpartition(":")
            listeners, url = await http.open_tcp(host.strip("[]"), int(port))
            if config.listen_unix:
                listeners.append(await open_unix_listener(Path(config.listen_unix)))
                work.start_soon(_remove_on_exit, Path(config.listen_unix))
            await work.start(partial(http.serve, max_body=config.max_payload_bytes, limits=limits),
                             api.handle, listeners)
            work.start_soon(_publish_url, config.data_dir / datadir.URL_FILE, url, core.limiter)
            if config.fleet.enabled:
                work.start_soon(FleetNode(config.fleet, core.supervisor, core.journal, api, stats, url).run)
            log.info("launcher serving on %s%s (virtualizer %s, data dir %s, pid %d)", url,
                     f" and unix://{config.listen_unix}" if config.listen_unix else "", config.virtualizer,
                     config.data_dir, os.getpid())


def _http_limits(config: Config) -> HttpLimits:
    """The config's HTTP limits, with max_connections cut to what the open-file limit (raised first) allows."""
    open_files = fdlimit.raise_open_file_limit()
    budget = fdlimit.connection_budget(config.http.max_connections, open_files)
    if budget < config.http.max_connections:
        log.warning("http.max_connections is %d, but the open-file limit (%d) allows only %d connections; "
                    "raise the hard limit (e.g. LimitNOFILE= in the systemd unit)",
                    config.http.max_connections, open_files, budget)
    return attrs.evolve(config.http, max_connections=budget)


async def _remove_on_exit(path: Path) -> None:
    """Wait until the launcher stops, then remove its unix socket."""
    try:
        await trio.sleep_forever()
    finally:
        remove_socket(path)


URL_RETRY_MAX_S = 5.0


async def _publish_url(path: Path, url: str, limiter: trio.CapacityLimiter) -> None:
    """Write the bound URL where the CLI looks for it. The API serves whether or not this works: on a full disk
    the write is retried, with a growing pause, until it goes through."""
    pause = 0.2
    while True:
        try:
            await trio.to_thread.run_sync(partial(files.atomic_write, path, url.encode(), mode=0o644), limiter=limiter)
            return
        except OSError as exc:
            if pause == 0.2:
                log.error("cannot write %s (%s): serving anyway, retrying until it can be written", path, exc)
            await trio.sleep(pause)
            pause = min(pause * 2, URL_RETRY_MAX_S)


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: shutting down; VMs keep running", signal.Signals(signum).name)
            # Unwinding 10 000 actors makes a lot of short-lived garbage; collecting it while exiting only
            # slows the exit (measured: ~0.4 s of 1.6 s at 10 000 instances).
            gc.disable()
            scope.cancel()
            return
