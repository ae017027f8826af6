"""The /v1/volumes endpoints: the volumes of a virtualizer that keeps them (`launcher.plugin.protocol.VolumeCatalog`).

    GET    /v1/volumes                  {"volumes": [volume, ...]}
    POST   /v1/volumes                  JSON {"id", "size_mb", "format"?, "source_image"?, "clone"?} → 201 volume
    GET    /v1/volumes/{id}             volume
    POST   /v1/volumes/{id}/resize      JSON {"size_mb"} → volume (grow only; not while an instance uses it)
    DELETE /v1/volumes/{id}             {"removed": id}; 409 volume_in_use while an instance uses it

A volume is `{"id", "size_mb", "allocation_mb", "format", "source_image", "clone", "bootable", "path",
"attached_to"}`; `attached_to` is the uuid of the instance that has it (its START named it, or an ATTACH added it;
an ATTACH still queued reserves it), or null.
Each change is an event: `volume_created`, `volume_resized`, `volume_deleted`.

The store serialises the changes to one volume id (`VolumeCatalog`); the in-use check is made against the live
instance table just before the change is handed to it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from launcher.core.supervisor import Supervisor
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError
from launcher.plugin.protocol import MAX_VOLUME_MB, VOLUME_FORMATS, VolumeCatalog, VolumeInfo
from launcher.plugin.spec import is_valid_image_id
from launcher.transport.http import Handler, Request, Response
from launcher.transport.payloads import is_valid_uuid

CLONES = ("cow", "copy")
_CREATE_KEYS = frozenset({"id", "size_mb", "format", "source_image", "clone"})


class VolumeRoutes:
    """The /v1/volumes routes, over the `VolumeCatalog` of the first enabled virtualizer that keeps one
    (`Supervisor.volume_store`); `not_supported` where none does. Creating, resizing and deleting a volume
    emit their event; a volume an instance has (or has an ATTACH queued for) is `volume_in_use` for resize and
    delete."""

    def __init__(self, supervisor: Supervisor) -> None:
        """Routes over `supervisor`'s backend, its volume users and its journal."""
        self.supervisor = supervisor

    def routes(self) -> list[tuple[str, re.Pattern[str], Handler]]:
        """(method, path pattern, handler) rows for `Api`'s route table."""
        v = r"(?P<volume_id>[^/]+)"
        return [
            ("GET", re.compile(r"/v1/volumes"), self.list_volumes),
            ("POST", re.compile(r"/v1/volumes"), self.create),
            ("GET", re.compile(rf"/v1/volumes/{v}"), self.show),
            ("POST", re.compile(rf"/v1/volumes/{v}/resize"), self.resize),
            ("DELETE", re.compile(rf"/v1/volumes/{v}"), self.delete),
        ]

    # ----------------------------------------------------------------- handlers

    async def list_volumes(self, request: Request) -> Response:
        """GET /v1/volumes: every volume, with the instance that uses it."""
        users = self._users()
        return Response.json(200, {"volumes": [_describe(v, users.get(v.id)) for v in await self._catalog().list()]})

    async def show(self, request: Request) -> Response:
        """GET /v1/volumes/{volume_id}: one volume, with the instance that uses it."""
        volume_id = _checked_id(request.params["volume_id"])
        return Response.json(200, _describe(await self._catalog().get(volume_id), self._users().get(volume_id)))

    async def create(self, request: Request) -> Response:
        """POST /v1/volumes with a JSON object (id, size_mb, format, source_image, clone): 201 and the new
        volume."""
        catalog = self._catalog()
        body = _json_object(request.body, _CREATE_KEYS)
        volume_id = _checked_id(_field(body, "id", str, required=True))
        source_image = _field(body, "source_image", str, default="")
        if source_image and not is_valid_image_id(source_image):
            raise LauncherError(errors.INVALID_DATA, f"source_image: {source_image[:70]!r} is not a valid image id")
        size_mb = _size(body, minimum=0 if source_image else 1)
        fmt = _choice(body, "format", VOLUME_FORMATS)
        clone = _choice(body, "clone", CLONES)
        volume = await catalog.create(volume_id, size_mb, fmt, source_image=source_image, clone=clone)
        self.supervisor.journal.emit("volume_created", volume_id=volume.id, size_mb=volume.size_mb,
                                     format=volume.format, source_image=volume.source_image)
        return Response.json(201, _describe(volume, None))

    async def resize(self, request: Request) -> Response:
        """POST /v1/volumes/{volume_id}/resize with ``{"size_mb": n}``: the resized volume."""
        catalog = self._catalog()
        volume_id = _checked_id(request.params["volume_id"])
        body = _json_object(request.body, frozenset({"size_mb"}))
        size_mb = _size(body, minimum=1)
        self._refuse_in_use(volume_id, "resized")
        volume = await catalog.resize(volume_id, size_mb)
        self.supervisor.journal.emit("volume_resized", volume_id=volume_id, size_mb=volume.size_mb)
        return Response.json(200, _describe(volume, None))

    async def delete(self, request: Request) -> Response:
        """DELETE /v1/volumes/{volume_id}: ``{"removed": id}``."""
        catalog = self._catalog()
        volume_id = _checked_id(request.params["volume_id"])
        self._refuse_in_use(volume_id, "deleted")
        await catalog.delete(volume_id)
        self.supervisor.journal.emit("volume_deleted", volume_id=volume_id)
        return Response.json(200, {"removed": volume_id})

    # ----------------------------------------------------------------- helpers

    def _catalog(self) -> VolumeCatalog:
        store = self.supervisor.volume_store()
        if store is None:
            raise LauncherError(errors.NOT_SUPPORTED, f"no enabled virtualizer ({', '.join(self.supervisor.backends)})"
                                                      " keeps volumes")
        return store

    def _users(self) -> dict[str, str]:
        """Volume id → the uuid of the instance that has it or an ATTACH queued for it (`Supervisor.volume_users`)."""
        return self.supervisor.volume_users

    def _refuse_in_use(self, volume_id: str, what: str) -> None:
        user = self._users().get(volume_id)
        if user is not None:
            raise LauncherError(errors.VOLUME_IN_USE, f"volume {volume_id} is used by instance {user}: it cannot be "
                                                      f"{what} until that instance is deleted")



def _describe(volume: VolumeInfo, user: str | None) -> dict[str, Any]:
    return {**attrs.asdict(volume), "bootable": volume.bootable, "attached_to": user}


def _checked_id(volume_id: str) -> str:
    if not is_valid_uuid(volume_id):
        raise LauncherError(errors.INVALID_DATA, f"id: {volume_id[:70]!r} is not a valid volume id (hex groups "
                                                 "joined by '-', at most 64 characters)")
    return volume_id


def _json_object(body: bytes, known: frozenset[str]) -> dict[str, Any]:
    """The body's JSON object, whose keys must all be `known`."""
    try:
        value = json.loads(body or b"{}")
    except ValueError as exc:
        raise LauncherError(errors.INVALID_PAYLOAD, f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise LauncherError(errors.INVALID_PAYLOAD, f"the body must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise LauncherError(errors.INVALID_DATA, f"{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    return value


def _field(body: dict[str, Any], key: str, kind: type, *, required: bool = False, default: Any = None) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise LauncherError(errors.INVALID_DATA, f"{key}: required")
        return default
    if type(value) is not kind:
        raise LauncherError(errors.INVALID_DATA, f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _size(body: dict[str, Any], minimum: int) -> int:
    size: int = _field(body, "size_mb", int, required=minimum > 0, default=0)
    if not minimum <= size <= MAX_VOLUME_MB:
        raise LauncherError(errors.INVALID_DATA, f"size_mb: must be from {minimum} to {MAX_VOLUME_MB} (64 TiB), "
                                                 f"got {size}")
    return size


def _choice(body: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value: str = _field(body, key, str, default=choices[0])
    if value not in choices:
        raise LauncherError(errors.INVALID_DATA, f"{key}: must be one of {', '.join(choices)}, got {value[:70]!r}")
    return value
