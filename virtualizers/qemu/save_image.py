"""libvirt's QEMU save file, and a clone's save file streamed to libvirt through a named pipe (issue 19).

A template (templates.py) is a domain booted once and saved with `virDomainSaveFlags`. libvirt refuses to restore
a save file under another name, UUID or MAC (`restoreFlags(path, dxml)` checks dxml against the XML in the file),
so a clone is restored from a save file of its own: the template's file with the clone's XML *embedded* in place
of the template's, and QEMU's migration stream unchanged. It is never written to disk: `clone_pipe` makes a named
pipe and streams the header, then the template's stream, into it while libvirt restores from the pipe
(`restore_running`, through `Hypervisor.call`). docs/research/issue19-template-spike.md has the findings.

The file (libvirt src/qemu/qemu_saveimage.c, version 2), as `read_header` reads it:

- a 92-byte header (`HEADER`): the magic ``LibvirtQemudSave``, version, data_len, was_running, format (0: raw),
  cookieOffset, 14 unused words;
- data_len bytes: the domain XML, a NUL, the cookie XML and a NUL (when cookieOffset is not 0: the cookie starts
  there), then zero padding (libvirt leaves room, 64 KiB);
- QEMU's migration stream from ``92 + data_len`` to the end.

`clone_header` re-emits the header and data block with another XML and the same data_len, so the stream stays at
its offset; a new XML that does not fit is a ValueError. `clone_xml` edits the template's saved XML into a clone's:
name, UUID, the launcher's metadata, the disk (the clone's overlay, its `<backingStore>` dropped), the cdrom (the
clone's seed), the serial console's log and (EFI) the nvram. Everything else (devices, addresses, memory) must stay
as saved: libvirt checks it, and QEMU's stream depends on it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import attrs
import libvirt
import trio

from virtualizers.qemu import domain

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"  # libvirt's magic while a save is being written
HEADER = struct.Struct("<16sIIIII56s")  # magic, version, data_len, was_running, format, cookieOffset, unused[14]
SUPPORTED_VERSIONS = (2,)
PIPE_CHUNK = 1 << 20  # bytes per sendfile into the pipe


@attrs.frozen
class SaveHeader:
    """The header and data block of a save file (module doc). `xml`/`cookie` are "" when absent."""

    version: int
    data_len: int
    was_running: int
    format: int
    cookie_offset: int
    unused: bytes
    xml: str
    cookie: str

    @property
    def stream_offset(self) -> int:
        """Where QEMU's migration stream starts in the file."""
        return HEADER.size + self.data_len


def read_header(source: BinaryIO) -> SaveHeader:
    """The header of the save file open as `source` (read from its current position, which must be the start).
    ValueError if it is not a complete save file of a version this module knows, or its data block is cut short."""
    raw = source.read(HEADER.size)
    if len(raw) != HEADER.size:
        raise ValueError("not a libvirt save file: shorter than its header")
    magic, version, data_len, was_running, fmt, cookie_offset, unused = HEADER.unpack(raw)
    if magic == PARTIAL_MAGIC:
        raise ValueError("an unfinished libvirt save file (libvirt was still writing it)")
    if magic != MAGIC:
        raise ValueError(f"not a libvirt save file (magic {magic!r})")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"libvirt save file version {version} is not supported (only {SUPPORTED_VERSIONS})")
    if fmt != 0:
        raise ValueError(f"compressed libvirt save file (format {fmt}): only raw ones can be cloned")
    data = source.read(data_len)
    if len(data) != data_len or cookie_offset > data_len:
        raise ValueError("libvirt save file cut short in its data block")
    xml_end = cookie_offset or data_len
    return SaveHeader(
        version=version, data_len=data_len, was_running=was_running, format=fmt, cookie_offset=cookie_offset,
        unused=unused, xml=data[:xml_end].split(b"\0", 1)[0].decode(),
        cookie=data[cookie_offset:].split(b"\0", 1)[0].decode() if cookie_offset else "",
    )


def read_header_file(path: Path) -> SaveHeader:
    """`read_header` of the file `path` (blocking)."""
    with path.open("rb") as source:
        return read_header(source)


def clone_header(header: SaveHeader, xml: str) -> bytes:
    """The header and data block of a clone's save file: `header`'s fields and cookie with `xml` as the domain XML,
    padded with zeros to the same data_len (so the stream that follows keeps its offset). ValueError if the XML and
    the cookie (each with its NUL) do not fit in data_len."""
    xml_bytes = xml.encode() + b"\0"
    cookie_bytes = header.cookie.encode() + b"\0" if header.cookie_offset else b""
    data = xml_bytes + cookie_bytes
    if len(data) > header.data_len:
        raise ValueError(f"the clone's XML ({len(xml_bytes)} bytes) does not fit in the save file's data block "
                         f"({header.data_len} bytes, {len(cookie_bytes)} of them the cookie's)")
    cookie_offset = len(xml_bytes) if header.cookie_offset else 0
    return HEADER.pack(MAGIC, header.version, header.data_len, header.was_running, header.format, cookie_offset,
                       header.unused) + data + bytes(header.data_len - len(data))


@attrs.frozen
class CloneIdentity:
    """What `clone_xml` puts into the template's saved XML: the clone's domain name and libvirt UUID, the launcher
    metadata (domain.read_metadata reads it back), the template's key, and the clone's files."""

    name: str
    uuid: str
    metadata: domain.DomainMetadata
    template_key: str
    overlay: Path
    seed: Path
    console_log: Path
    nvram: Path | None = None  # EFI only: the clone's own copy of the variables


def clone_xml(saved_xml: str, clone: CloneIdentity) -> str:
    """The template's saved domain XML turned into `clone`'s (module doc). Pure. ValueError if the XML lacks the
    element to edit (name, uuid, the `vda` disk, the cdrom, the serial log; `<nvram>` when `clone.nvram` is set)."""
    ET.register_namespace(domain.METADATA_PREFIX, domain.METADATA_NS)
    ET.register_namespace(domain.TEMPLATE_PREFIX, domain.TEMPLATE_NS)
    root = ET.fromstring(saved_xml)
    child(root, "name").text = clone.name
    child(root, "uuid").text = clone.uuid
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for element in list(metadata):
        if element.tag.startswith((f"{{{domain.METADATA_NS}}}", f"{{{domain.TEMPLATE_NS}}}")):
            metadata.remove(element)
    instance = ET.SubElement(metadata, f"{{{domain.METADATA_NS}}}instance")
    ET.SubElement(instance, f"{{{domain.METADATA_NS}}}uuid").text = clone.metadata.instance_uuid
    ET.SubElement(instance, f"{{{domain.METADATA_NS}}}data-dir").text = clone.metadata.data_dir
    ET.SubElement(metadata, f"{{{domain.TEMPLATE_NS}}}clone", key=clone.template_key)

    disk = cdrom = None
    for element in root.iterfind("devices/disk"):
        target = element.find("target")
        if element.get("device") == "disk" and target is not None and target.get("dev") == domain.VIRTIO_TARGETS[0]:
            disk = element
        elif element.get("device") == "cdrom":
            cdrom = element
    if disk is None or cdrom is None:
        raise ValueError("the saved XML has no vda disk or no cdrom")
    child(disk, "source").set("file", str(clone.overlay))
    for backing in disk.findall("backingStore"):
        disk.remove(backing)
    child(cdrom, "source").set("file", str(clone.seed))
    logs = root.findall("devices/serial/log")
    if not logs:
        raise ValueError("the saved XML has no serial console log")
    for log in logs:
        log.set("file", str(clone.console_log))
    if clone.nvram is not None:
        child(root, "os/nvram").text = str(clone.nvram)
    return ET.tostring(root, encoding="unicode")


def child(parent: ET.Element, path: str) -> ET.Element:
    """`parent.find(path)`; ValueError if there is none."""
    found = parent.find(path)
    if found is None:
        raise ValueError(f"the saved XML has no <{path}>")
    return found


def restore_running(conn: libvirt.virConnect, path: Path) -> None:
    """Restore the save file (or pipe) `path` with the XML embedded in it, running. For `Hypervisor.call`."""
    conn.restoreFlags(str(path), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)


# -- the pipe --------------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class ClonePipe:
    """A clone's save file being streamed into a named pipe (`clone_pipe`). `done` is set once all of it is in the
    pipe; `written` counts the bytes so far; `total` is the whole file's size."""

    path: Path
    total: int
    written: int = 0
    done: trio.Event = attrs.field(factory=trio.Event)


@asynccontextmanager
async def clone_pipe(template_state: Path, fifo: Path, xml: str) -> AsyncIterator[ClonePipe]:
    """A named pipe at `fifo` that delivers the clone's save file: `clone_header(template's header, xml)`, then the
    template's stream read from `template_state`. A task of its own writes it while the block runs (restore from
    `fifo` inside the block); leaving the block stops the writer and removes the pipe.

    Bounded and cancellable, with no thread: the pipe is opened O_RDWR | O_NONBLOCK, so opening it never waits for
    a reader, and the writer waits for room with Trio. The path exists only while that descriptor is open, so a
    reader can never block in open(): on leaving, the path is unlinked first, then the descriptor closed, and a
    reader still reading sees the end of the file (a cut stream fails the restore; it never hangs on it).
    ValueError (from `clone_header`) or OSError before the block runs if the template's state cannot be used; an
    OSError of the writer is raised from the block."""
    state_file = await trio.to_thread.run_sync(template_state.open, "rb")
    try:
        header = await trio.to_thread.run_sync(read_header, state_file)
        size = os.fstat(state_file.fileno()).st_size
        head = clone_header(header, xml)
        if fifo.exists() or fifo.is_symlink():
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        try:
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            fifo.unlink()
            raise
        _widen(fd)
        pipe = ClonePipe(fifo, total=len(head) + size - header.stream_offset)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_all, fd, head, state_file.fileno(), header.stream_offset, size, pipe)
                yield pipe
                nursery.cancel_scope.cancel()
        finally:
            fifo.unlink(missing_ok=True)
            os.close(fd)
    finally:
        state_file.close()


def _widen(fd: int) -> None:
    """Give the pipe up to PIPE_CHUNK of buffer (Linux's default is 64 KiB; the limit for users is
    /proc/sys/fs/pipe-max-size, 1 MiB by default): fewer wake-ups of the writer per restore. Best effort."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_CHUNK)
    except OSError:
        pass


async def _write_all(fd: int, head: bytes, source: int, offset: int, end: int, pipe: ClonePipe) -> None:
    """Write `head`, then bytes [offset, end) of the file `source`, into the non-blocking pipe `fd`."""
    view = memoryview(head)
    while view:
        try:
            sent = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[sent:]
        pipe.written += sent
    while offset < end:
        try:
            sent = os.sendfile(fd, source, offset, min(PIPE_CHUNK, end - offset))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                await trio.lowlevel.wait_writable(fd)
                continue
            raise
        if sent == 0:
            raise OSError(errno.EIO, "the template's state file ended early")
        offset += sent
        pipe.written += sent
        await trio.lowlevel.checkpoint()
    pipe.done.set()
