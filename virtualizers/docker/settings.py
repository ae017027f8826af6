"""The `docker:` section of the launcher config: `DockerSettings`, every key optional.

`open_backend` checks the raw section with `launcher.plugin.settings.parse_section`, so an unknown key, a value of
the wrong type or one a validator refuses is a SetupError naming the key (``docker.socket: ...``).
"""

from __future__ import annotations

from pathlib import Path

import attrs

from launcher.plugin.settings import at_least, at_most

SECTION = "docker"
SOCKET_SCHEME = "unix://"
IMAGES_DIR = "docker-images"  # the default image dir, under the data dir
MIB = 1 << 20


def _socket_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.startswith(SOCKET_SCHEME + "/"):
        raise ValueError(f"{attribute.name}: must be unix:///<absolute path of the engine's socket>, got {value!r}")


def _name_prefix(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or not value.replace("-", "").replace("_", "").replace(".", "").isalnum() or not value[0].isalnum():
        raise ValueError(f"{attribute.name}: letters, digits, '.', '_' and '-', beginning with a letter or digit; "
                         f"got {value!r}")


@attrs.frozen
class DockerSettings:
    """The `docker:` section of the launcher config (docs/containers.md says what each does)."""

    socket: str = attrs.field(default="unix:///run/docker.sock", validator=_socket_url)  # the engine's API socket
    api_version: str = "1.41"  # the Engine API version asked for (Debian 12's docker.io 20.10 speaks 1.41)
    # Where images are loaded from when the engine lacks them: <image_dir>/<repository path>/<tag>.image.tar
    # (docker save) or .rootfs.tar[.gz|.xz] (docker import); "" is <data_dir>/docker-images.
    image_dir: Path = Path("")
    pull: bool = False  # pull from a registry an image that the engine and the image dir lack
    # The engine network the containers join (with the START's MAC and address); "" for none (no network at all).
    network: str = ""
    disk_quota: bool = False  # pass disk_mb as the storage-opt size (the engine needs overlay2 on xfs with pquota)
    name_prefix: str = attrs.field(default="launcher-", validator=_name_prefix)  # container name: <prefix><uuid>
    call_timeout_s: float = attrs.field(default=30.0, validator=at_least(0.1))  # bound on any one API call
    image_timeout_s: float = attrs.field(default=600.0, validator=at_least(1))  # one image load, import or pull
    # How often a running container's state is re-read without an engine event (a backstop for a lost event),
    # and the longest back-off between two tries at an engine that does not answer.
    poll_s: float = attrs.field(default=5.0, validator=at_least(0.1))
    console_max_bytes: int = attrs.field(default=2 * MIB, validator=at_least(4096))  # as virtlogd's max_size
    console_backups: int = attrs.field(default=3, validator=at_most(20))  # console.log.1 .. .N, as max_backups
    destroy_orphans: bool = False  # remove containers of ours that have no instance dir (else report only)
    # Whether a START may ask for a privileged container (requirements.privileged, as ciao HEAD honoured it): a
    # privileged container is root on the host, so a node must opt in.
    allow_privileged: bool = False

    def image_root(self, data_dir: Path) -> Path:
        """The image dir: `image_dir`, or <data_dir>/docker-images if it is not set."""
        return self.image_dir if str(self.image_dir) not in ("", ".") else data_dir / IMAGES_DIR

    @property
    def socket_path(self) -> str:
        """The socket's file path."""
        return self.socket[len(SOCKET_SCHEME):]
