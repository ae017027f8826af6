"""The volume store's records: what libvirt does not keep about a volume, one JSON file per volume.

A record, ``<data_dir>/volume-records/<volume id>.json``, says the volume's libvirt name, its format, the image it
was made from and the kind of clone ("cow" or "copy"; both "" for a blank volume), and when it was made. The
records live outside the pool directory (a dir pool lists every file in it as a volume). A record is written
last, atomically: it is the commit marker of a create, so a volume without a record is not listed, and
`VolumeStore.open` deletes such volumes in the own pool (a create that a crash interrupted). In any pool, `open`
removes records whose volume is gone and rebuilds a broken record from its volume (the source image from a
copy-on-write child's backing file; a full copy then looks blank).

Volumes are named ``<volume id>.<fmt>`` in their pool (so that the files of a dir pool show their format);
`names_of` and `id_of` go between the two. The functions that touch files block: the store runs them in
worker threads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import attrs

from launcher.plugin.files import atomic_write, fsync_dir, make_dirs
from launcher.plugin.protocol import VOLUME_FORMATS, is_valid_volume_id

log = logging.getLogger(__name__)

RECORDS_DIR = "volume-records"  # the volumes' records, under the data dir (not in the pool: module doc)
RECORD_SUFFIX = ".json"


@attrs.frozen
class VolumeRecord:
    """What the store keeps about a volume besides libvirt (the content of its record file)."""

    id: str
    name: str  # the libvirt volume's name: <id>.<fmt>
    format: str
    source_image: str = ""
    clone: str = ""
    created_at: str = ""  # ISO-8601, UTC

    def as_json(self) -> bytes:
        """The record file's content."""
        return json.dumps(attrs.asdict(self), indent=2, sort_keys=True).encode() + b"\n"


def names_of(volume_id: str) -> tuple[str, ...]:
    """The names a volume `volume_id` may have in a pool: ``<id>.<fmt>``, and ``<id>`` (an operator's)."""
    return (volume_id, *(f"{volume_id}.{fmt}" for fmt in VOLUME_FORMATS))


def id_of(name: str) -> str | None:
    """The volume id of a volume named ``<id>.<fmt>``, or None for a name of another kind."""
    volume_id, dot, fmt = name.rpartition(".")
    return volume_id if dot and fmt in VOLUME_FORMATS and is_valid_volume_id(volume_id) else None


def load_records(records_dir: Path) -> tuple[dict[str, VolumeRecord], set[str]]:
    """The records in `records_dir` (made if missing) by volume id, and the ids whose record is broken; removes
    the temp file of a write that did not finish."""
    make_dirs(records_dir, mode=0o700)
    records, broken = {}, set()
    for path in sorted(records_dir.iterdir()):
        if path.name.startswith("."):
            if path.name.endswith(".tmp"):  # an atomic_write that did not finish
                path.unlink()
            continue
        volume_id = path.name.removesuffix(RECORD_SUFFIX)
        try:
            raw = json.loads(path.read_bytes())
            record = VolumeRecord(**raw)
            if record.id != volume_id or not is_valid_volume_id(volume_id) or \
                    record.name not in names_of(volume_id) or record.format not in VOLUME_FORMATS:
                raise ValueError("not the record of this volume")
        except (ValueError, TypeError) as exc:
            log.warning("volume store: ignoring %s, which is broken (%s)", path, exc)
            if is_valid_volume_id(volume_id):
                broken.add(volume_id)
            continue
        records[volume_id] = record
    return records, broken


def write_record(records_dir: Path, record: VolumeRecord) -> None:
    """Write `record` atomically (the commit of its volume)."""
    atomic_write(records_dir / f"{record.id}{RECORD_SUFFIX}", record.as_json())


def remove_record(records_dir: Path, volume_id: str) -> None:
    """Remove the record of `volume_id`, if there is one, durably."""
    (records_dir / f"{volume_id}{RECORD_SUFFIX}").unlink(missing_ok=True)
    fsync_dir(records_dir)
