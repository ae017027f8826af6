"""virtualizers.qemu.save_image on synthetic save files (no libvirt): the header read and re-emitted with another XML,
an XML that does not fit refused, the clone XML edit, and a clone's save file streamed through a named pipe byte for
byte, bounded and cancellable."""

from __future__ import annotations

import io
import os
import secrets
import xml.etree.ElementTree as ET
from pathlib import Path

import attrs
import pytest
import trio

from virtualizers.qemu import domain, save_image
from virtualizers.qemu.domain import DomainParams, Firmware
from virtualizers.qemu.save_image import HEADER, MAGIC, CloneIdentity

DATA_LEN = 8192
COOKIE = "<qemu-migration>\n  <cpu/>\n</qemu-migration>\n"


def template_xml(tmp_path: Path) -> str:
    params = DomainParams(
        instance_uuid="template-0123456789ab", data_dir=tmp_path, vcpus=1, mem_mb=256, kvm=False, machine="q35",
        firmware=Firmware(efi=False), overlay=tmp_path / "tpl" / "disk.qcow2", seed=tmp_path / "tpl" / "seed.iso",
        network_kind="none", network_source="", mac="", console_log=tmp_path / "tpl" / "console.log",
        nvram=tmp_path / "tpl" / "nvram.fd", hotplug_slots=2,
    )
    root = ET.fromstring(domain.domain_xml(params))
    disk = root.find("devices/disk")
    assert disk is not None
    ET.SubElement(disk, "backingStore", type="file")  # as libvirt writes it into a save file
    return ET.tostring(root, encoding="unicode")


def synthetic_save(path: Path, xml: str, stream: bytes, *, cookie: str = COOKIE) -> None:
    """A save file as libvirt writes one (version 2, raw): header, XML, NUL, cookie, NUL, padding, stream."""
    xml_bytes = xml.encode() + b"\0"
    data = xml_bytes + (cookie.encode() + b"\0" if cookie else b"")
    header = HEADER.pack(MAGIC, 2, DATA_LEN, 1, 0, len(xml_bytes) if cookie else 0, bytes(56))
    path.write_bytes(header + data + bytes(DATA_LEN - len(data)) + stream)


@pytest.mark.parametrize("cookie", [COOKIE, ""])
def test_header_round_trips_and_keeps_the_stream_offset(tmp_path: Path, cookie: str) -> None:
    stream = b"QEVM" + secrets.token_bytes(1000)
    synthetic_save(tmp_path / "state.sav", "<domain>template</domain>", stream, cookie=cookie)
    raw = (tmp_path / "state.sav").read_bytes()
    header = save_image.read_header_file(tmp_path / "state.sav")
    assert (header.xml, header.cookie, header.data_len, header.was_running) == (
        "<domain>template</domain>", cookie, DATA_LEN, 1)
    assert raw[header.stream_offset:] == stream
    assert save_image.clone_header(header, header.xml) == raw[:header.stream_offset]  # the same bytes back

    clone = save_image.clone_header(header, "<domain>a clone with a longer name</domain>")
    assert len(clone) == header.stream_offset
    again = save_image.read_header(io.BytesIO(clone + stream))
    assert (again.xml, again.cookie, again.data_len) == ("<domain>a clone with a longer name</domain>", cookie,
                                                         DATA_LEN)


def test_an_xml_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    synthetic_save(tmp_path / "state.sav", "<domain/>", b"QEVM")
    header = save_image.read_header_file(tmp_path / "state.sav")
    room = DATA_LEN - len(COOKIE) - 2  # the XML's and the cookie's NULs
    assert len(save_image.clone_header(header, "x" * room)) == HEADER.size + DATA_LEN
    with pytest.raises(ValueError, match="does not fit"):
        save_image.clone_header(header, "x" * (room + 1))


@pytest.mark.parametrize("bad", [b"short", b"LibvirtQemudPart", b"NotAbirtSaveFile", b"version"])
def test_what_is_not_a_complete_save_file_is_refused(bad: bytes) -> None:
    if bad == b"version":
        raw = HEADER.pack(MAGIC, 3, 16, 0, 0, 0, bytes(56)) + bytes(16)
    elif bad == b"short":
        raw = bad
    else:
        raw = HEADER.pack(bad, 2, 16, 0, 0, 0, bytes(56)) + bytes(16)
    with pytest.raises(ValueError):
        save_image.read_header(io.BytesIO(raw))
    with pytest.raises(ValueError, match="cut short"):
        save_image.read_header(io.BytesIO(HEADER.pack(MAGIC, 2, 100, 0, 0, 0, bytes(56)) + bytes(10)))


def test_clone_xml_gives_the_clone_its_name_uuid_metadata_and_files(tmp_path: Path) -> None:
    clone = CloneIdentity(
        name="launcher-7d5b2c1e-0000-4000-8000-000000000001", uuid="7d5b2c1e-0000-4000-8000-000000000001",
        metadata=domain.DomainMetadata("7d5b2c1e-0000-4000-8000-000000000001", str(tmp_path)),
        template_key="ab" * 32, overlay=tmp_path / "i" / "overlay.qcow2", seed=tmp_path / "i" / "seed.iso",
        console_log=tmp_path / "i" / "console.log",
    )
    saved = template_xml(tmp_path)
    xml = save_image.clone_xml(saved, clone)
    root = ET.fromstring(xml)
    assert (root.findtext("name"), root.findtext("uuid")) == (clone.name, clone.uuid)
    assert domain.read_metadata(xml) == domain.DomainMetadata(clone.metadata.instance_uuid, clone.metadata.data_dir,
                                                              template_key=clone.template_key)
    marks = root.findall(f"metadata/{{{domain.TEMPLATE_NS}}}clone")
    assert [mark.get("key") for mark in marks] == [clone.template_key]
    disks = root.findall("devices/disk")
    assert [d.find("source").get("file") for d in disks] == [str(clone.overlay), str(clone.seed)]  # type: ignore[union-attr]
    assert root.find("devices/disk/backingStore") is None
    assert root.find("devices/serial/log").get("file") == str(clone.console_log)  # type: ignore[union-attr]
    # Nothing else changes: the same devices in the same order.
    before = ET.fromstring(saved)
    for part in ("devices", "os", "memory", "vcpu"):
        assert [e.tag for e in root.find(part).iter()] == [  # type: ignore[union-attr]
            e.tag for e in before.find(part).iter() if e.tag != "backingStore"]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="nvram"):
        save_image.clone_xml(saved, attrs.evolve(clone, nvram=tmp_path / "nv.fd"))


async def read_fifo(path: Path, into: bytearray) -> None:
    fd = os.open(path, os.O_RDONLY)  # does not block: the pipe's own descriptor is a writer
    try:
        while chunk := await trio.to_thread.run_sync(os.read, fd, 1 << 16):
            into += chunk
    finally:
        os.close(fd)


async def test_the_pipe_streams_the_clone_file_byte_for_byte(tmp_path: Path) -> None:
    stream = b"QEVM" + secrets.token_bytes(3 << 20)  # much more than a pipe holds
    synthetic_save(tmp_path / "state.sav", "<domain>template</domain>", stream)
    header = save_image.read_header_file(tmp_path / "state.sav")
    got = bytearray()
    fifo = tmp_path / "clone.fifo"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with save_image.clone_pipe(tmp_path / "state.sav", fifo, "<domain>clone</domain>") as pipe:
                assert fifo.exists()
                nursery.start_soon(read_fifo, fifo, got)
                await pipe.done.wait()
                assert pipe.written == pipe.total
            assert not fifo.exists()
    assert bytes(got) == save_image.clone_header(header, "<domain>clone</domain>") + stream


async def test_a_pipe_nobody_reads_is_cancellable_and_leaves_nothing(tmp_path: Path) -> None:
    synthetic_save(tmp_path / "state.sav", "<domain/>", secrets.token_bytes(1 << 20))
    fifo = tmp_path / "clone.fifo"
    with trio.move_on_after(0.5) as scope:
        async with save_image.clone_pipe(tmp_path / "state.sav", fifo, "<domain/>") as pipe:
            await pipe.done.wait()  # never: the pipe is full
    assert scope.cancelled_caught and not pipe.done.is_set() and 0 < pipe.written < pipe.total
    assert not fifo.exists()


async def test_a_reader_of_a_stopped_pipe_sees_the_end_not_a_hang(tmp_path: Path) -> None:
    stream = secrets.token_bytes(8 << 20)  # more than the pipe holds (save_image.PIPE_CHUNK): the writer is cut
    synthetic_save(tmp_path / "state.sav", "<domain/>", stream)
    got = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with save_image.clone_pipe(tmp_path / "state.sav", tmp_path / "clone.fifo", "<domain/>") as pipe:
                nursery.start_soon(read_fifo, pipe.path, got)
                while pipe.written < 1 << 18:
                    await trio.sleep(0.001)
            # left early: the reader got a cut stream, then the end of the file
    assert HEADER.size + DATA_LEN <= len(got) < pipe.total


async def test_an_unusable_state_file_fails_before_any_pipe(tmp_path: Path) -> None:
    (tmp_path / "state.sav").write_bytes(b"not a save file at all" * 10)
    with pytest.raises(ValueError):
        async with save_image.clone_pipe(tmp_path / "state.sav", tmp_path / "clone.fifo", "<domain/>"):
            pass
    assert not (tmp_path / "clone.fifo").exists()
