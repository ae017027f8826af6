"""The /v1/images endpoints: the backing images of a virtualizer that keeps them (qemu does; simulation not).

    GET    /v1/images                      {"images": [{id, format, virtual_size, ..., last_used, in_use}]}
    POST   /v1/images?source=S&id=ID[&sha256=H]
                                           NDJSON: {"progress": {...}} lines, then {"image": {...}} or {"error": ...}
    DELETE /v1/images/{id}                 {"removed": id}; 409 image_in_use if an instance uses it
    POST   /v1/images/gc[?older_than=S]    {"removed": [ids]}: unused images not used for S seconds (default:
                                           the virtualizer's setting)

An image is "in use" while any instance the supervisor knows (in whatever state, pending included) names it, or a
warm pool is configured on it (its slots' disks are on it): the check is made under the image's lock, against the
live instance table.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Collection, Iterator
from typing import Any

import attrs
import trio

from launcher.core.supervisor import Supervisor
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.protocol import ImageCatalog, ImageRecord
from launcher.plugin.spec import is_valid_image_id
from launcher.transport.http import Handler, Request, Response, Stream, Write

NDJSON = "application/x-ndjson"


class ImagesInUse(Collection[str]):
    """The image ids that the supervisor's instances and warm pools (whose slots' disks are on them) use, read live
    at each question."""

    def __init__(self, supervisor: Supervisor) -> None:
        """Reads `supervisor`'s instances at each question; keeps no copy."""
        self._supervisor = supervisor

    def _ids(self) -> set[str]:
        pools = {pool["image_uuid"] for warm in self._supervisor.warm_pools().values() for pool in warm.describe()}
        return pools | {i.spec.image_uuid for i in self._supervisor.instances() if i.spec.image_uuid}

    def __contains__(self, image_id: object) -> bool:
        """Whether an instance uses `image_id` now."""
        return image_id in self._ids()

    def __iter__(self) -> Iterator[str]:
        """The image ids in use now, each once."""
        return iter(self._ids())

    def __len__(self) -> int:
        """How many distinct images are in use now."""
        return len(self._ids())


class ImageRoutes:
    """The /v1/images routes, over the `ImageCatalog` of the first enabled virtualizer that keeps one
    (`Supervisor.image_store`); `not_found` where none does."""

    def __init__(self, supervisor: Supervisor) -> None:
        """Routes over `supervisor`'s backend; an image is in use while one of its instances names it."""
        self.supervisor = supervisor
        self.in_use = ImagesInUse(supervisor)

    def routes(self) -> list[tuple[str, re.Pattern[str], Handler]]:
        """(method, path pattern, handler) rows for `Api`'s route table."""
        i = r"(?P<image_id>[^/]+)"
        return [
            ("GET", re.compile(r"/v1/images"), self.list_images),
            ("POST", re.compile(r"/v1/images"), self.import_image),
            ("POST", re.compile(r"/v1/images/gc"), self.gc),
            ("DELETE", re.compile(rf"/v1/images/{i}"), self.remove),
        ]

    def _catalog(self) -> ImageCatalog:
        store = self.supervisor.image_store()
        if store is None:
            raise LauncherError(errors.NOT_FOUND, f"no enabled virtualizer ({', '.join(self.supervisor.backends)}) "
                                                  "keeps backing images")
        return store

    async def list_images(self, request: Request) -> Response:
        """GET /v1/images: every backing image, each marked in use or not."""
        in_use = set(self.in_use)
        return Response.json(200, {"images": [_describe(image, image.id in in_use)
                                              for image in self._catalog().list()]})

    async def import_image(self, request: Request) -> Stream:
        """POST /v1/images?source=...&id=...[&sha256=...]: import a backing image, answered as an NDJSON
        stream of progress lines ending in the image or the error. A missing or disallowed source or a bad id is
        `invalid_data` before the stream starts."""
        catalog = self._catalog()
        source = request.query.get("source", "")
        image_id = request.query.get("id", "")
        if not source:
            raise LauncherError(errors.INVALID_DATA, "source: required (a path on the node, or a file://, http:// "
                                                     "or https:// URL, within the allowed import sources)")
        _check_id(image_id)
        await catalog.check_source(source)  # 400 invalid_data before the stream starts, if not allowed
        sha256 = request.query.get("sha256") or None

        async def produce(write: Write) -> None:
            send, receive = trio.open_memory_channel[bytes](64)

            def progress(report: Any) -> None:
                try:
                    send.send_nowait(_line({"progress": attrs.asdict(report)}))
                except trio.WouldBlock:
                    pass  # the client reads slowly: skip a report, a newer one follows

            async def run_import() -> None:
                async with send:
                    try:
                        image = await catalog.import_(source, image_id, expected_sha256=sha256, on_progress=progress)
                    except LauncherError as exc:
                        await send.send(_line(exc.as_dict()))
                    else:
                        await send.send(_line({"image": _describe(image, image.id in self.in_use)}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_import)
                async with receive:
                    async for line in receive:
                        await write(line)

        return Stream(NDJSON, produce=produce)

    async def remove(self, request: Request) -> Response:
        """DELETE /v1/images/{image_id}: remove an image no instance uses (the catalog refuses one in use)."""
        image_id = request.params["image_id"]
        _check_id(image_id)
        await self._catalog().remove(image_id, self.in_use)
        return Response.json(200, {"removed": image_id})

    async def gc(self, request: Request) -> Response:
        """POST /v1/images/gc[?older_than=<seconds>]: remove the unused images older than that (the catalog's
        default age if absent); the ids removed."""
        catalog = self._catalog()
        raw = request.query.get("older_than")
        try:
            older_than = catalog.gc_age_s if raw is None else float(raw)
        except ValueError:
            older_than = -1.0
        if not 0 <= older_than < 1e12:
            raise LauncherError(errors.INVALID_DATA, "query parameter older_than: expected a number of seconds >= 0")
        return Response.json(200, {"removed": await catalog.gc(self.in_use, older_than)})


def _check_id(image_id: str) -> None:
    if not is_valid_image_id(image_id):
        raise LauncherError(errors.INVALID_DATA, f"id: {image_id!r} is not a valid image id (letters, digits, "
                                                 "'.', '_' and '-', not '.' or '..')")


def _describe(image: ImageRecord, in_use: bool) -> dict[str, Any]:
    last_used = datetime.datetime.fromtimestamp(image.last_used, datetime.UTC)
    return {**image.record(), "last_used": last_used.isoformat(timespec="seconds"), "in_use": in_use}


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"
