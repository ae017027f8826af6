"""Warm starts from a prepared pool: VMs made ahead of any START, each held before its guest runs a single
instruction, which a START of their shape claims instead of booting from nothing (part of the plugin API,
`launcher.plugin`; docs/warm-starts.md is the operator's page).

A backend that keeps such pools has a ``warm`` attribute, a `WarmPools`, made from its ``pools`` settings
(`PoolSettings`) and a `SlotMaker` (how that backend makes, discards and finds its slots). The core uses it in
three places, all in the Trio thread:

- admission counts what the pools' slots hold (`WarmPools.held`) beside what instances were promised: a slot
  holds its memory, even while QEMU has touched little of it;
- at dispatch, an admitted START of a slot's shape (`slot_shape`) gets a ready slot set aside for it
  (`WarmPools.reserve`); from then on its resources are the instance's. The instance's virtualizer takes it
  (`WarmPools.take`) in its create_image and claims it in start_vm; a slot taken is the virtualizer's to claim or
  discard, never given back: a slot that may have seen an identity is never handed to another instance;
- `WarmPools.run`, in the supervisor's nursery once the instances are recovered, makes slots until each pool has
  its `size`, one at a time and only while admission has room for them (`room_for`);
- once an instance is gone, `WarmPools.release` has the slot still reserved for it (never taken: the START ended
  before its create_image) discarded by `run`.

A slot's life: ``making`` → ``ready`` → ``reserved`` (for one instance) → taken, or → ``discarding`` → gone. A
slot made by an earlier launcher process that is still ready (never claimed, never run) is adopted by
`WarmPools.recover` when the backend opens, as long as its pool still wants it; the maker discards the rest.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from launcher.plugin.settings import at_least, at_most, one_of
from launcher.plugin.spec import InstanceSpec

log = logging.getLogger(__name__)

MAX_POOL_SIZE = 64
FW_TYPES = ("efi", "legacy")
SLOT_STATES = ("making", "ready", "reserved", "discarding")
RETRY_FIRST_S = 2.0  # a pool whose last slot could not be made waits this long, doubling up to RETRY_MAX_S
RETRY_MAX_S = 120.0
ROOM_RECHECK_S = 5.0  # how often a pool short of slots asks admission again while the node has no room


@attrs.frozen
class SlotShape:
    """What a slot fits: a START of this image, vCPUs, memory, firmware and disk size (``disk_mb`` 0: the image's
    own size), with no volumes."""

    image_uuid: str
    vcpus: int
    mem_mb: int
    fw_type: str  # "efi" or "legacy"
    disk_mb: int = 0

    def describe(self) -> dict[str, Any]:
        """The shape as JSON-able data (/v1/node)."""
        return attrs.asdict(self)

    @property
    def label(self) -> str:
        """The shape in a log line: image/vCPUs/memory/firmware."""
        return f"{self.image_uuid}/{self.vcpus}cpu/{self.mem_mb}MiB/{self.fw_type}"


def slot_shape(spec: InstanceSpec) -> SlotShape | None:
    """The shape of slot that could run `spec`, or None if no slot can: it boots from a volume, or has volumes
    (a slot is made without them: they would change its devices and its seed), or names no image."""
    if not spec.image_uuid or spec.storage:
        return None
    return SlotShape(spec.image_uuid, spec.vcpus, spec.mem_mb, "legacy" if spec.legacy_boot else "efi", spec.disk_mb)


@attrs.frozen
class WarmShapeSettings:
    """The START shape an entry of a warm-start setting serves (a pool here, a template in the qemu backend): its
    image, vCPUs, memory and firmware, checked as settings."""

    image_uuid: str
    vcpus: int = attrs.field(default=1, validator=at_least(1))
    mem_mb: int = attrs.field(default=256, validator=at_least(16))
    fw_type: str = attrs.field(default="efi", validator=one_of(*FW_TYPES))

    @property
    def shape(self) -> SlotShape:
        """The START shape served (the image's own disk size, no volumes)."""
        return SlotShape(self.image_uuid, self.vcpus, self.mem_mb, self.fw_type)


@attrs.define
class Backoff:
    """The failures of one job that is tried again and again (making a pool's slot, building a template): after a
    failure the job waits `first_s`, doubling up to `max_s` after each further one; a success resets the wait.
    Times are `trio.current_time()`."""

    first_s: float
    max_s: float
    failures: int = 0  # since the launcher started
    last_error: str = ""  # the last failure's reason, "" once the job succeeded
    retry_at: float = 0.0  # no try before this
    wait_s: float = attrs.field(default=attrs.Factory(lambda self: self.first_s, takes_self=True))

    def failed(self, reason: str) -> float:
        """Count a failure for `reason`; the seconds until the job may be tried again."""
        self.failures += 1
        self.last_error = reason
        self.retry_at = trio.current_time() + self.wait_s
        waited, self.wait_s = self.wait_s, min(self.wait_s * 2, self.max_s)
        return waited

    def succeeded(self) -> None:
        """The job worked: no error to show, and the next failure waits `first_s` again."""
        self.last_error = ""
        self.wait_s = self.first_s

    def due(self, now: float) -> bool:
        """Whether the job may be tried at `now`."""
        return now >= self.retry_at


@attrs.frozen
class PoolSettings(WarmShapeSettings):
    """One entry of a virtualizer's ``pools`` list: keep `size` slots of this shape."""

    disk_mb: int = 0  # the disk size a START names (0: the image's own)
    size: int = attrs.field(default=1, validator=[at_least(1), at_most(MAX_POOL_SIZE)])

    @property
    def shape(self) -> SlotShape:
        """The shape of this pool's slots."""
        return attrs.evolve(super().shape, disk_mb=self.disk_mb)


def check_pools(pools: Sequence[PoolSettings]) -> None:
    """ValueError("pools: ...") if two pools have the same shape (one would never be used)."""
    shapes = [pool.shape for pool in pools]
    for index, shape in enumerate(shapes):
        if shape in shapes[:index]:
            raise ValueError(f"pools[{index}]: the same shape as pools[{shapes.index(shape)}]; raise that one's size")


class SlotMaker(Protocol):
    """How a backend makes, discards and finds its slots (the virtualizer claims them: that is its own)."""

    async def make_slot(self, slot_id: str, shape: SlotShape) -> None:
        """Make the slot `slot_id` ready: its VM made and held before its guest runs. Raises (any exception, with
        a reason) if it cannot; leaves nothing behind then, nor if cancelled."""

    async def discard_slot(self, slot_id: str) -> None:
        """Remove the slot and everything it holds (its VM, its files); nothing if it is gone already."""

    async def surviving_slots(self) -> list[tuple[str, SlotShape]]:
        """The ready slots an earlier launcher process left (never claimed, never run), with their shapes. Anything
        else slot-like that nothing owns (a half-made slot, a slot's files without its VM) is removed by then."""


@attrs.define(eq=False)
class _Slot:
    id: str
    shape: SlotShape
    state: str = "making"  # one of SLOT_STATES
    instance_uuid: str = ""  # the instance it is reserved for


@attrs.define(eq=False)
class _PoolState:
    settings: PoolSettings
    made: int = 0  # slots made since the launcher started
    claimed: int = 0  # slots taken by instances
    backoff: Backoff = attrs.Factory(lambda: Backoff(RETRY_FIRST_S, RETRY_MAX_S))  # slots that could not be made


class WarmPools:
    """The prepared pools of one backend (module doc). Used from the Trio thread only."""

    def __init__(self, pools: Sequence[PoolSettings], maker: SlotMaker, *, make_timeout_s: float,
                 emit: Callable[..., object]) -> None:
        """`make_timeout_s` bounds the making of one slot; `emit(type, **fields)` reports to the journal."""
        self._pools = {pool.shape: _PoolState(pool) for pool in pools}
        self._maker = maker
        self._make_timeout_s = make_timeout_s
        self._emit = emit
        self._slots: dict[str, _Slot] = {}
        self._changed = trio.Event()

    @property
    def configured(self) -> bool:
        """Whether any pool is configured."""
        return bool(self._pools)

    async def recover(self) -> None:
        """Adopt the ready slots an earlier launcher left, as many as their pools want; discard the others."""
        for slot_id, shape in await self._maker.surviving_slots():
            pool = self._pools.get(shape)
            if pool is not None and self._count(shape) < pool.settings.size:
                self._slots[slot_id] = _Slot(slot_id, shape, state="ready")
                log.info("warm pool %s: slot %s adopted", shape.label, slot_id)
            else:
                await self._maker.discard_slot(slot_id)
                log.info("warm pool: slot %s discarded (%s)", slot_id,
                         "no pool of its shape" if pool is None else "its pool is full")

    def held(self) -> tuple[int, int]:
        """(vCPUs, MiB of memory) that the slots not reserved hold (a reserved slot's are its instance's; one being
        discarded still holds them)."""
        slots = [slot.shape for slot in self._slots.values() if slot.state != "reserved"]
        return sum(shape.vcpus for shape in slots), sum(shape.mem_mb for shape in slots)

    def ready_for(self, spec: InstanceSpec) -> SlotShape | None:
        """The shape of a ready slot that `spec` could take now, or None. No change."""
        shape = slot_shape(spec)
        if shape is None or not any(s.shape == shape and s.state == "ready" for s in self._slots.values()):
            return None
        return shape

    def reserve(self, spec: InstanceSpec) -> bool:
        """Set a ready slot of `spec`'s shape aside for its instance (the supervisor, once the START is admitted);
        False if there is none. Its pool starts making the next one."""
        shape = slot_shape(spec)
        slot = next((s for s in self._slots.values() if s.shape == shape and s.state == "ready"), None)
        if slot is None:
            return False
        slot.state, slot.instance_uuid = "reserved", spec.instance_uuid
        self.wake()
        return True

    def take(self, instance_uuid: str) -> tuple[str, SlotShape] | None:
        """The slot reserved for `instance_uuid`, now the caller's own (to claim, or to discard with
        `discard`); None if none is. The pool forgets it."""
        slot = next((s for s in self._slots.values() if s.instance_uuid == instance_uuid), None)
        if slot is None:
            return None
        del self._slots[slot.id]
        pool = self._pools.get(slot.shape)
        if pool is not None:
            pool.claimed += 1
        return slot.id, slot.shape

    async def discard(self, slot_id: str) -> None:
        """Remove a taken slot (a claim that failed or was abandoned); never back to the pool."""
        await self._maker.discard_slot(slot_id)

    def release(self, instance_uuid: str) -> None:
        """`instance_uuid` is gone: a slot still reserved for it (never taken) is discarded by `run`."""
        for slot in self._slots.values():
            if slot.instance_uuid == instance_uuid and slot.state == "reserved":
                slot.state = "discarding"
                self.wake()

    def wake(self) -> None:
        """Something changed (a slot reserved, room freed): the refill looks again."""
        self._changed.set()
        self._changed = trio.Event()

    def describe(self) -> list[dict[str, Any]]:
        """Each pool with its slots by state and its counters, as JSON-able data (/v1/node)."""
        described = []
        for shape, pool in self._pools.items():
            states = [slot.state for slot in self._slots.values() if slot.shape == shape]
            described.append({**shape.describe(), "size": pool.settings.size, "ready": states.count("ready"),
                              "making": states.count("making"), "reserved": states.count("reserved"),
                              "discarding": states.count("discarding"),
                              "made": pool.made, "claimed": pool.claimed, "failures": pool.backoff.failures,
                              "last_error": pool.backoff.last_error})
        return described

    def slot_counts(self) -> dict[tuple[str, str], int]:
        """How many slots of each (image, state) there are, every configured image and state present (/metrics)."""
        counts = {(shape.image_uuid, state): 0 for shape in self._pools for state in SLOT_STATES}
        for slot in self._slots.values():
            counts[slot.shape.image_uuid, slot.state] += 1
        return counts

    async def run(self, room_for: Callable[[int, int], bool]) -> None:
        """Keep each pool at its size, one slot at a time, while `room_for(vcpus, mem_mb)` says admission has room
        for one more; until cancelled (a slot being made then is left to its maker's cleanup)."""
        while True:
            changed = self._changed
            doomed = next((slot for slot in self._slots.values() if slot.state == "discarding"), None)
            if doomed is not None:
                await self._discard_doomed(doomed)
                continue
            pool = self._next_short_pool(room_for)
            if pool is None:
                with trio.move_on_after(self._idle_wait()):
                    await changed.wait()
                continue
            await self._make_one(pool)

    async def _discard_doomed(self, slot: _Slot) -> None:
        try:
            await self._maker.discard_slot(slot.id)
        except Exception as exc:  # noqa: BLE001 - reported; the maker's recovery removes it at the next start
            log.warning("warm pool %s: cannot discard slot %s: %s", slot.shape.label, slot.id, exc)
        del self._slots[slot.id]

    def _count(self, shape: SlotShape) -> int:
        """Slots of `shape` made or being made, not yet reserved (nor being discarded)."""
        return sum(1 for slot in self._slots.values() if slot.shape == shape and slot.state in ("making", "ready"))

    def _next_short_pool(self, room_for: Callable[[int, int], bool]) -> _PoolState | None:
        now = trio.current_time()
        for shape, pool in self._pools.items():
            if self._count(shape) < pool.settings.size and pool.backoff.due(now) and room_for(shape.vcpus,
                                                                                              shape.mem_mb):
                return pool
        return None

    def _idle_wait(self) -> float:
        """How long the refill may sleep when no pool can be served now: until the next retry, or a recheck of the
        node's room if a pool is short; forever if every pool is full."""
        now, wait = trio.current_time(), math.inf
        for shape, pool in self._pools.items():
            if self._count(shape) < pool.settings.size:
                wait = min(wait, max(pool.backoff.retry_at - now, 0) or ROOM_RECHECK_S)
        return wait

    async def _make_one(self, pool: _PoolState) -> None:
        shape = pool.settings.shape
        slot = _Slot(uuid.uuid4().hex, shape)
        self._slots[slot.id] = slot
        started = time.monotonic()
        try:
            with trio.fail_after(self._make_timeout_s):
                await self._maker.make_slot(slot.id, shape)
        except Exception as exc:  # noqa: BLE001 - any failure of the maker: reported, retried later
            del self._slots[slot.id]
            reason = f"timed out after {self._make_timeout_s:g} s" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning("warm pool %s: cannot make a slot: %s (next try in %g s)", shape.label, reason,
                        pool.backoff.failed(reason))
            self._emit("warm_slot_failed", image_uuid=shape.image_uuid, reason=reason)
            return
        except BaseException:
            del self._slots[slot.id]
            raise
        slot.state = "ready"
        pool.made += 1
        pool.backoff.succeeded()
        log.info("warm pool %s: slot %s ready in %.3f s", shape.label, slot.id, time.monotonic() - started)


def warm_pools(backend: object) -> WarmPools | None:
    """The backend's prepared pools (its `warm` attribute), or None if it keeps none or has none configured."""
    pools: WarmPools | None = getattr(backend, "warm", None)
    return pools if pools is not None and pools.configured else None

