"""One instance's container: `DockerVirtualizer`, the docker backend's `launcher.plugin.protocol.Virtualizer`.

The protocol's docstrings are the contract of each call; this says only how the engine keeps it. Every engine
call is an `engine.Engine` call, bounded (engine.py).

``ensure_backing_image``
    the image loader's `ensure` (images.py): the ``docker_image`` present in the engine, loaded once from the
    image dir (or pulled, only with ``docker.pull``).
``create_image``
    the container, created (not started) from `container.create_body`: an existing container of this name (a
    partial earlier attempt) is removed first, so it overwrites. The user-data's ``write_files`` are uploaded
    into it (`userdata`); a failure removes the container again.
``start_vm``
    the engine's start; a container that runs already is adopted.
``monitor_vm``
    re-reads the container (inspect) whenever the backend's event stream (events.py) reports something about it,
    and every ``docker.poll_s`` as a backstop: running (or paused) → CONNECTED, anything else → CLOSED, after a
    ``container_exited`` event with its exit code and whether the kernel's OOM killer ended it (`oom_killed`).
    An engine that does not answer (stopped, restarting) is no answer, not "down": it asks again with a back-off
    up to ``docker.poll_s``. While it runs, its output goes to the instance's console.log (console.py).
``stop_vm``
    the engine's stop with ``t = ceil(grace)``: SIGTERM (to the container's init, which passes it on), SIGKILL
    once the grace has passed; at once (SIGKILL) for a grace of 0.
``stats``
    the engine's one-shot stats: memory in use less the page cache, CPU time over the allotted vCPUs (`CpuMeter`),
    and the writable layer's size (inspect with size).
``delete_image``
    removes the container with its writable layer and anonymous volumes; the image stays.
``attach_volume`` / ``detach_volume``
    not_supported, as in ciao: a container's mounts are fixed when it is created.

Volumes (mounts.py): ``ensure_backing_image`` checks the START's volumes exist in the node's store and can be
mounted (raw, a file); ``create_image`` binds them at ``/volumes/<id>``; ``start_vm`` mounts them on the host
first; ``stop_vm`` unmounts them once the container is down, ``delete_image`` too, and deletes the ``ephemeral``
ones (`launcher.plugin.volumes.remove_ephemeral_volumes`).

Parts of a START (image, create, start) are ``step <name>: ... in <ms> ms`` lines in the instance's log and
observations for /metrics (`BackendHost.observe_step`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from launcher.plugin.errors import (
    IMAGE_FAILURE,
    LAUNCH_FAILURE,
    NOT_SUPPORTED,
    STOP_FAILURE,
    LauncherError,
    VirtualizerError,
)
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import MonitorEvent, MonitorInbox, VmStats, VolumeCatalog, VolumeInfo
from launcher.plugin.spec import InstanceSpec
from launcher.plugin.usage import CpuMeter
from launcher.plugin.volumes import remove_ephemeral_volumes
from virtualizers.docker import console, container, mounts, userdata
from virtualizers.docker.engine import CONFLICT, NOT_FOUND, NOT_MODIFIED, Engine, EngineError, NoAnswer, path_part
from virtualizers.docker.events import EventHub
from virtualizers.docker.images import ImageLoader, ImageLoadError
from virtualizers.docker.settings import DockerSettings

MIB = 1 << 20
FIRST_RETRY_S = 0.1
CONSOLE_CATCH_UP_S = 5.0  # for the last of a stopped container's output


@attrs.define(eq=False)
class _Follower:
    """A monitor session's console follower: `down` tells it the container stopped, `done` says it finished."""

    down: trio.Event = attrs.Factory(trio.Event)
    done: trio.Event = attrs.Factory(trio.Event)


class DockerParts(Protocol):
    """What a container instance reads of its backend (`backend.DockerBackend` is one)."""

    settings: DockerSettings
    host: BackendHost
    engine: Engine
    loader: ImageLoader  # not `images`: that name is a backend's ImageCatalog, which this backend has none of
    events: EventHub
    node_volumes: VolumeCatalog | None  # the node's volume store, lent by the launcher


@attrs.define(eq=False)
class DockerVirtualizer:
    """One instance's container (module doc). Called by its actor only, one call at a time (`Virtualizer`)."""

    _backend: DockerParts
    _spec: InstanceSpec = attrs.field(init=False)
    _dir: Path = attrs.field(init=False)
    _cpu: CpuMeter = attrs.field(factory=CpuMeter, init=False)
    _volumes: Callable[[], Sequence[str]] = attrs.field(init=False)

    def init(self, spec: InstanceSpec, instance_dir: Path, volumes: Callable[[], Sequence[str]]) -> None:
        self._spec = spec
        self._dir = instance_dir
        self._volumes = volumes

    @property
    def _name(self) -> str:
        return container.container_name(self._backend.settings, self._spec.instance_uuid)

    @property
    def _path(self) -> str:
        return f"/containers/{path_part(self._name)}"

    @property
    def _engine(self) -> Engine:
        return self._backend.engine

    def _log(self, message: str) -> None:
        self._backend.host.log(self._dir, message)

    def _fail(self, code: str, reason: str) -> VirtualizerError:
        return VirtualizerError(code, reason, self._spec.instance_uuid)

    def _step_done(self, step: str, started: float, what: str) -> None:
        seconds = time.monotonic() - started
        self._log(f"step {step}: {what} in {round(seconds * 1000)} ms")
        self._backend.host.observe_step(step, seconds)

    # -- image and container ---------------------------------------------------------------------------------

    async def ensure_backing_image(self) -> None:
        if not self._spec.docker_image:
            raise self._fail(IMAGE_FAILURE, "a container needs start.docker_image")
        started = time.monotonic()
        for info in await self._volume_infos(IMAGE_FAILURE):
            problem = mounts.volume_problem(info)
            if problem is not None:
                raise self._fail(IMAGE_FAILURE, problem)
        try:
            how = await self._backend.loader.ensure(self._spec.docker_image)
        except ImageLoadError as exc:
            raise self._fail(IMAGE_FAILURE, str(exc)) from exc
        self._step_done("image", started, f"{self._spec.docker_image} {how}")

    async def create_image(self, user_data: str, meta_data: str, network_config: str | None) -> None:
        """The container, made again from scratch (module doc); `network_config` is not used (a container's
        network is the engine's)."""
        started = time.monotonic()
        try:
            user = userdata.read_user_data(user_data)
            params = container.create_body(attrs.evolve(self._spec, meta_data=meta_data), self._backend.settings,
                                           self._backend.host.data_dir, user, self._volumes())
        except (userdata.UserDataError, container.ContainerSpecError) as exc:
            raise self._fail(IMAGE_FAILURE, str(exc)) from exc
        try:
            await self._remove()
            await self._engine.call("POST", "/containers/create", params={"name": self._name}, body=params.body)
            if user.files:
                await self._engine.call("PUT", f"{self._path}/archive", params={"path": "/"},
                                        content=userdata.files_tar(user.files),
                                        headers={"Content-Type": "application/x-tar"})
        except (EngineError, NoAnswer) as exc:
            with trio.CancelScope(shield=True), trio.move_on_after(self._backend.settings.call_timeout_s):
                await self._remove_quietly()
            hint = " (the user-data has no runcmd, so the image's own command runs)" if user.command is None else ""
            raise self._fail(IMAGE_FAILURE, f"cannot create container {self._name}: {exc}{hint}") from exc
        for note in params.notes:
            self._log(note)
        if user.ignored:
            self._log(f"user-data keys not applied to a container: {', '.join(user.ignored)}")
        files = f", {len(user.files)} file(s) written" if user.files else ""
        command = "the image's command" if user.command is None else f"command {list(user.command)!r:.200}"
        self._step_done("disk", started, f"container {self._name} created (hostname {params.hostname}, "
                                         f"{command}{files})")

    async def _volume_infos(self, code: str) -> list[VolumeInfo]:
        """The instance's volumes as the node's store has them; `code` if one is missing or there is no store."""
        ids = list(self._volumes())
        if not ids:
            return []
        store = self._backend.node_volumes
        if store is None:
            raise self._fail(code, "this node has no volume store a container can use")
        infos = []
        for volume in ids:
            try:
                infos.append(await store.get(volume))
            except LauncherError as exc:
                raise self._fail(code, f"volume {volume}: {exc.reason}") from exc
        return infos

    async def _unmount(self) -> None:
        """Unmount the instance's volumes from the host (logged); MountError if one stays mounted."""
        host = self._backend.host
        for volume in await mounts.unmount_all(host.data_dir, self._spec.instance_uuid, host.limiter):
            self._log(f"volume {volume} unmounted")

    async def _remove(self) -> bool:
        """Remove the container (with its writable layer and anonymous volumes) if it exists; whether it did."""
        try:
            await self._engine.call("DELETE", self._path, params={"force": True, "v": True})
        except EngineError as exc:
            if exc.status == NOT_FOUND:
                return False
            raise
        return True

    async def _remove_quietly(self) -> None:
        try:
            await self._remove()
        except (EngineError, NoAnswer) as exc:
            self._log(f"cannot remove container {self._name}: {exc}")

    async def delete_image(self) -> None:
        try:
            removed = await self._remove()
        except (EngineError, NoAnswer) as exc:
            self._log(f"cannot remove container {self._name}: {exc}")
            raise self._fail(STOP_FAILURE, f"cannot remove container {self._name}: {exc}") from exc
        if removed:
            self._log(f"container {self._name} removed (the image stays)")
        try:
            await self._unmount()
        except mounts.MountError as exc:
            raise self._fail(STOP_FAILURE, str(exc)) from exc
        store = self._backend.node_volumes
        if store is not None and self._spec.storage:
            try:
                deleted = await remove_ephemeral_volumes(store, self._spec, self._volumes())
            except LauncherError as exc:
                raise self._fail(STOP_FAILURE, f"cannot delete an ephemeral volume: {exc.reason}") from exc
            for volume in deleted:
                self._log(f"ephemeral volume {volume} deleted")

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start_vm(self) -> None:
        started = time.monotonic()
        host = self._backend.host
        try:
            for line in await mounts.mount_all(host.data_dir, self._spec.instance_uuid,
                                               await self._volume_infos(LAUNCH_FAILURE), host.limiter):
                self._log(line)
        except mounts.MountError as exc:
            raise self._fail(LAUNCH_FAILURE, str(exc)) from exc
        try:
            await self._engine.call("POST", f"{self._path}/start", ok_statuses=(NOT_MODIFIED,))
        except (EngineError, NoAnswer) as exc:
            hint = " (it is gone: DELETE the instance and START it again)" \
                if isinstance(exc, EngineError) and exc.status == NOT_FOUND else ""
            raise self._fail(LAUNCH_FAILURE, f"cannot start container {self._name}: {exc}{hint}") from exc
        self._step_done("start", started, f"container {self._name} started")

    async def _inspect(self) -> dict[str, Any] | None:
        """The container's inspect data, None if it does not exist. NoAnswer passes; another EngineError too."""
        try:
            data = await self._engine.call("GET", f"{self._path}/json")
        except EngineError as exc:
            if exc.status == NOT_FOUND:
                return None
            raise
        return data if isinstance(data, dict) else None

    async def monitor_vm(self, inbox: MonitorInbox, recover: bool) -> None:
        settings = self._backend.settings
        retry_s = FIRST_RETRY_S
        console_file = console.ConsoleFile(self._dir / console.CONSOLE_LOG, settings.console_max_bytes,
                                           settings.console_backups)
        follower: _Follower | None = None
        with self._backend.events.watch(self._name) as watch:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data = await self._inspect()
                    except (NoAnswer, EngineError):
                        await watch.wait(retry_s)  # no answer is not "down": ask again
                        retry_s = min(retry_s * 2, settings.poll_s)
                        continue
                    retry_s = FIRST_RETRY_S
                    state = data.get("State") if data is not None else None
                    if not isinstance(state, dict) or not state.get("Running"):
                        break
                    if follower is None:
                        await inbox.send(MonitorEvent.CONNECTED)
                        follower = _Follower()
                        nursery.start_soon(self._follow_console, console_file, follower)
                    await watch.wait(settings.poll_s)
                # Down: the output's last lines, by the follower (its stream ends with the container) or at once.
                with trio.move_on_after(CONSOLE_CATCH_UP_S):
                    if follower is not None:
                        follower.down.set()
                        await follower.done.wait()
                    else:
                        await self._read_console(console_file, follow=False)
                nursery.cancel_scope.cancel()
        self._report_exit(state)
        await inbox.send(MonitorEvent.CLOSED)

    async def _follow_console(self, console_file: console.ConsoleFile, follower: _Follower) -> None:
        """The container's output into its console.log while it runs, following again after a dropped stream;
        once `follower.down` is set, one last read, then `follower.done`."""
        retry_s = FIRST_RETRY_S
        try:
            while True:
                final = follower.down.is_set()
                if await self._read_console(console_file, follow=True):
                    retry_s = FIRST_RETRY_S
                if final:
                    return
                with trio.move_on_after(retry_s):
                    await follower.down.wait()
                retry_s = min(retry_s * 2, self._backend.settings.poll_s)
        finally:
            follower.done.set()

    async def _read_console(self, console_file: console.ConsoleFile, *, follow: bool) -> bool:
        """One pass of `console.follow`; whether it ended normally (not on an engine or file error)."""
        try:
            await console.follow(self._engine, self._name, console_file, self._backend.host.limiter,
                                 follow=follow)
        except (NoAnswer, EngineError, OSError):
            return False
        return True

    def _report_exit(self, state: Any) -> None:
        """A `container_exited` event and a log line: how the container ended (gone: exit code -1)."""
        if isinstance(state, dict):
            exit_code = state.get("ExitCode", -1)
            oom = bool(state.get("OOMKilled"))
            error = str(state.get("Error") or "")
            how = state.get("Status", "exited")
        else:
            exit_code, oom, error, how = -1, False, "", "gone"
        self._backend.host.emit("container_exited", instance_uuid=self._spec.instance_uuid, container=self._name,
                                status=how, exit_code=exit_code, oom_killed=oom, error=error)
        self._log(f"container {self._name} {how}: exit code {exit_code}"
                  + (", killed by the OOM killer (mem_mb reached)" if oom else "") + (f", {error}" if error else ""))

    async def stop_vm(self, grace: float) -> None:
        try:
            if grace <= 0:
                await self._engine.call("POST", f"{self._path}/kill", params={"signal": "KILL"},
                                        ok_statuses=(NOT_FOUND, CONFLICT))
                # The kill only sends the signal: down is once the engine says it no longer runs.
                await self._engine.call("POST", f"{self._path}/wait", params={"condition": "not-running"},
                                        ok_statuses=(NOT_FOUND,))
                self._log("container killed (SIGKILL)")
            else:
                seconds = math.ceil(grace)
                await self._engine.call("POST", f"{self._path}/stop", params={"t": seconds},
                                        timeout_s=seconds + self._backend.settings.call_timeout_s,
                                        ok_statuses=(NOT_MODIFIED, NOT_FOUND))
                self._log(f"container stopped (SIGTERM, SIGKILL after {seconds} s)")
        except (EngineError, NoAnswer) as exc:
            raise self._fail(STOP_FAILURE, f"cannot stop container {self._name}: {exc}") from exc
        # Only once it is down: a volume unmounted under a container that still runs would stay in use there, and
        # the next start would mount its file system a second time.
        await self._unmount_after_stop()

    async def _unmount_after_stop(self) -> None:
        """Take the volumes off the host once the container is down; one that stays mounted is only logged (the
        next start keeps it, DELETE tries again)."""
        try:
            await self._unmount()
        except mounts.MountError as exc:
            self._log(str(exc))

    # -- figures -------------------------------------------------------------------------------------------

    async def stats(self) -> VmStats:
        try:
            data = await self._engine.call("GET", f"{self._path}/json", params={"size": True})
        except (EngineError, NoAnswer):
            return VmStats()
        disk_mb = int(data.get("SizeRw") or 0) // MIB if isinstance(data, dict) else -1
        if not isinstance(data, dict) or not data.get("State", {}).get("Running"):
            return VmStats(disk_mb=disk_mb)
        try:
            figures = await self._engine.call("GET", f"{self._path}/stats", params={"stream": False,
                                                                                   "one-shot": True})
        except (EngineError, NoAnswer):
            return VmStats(disk_mb=disk_mb)
        return VmStats(memory_mb=_memory_mb(figures), cpu_percent=self._cpu_percent(figures), disk_mb=disk_mb)

    def _cpu_percent(self, figures: Any) -> int:
        try:
            cpu_ns = int(figures["cpu_stats"]["cpu_usage"]["total_usage"])
        except (KeyError, TypeError, ValueError):
            return -1
        return self._cpu.percent(cpu_ns / 1e9, self._spec.vcpus)

    async def attach_volume(self, volume_id: str) -> None:
        raise self._fail(NOT_SUPPORTED, "a container cannot have a volume attached while it exists (as in ciao)")

    async def detach_volume(self, volume_id: str) -> None:
        raise self._fail(NOT_SUPPORTED, "a container cannot have a volume detached (as in ciao)")

    def connected(self) -> None:
        self._cpu.reset()

    def lost_vm(self) -> None:
        self._cpu.reset()


def _memory_mb(figures: Any) -> int:
    """Memory in use less the page cache (as `docker stats` shows it), MiB; -1 if the engine gave none."""
    try:
        memory = figures["memory_stats"]
        usage = int(memory["usage"])
    except (KeyError, TypeError, ValueError):
        return -1
    stats = memory.get("stats") or {}
    cache = stats.get("total_inactive_file", stats.get("inactive_file", stats.get("cache", 0)))
    return max(0, usage - int(cache or 0)) // MIB
