"""Error codes (ciao's, so existing controllers understand them) and the exceptions that carry them."""

from __future__ import annotations

import errno

# Parsing and validation.
INVALID_PAYLOAD = "invalid_payload"  # the body cannot be parsed at all
INVALID_DATA = "invalid_data"  # parsed, but a field is wrong, missing or unknown
# Admission.
FULL_CN = "full_cn"
NODE_MAINTENANCE = "node_maintenance"
# State conflicts.
NO_INSTANCE = "no_instance"
ALREADY_RUNNING = "already_running"
ALREADY_STOPPED = "already_stopped"
INSTANCE_EXISTS = "instance_exists"
INSTANCE_CORRUPT = "instance_corrupt"
# Our addition: the instance's bounded inbox is full (ciao blocked instead, see reference §18).
INSTANCE_BUSY = "instance_busy"
# Virtualizer failures.
IMAGE_FAILURE = "image_failure"
NETWORK_FAILURE = "network_failure"
LAUNCH_FAILURE = "launch_failure"
STOP_FAILURE = "stop_failure"
# Our addition: `launcher images rm` of an image that an instance uses.
IMAGE_IN_USE = "image_in_use"
# Volumes (ciao's attach/detach codes, reference §6.6, and our volume store's).
ALREADY_ATTACHED = "already_attached"
NOT_ATTACHED = "not_attached"
ATTACH_FAILURE = "attach_failure"
DETACH_FAILURE = "detach_failure"
NOT_SUPPORTED = "not_supported"  # the virtualizer cannot do this (e.g. it keeps no volumes)
VOLUME_EXISTS = "volume_exists"  # our addition: POST /v1/volumes with an id that is taken
VOLUME_IN_USE = "volume_in_use"  # our addition: DELETE or resize of a volume an instance uses
VOLUME_FAILURE = "volume_failure"  # our addition: the volume store could not create, resize or remove it
# Our addition: the data dir's file system is full (ENOSPC, EDQUOT): the command could not be made durable.
STORAGE_FULL = "storage_full"
# Transport-level codes of the HTTP API.
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
EVENTS_EXPIRED = "events_expired"
REQUEST_TIMEOUT = "request_timeout"  # a request body that did not arrive in time (HTTP 408)
TOO_MANY_CONNECTIONS = "too_many_connections"  # every allowed connection is busy (HTTP 503)
INTERNAL = "internal_error"


class SetupError(Exception):
    """The launcher cannot run as configured: a wrong setting or a host that is not ready (libvirt unreachable,
    a data dir QEMU cannot reach, ...). An operator's problem, not a bug: `launcher serve` and
    `launcher hard-reset` print the message as one line, which says what to do, and exit with status 2.
    Virtualizer backends raise it from their opener (`launcher.plugin.protocol.OpenBackend`)."""


class LauncherError(Exception):
    """A failure that is reported to the caller as a ciao error code plus a human reason."""

    def __init__(self, code: str, reason: str, instance_uuid: str = "") -> None:
        """`code` is one of this module's codes, `reason` says what went wrong in words an operator can act on,
        `instance_uuid` the instance concerned ("" for none; the actor fills it in for a virtualizer's error)."""
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.instance_uuid = instance_uuid

    def as_dict(self) -> dict[str, str]:
        """The error as the API's JSON body and the failure events carry it (`error`, `reason`, `instance_uuid`)."""
        return {"error": self.code, "reason": self.reason, "instance_uuid": self.instance_uuid}


def write_failure(exc: OSError, what: str, code: str, instance_uuid: str = "") -> LauncherError:
    """A LauncherError for a failed write of `what`: STORAGE_FULL when the file system is full (or over its
    quota), `code` for any other error."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = f"node storage full: cannot write {what}: {exc.strerror or exc}" if full else f"cannot write {what}: {exc}"
    return LauncherError(STORAGE_FULL if full else code, reason, instance_uuid)


class PayloadError(LauncherError):
    """A command payload that is unparseable (`invalid_payload`) or wrong (`invalid_data`)."""


class VirtualizerError(LauncherError):
    """A virtualizer call failed; `code` is the ciao code of the phase (image_failure, launch_failure, ...)."""
