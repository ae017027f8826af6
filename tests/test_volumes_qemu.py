"""The qemu virtualizer's volume store (virtualizers/qemu/volumes.py and its pool_calls, volume_records, swap)
against the real system libvirtd: the launcher's own dir pool under a fresh data dir in /var/tmp/launcher-tests
(removed, with its pool, whatever the outcome), blank volumes, clones of the test guest image, errors, and what
survives a re-open.

Only the own dir pool is tested: an operator's RBD, LVM or NFS pool (`qemu.volumes.pool`) is not."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import libvirt
import pytest
import trio
from conftest import EXAMPLE_IMAGE_IDS, QemuTestRoot

from launcher.plugin.errors import LauncherError, SetupError
from launcher.plugin.host import BackendHost
from launcher.plugin.protocol import volume_catalog
from launcher.plugin.settings import ConfigError, parse_section
from virtualizers.qemu.backend import QemuBackend, open_backend
from virtualizers.qemu.settings import QemuSettings
from virtualizers.qemu.volume_records import RECORDS_DIR
from virtualizers.qemu.volumes import VOLUMES_DIR, VolumeStore, own_pool_name

IMAGE_ID = EXAMPLE_IMAGE_IDS[0]
MIB = 1 << 20


def new_id() -> str:
    return str(uuid_module.uuid4())


def conn() -> libvirt.virConnect:
    return libvirt.open("qemu:///system")


def qemu_img_info(path: str) -> dict[str, Any]:
    done = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True,
                          check=True, timeout=60)
    info: dict[str, Any] = json.loads(done.stdout)
    return info


@pytest.fixture
def data_dir(stale_test_runs_removed: None) -> Iterator[Path]:
    """A fresh data dir that QEMU's user may traverse; afterwards its pool (volumes included) and the dir go."""
    root = QemuTestRoot.create()
    try:
        directory = root.path / "data"
        directory.mkdir(mode=0o711)
        yield directory
    finally:
        root.remove()  # remove_pools_under too (tests/libvirt_cleanup.py)
        with conn() as connection:
            names = {pool.name() for pool in connection.listAllStoragePools()}
        assert own_pool_name(root.path / "data") not in names


def host_for(data_dir: Path) -> BackendHost:
    return BackendHost(data_dir, trio.CapacityLimiter(4), emit=lambda type_, **fields: None,
                       log=lambda instance_dir, message: None)


@asynccontextmanager
async def backend(data_dir: Path, image_dir: Path, **qemu: Any) -> AsyncIterator[QemuBackend]:
    async with open_backend({"image_dirs": [str(image_dir)], **qemu}, host_for(data_dir)) as opened:
        await opened.open_volumes()  # what the preflight does
        yield opened


async def setup_error(data_dir: Path, image_dir: Path, **qemu: Any) -> str:
    """The message of the SetupError that opening the backend raises (the CLI unwraps it from the hypervisor's
    exception group the same way)."""
    try:
        async with backend(data_dir, image_dir, **qemu):
            pass
    except BaseException as exc:  # noqa: BLE001 (looked into below)
        errors = [leaf for leaf in _leaves(exc) if isinstance(leaf, SetupError)]
        assert len(errors) == 1, exc
        return str(errors[0])
    raise AssertionError("no SetupError")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def store_of(opened: QemuBackend) -> VolumeStore:
    store = volume_catalog(opened)
    assert isinstance(store, VolumeStore) and store is opened.volumes
    return store


async def expect_error(code: str, call: Any, match: str = "") -> LauncherError:
    with pytest.raises(LauncherError) as caught:
        await call
    assert caught.value.code == code, caught.value
    assert match in caught.value.reason
    return caught.value


def pool_files(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / VOLUMES_DIR).iterdir()}


def record_files(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / RECORDS_DIR).iterdir()}


def qemu_gid() -> int:
    return grp.getgrnam("libvirt-qemu").gr_gid


async def test_blank_qcow2_and_raw_volumes(data_dir: Path, guest_image_dir: Path) -> None:
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        pool_dir = data_dir / VOLUMES_DIR
        info = os.stat(pool_dir)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o710, os.getuid(), qemu_gid())
        assert await store.list() == []

        one, two = new_id(), new_id()
        created = await store.create(one, 64, "qcow2")
        assert (created.id, created.size_mb, created.format, created.source_image, created.clone) == \
            (one, 64, "qcow2", "", "")
        assert not created.bootable
        assert created.path == str(pool_dir / f"{one}.qcow2")
        assert created.allocation_mb < 64
        raw = await store.create(two, 32, "raw")
        assert (raw.size_mb, raw.format, raw.allocation_mb, raw.path) == (32, "raw", 0, str(pool_dir / f"{two}.raw"))
        assert await store.get(one) == created
        assert [v.id for v in await store.list()] == sorted([one, two])
        assert pool_files(data_dir) == {f"{one}.qcow2", f"{two}.raw"}
        assert record_files(data_dir) == {f"{one}.json", f"{two}.json"}

        for name, fmt, size in ((f"{one}.qcow2", "qcow2", 64), (f"{two}.raw", "raw", 32)):
            path = pool_dir / name
            info = os.stat(path)
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, os.getuid())
            image = qemu_img_info(str(path))
            assert (image["format"], image["virtual-size"]) == (fmt, size * MIB)
            assert "backing-filename" not in image
        with conn() as connection:
            xml = ET.fromstring(connection.storagePoolLookupByName(store.pool_name)
                                .storageVolLookupByName(f"{one}.qcow2").XMLDesc(0))
        assert xml.find("target/format").get("type") == "qcow2"  # type: ignore[union-attr]
        assert xml.findtext("target/permissions/mode") == "0600"

        assert [(v.path, v.format) for v in (await store.get(one), await store.get(two))] == \
            [(str(pool_dir / f"{one}.qcow2"), "qcow2"), (str(pool_dir / f"{two}.raw"), "raw")]

        grown = await store.resize(one, 128)
        assert grown.size_mb == 128 and qemu_img_info(created.path)["virtual-size"] == 128 * MIB
        assert (await store.resize(two, 32)).size_mb == 32  # the same size: nothing to do
        assert (await store.resize(two, 40)).size_mb == 40

        await store.delete(one)
        await expect_error("not_found", store.get(one))
        assert [v.id for v in await store.list()] == [two]
        assert pool_files(data_dir) == {f"{two}.raw"}
        assert record_files(data_dir) == {f"{two}.json"}
        await store.delete(two)
        assert await store.list() == [] and pool_files(data_dir) == set() and record_files(data_dir) == set()


async def test_copy_on_write_clone_of_an_image(data_dir: Path, guest_image_dir: Path) -> None:
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        image = await opened.images.ensure(IMAGE_ID)
        image_mb = -(-image.virtual_size // MIB)
        cow = new_id()
        volume = await store.create(cow, 0, "qcow2", source_image=IMAGE_ID)  # clone="cow" is the default
        assert (volume.size_mb, volume.format, volume.source_image, volume.clone) == \
            (image_mb, "qcow2", IMAGE_ID, "cow")
        assert volume.bootable
        info = qemu_img_info(volume.path)
        assert info["backing-filename"] == str(image.path.absolute())
        assert info["backing-filename-format"] == image.format
        assert info["virtual-size"] == image_mb * MIB
        assert volume.allocation_mb < 2  # copy-on-write: nothing copied
        with conn() as connection:
            xml = ET.fromstring(connection.storagePoolLookupByName(store.pool_name)
                                .storageVolLookupByName(f"{cow}.qcow2").XMLDesc(0))
        assert xml.findtext("backingStore/path") == str(image.path.absolute())
        # The backing image stays readable by QEMU's group.
        assert os.stat(image.path).st_gid in (qemu_gid(), os.getgid())

        bigger = await store.create(new_id(), image_mb + 100, "qcow2", source_image=IMAGE_ID, clone="cow")
        assert bigger.size_mb == image_mb + 100
        assert qemu_img_info(bigger.path)["backing-filename"] == str(image.path.absolute())


async def test_full_copy_of_an_image(data_dir: Path, guest_image_dir: Path) -> None:
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        image = await opened.images.ensure(IMAGE_ID)
        image_mb = -(-image.virtual_size // MIB)
        raw = await store.create(new_id(), 0, "raw", source_image=IMAGE_ID, clone="copy")
        qcow2 = await store.create(new_id(), image_mb + 8, "qcow2", source_image=IMAGE_ID, clone="copy")
        assert (raw.size_mb, raw.format, raw.source_image, raw.clone) == (image_mb, "raw", IMAGE_ID, "copy")
        assert (qcow2.size_mb, qcow2.format, qcow2.clone) == (image_mb + 8, "qcow2", "copy")
        for volume in (raw, qcow2):
            info = qemu_img_info(volume.path)
            assert "backing-filename" not in info and info["format"] == volume.format
            assert volume.allocation_mb > 0
            # Same content as the image (the larger volume's tail reads as zeros).
            subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", image.format, "-F", volume.format,
                            str(image.path), volume.path], check=True, timeout=120)
            assert stat.S_IMODE(os.stat(volume.path).st_mode) == 0o600


async def test_refused_requests_leave_nothing(data_dir: Path, guest_image_dir: Path) -> None:
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        unknown = new_id()
        await expect_error("not_found", store.get(unknown))
        await expect_error("not_found", store.delete(unknown))
        await expect_error("not_found", store.resize(unknown, 10))

        taken = new_id()
        await store.create(taken, 16, "qcow2")
        await expect_error("volume_exists", store.create(taken, 16, "qcow2"))
        await expect_error("volume_exists", store.create(taken, 16, "raw"))
        await expect_error("invalid_data", store.resize(taken, 8), "shrinking")

        await expect_error("invalid_data", store.create(new_id(), 16, "raw", source_image=IMAGE_ID), "qcow2")
        await expect_error("invalid_data", store.create(new_id(), 16, "qcow2", source_image="no-such-image"),
                           "no-such-image")
        await expect_error("invalid_data", store.create(new_id(), 1, "qcow2", source_image=IMAGE_ID), "smaller")
        await expect_error("invalid_data", store.create(new_id(), 1, "raw", source_image=IMAGE_ID, clone="copy"),
                           "smaller")
        await expect_error("invalid_data", store.create(new_id(), 0, "qcow2"), "size_mb")
        await expect_error("invalid_data", store.create(new_id(), (64 << 20) + 1, "qcow2"), "size_mb")
        await expect_error("invalid_data", store.create(new_id(), 16, "vmdk"), "format")
        await expect_error("invalid_data", store.create(new_id(), 16, "qcow2", source_image=IMAGE_ID,
                                                        clone="link"), "clone")
        for bad in ("../etc", "a/b", "x" * 10, "abc.qcow2", "-abc", "a" * 65, ""):
            await expect_error("invalid_data", store.create(bad, 16, "qcow2"), "invalid volume id")
            await expect_error("invalid_data", store.get(bad), "invalid volume id")
        assert [v.id for v in await store.list()] == [taken]
        assert pool_files(data_dir) == {f"{taken}.qcow2"}
        assert record_files(data_dir) == {f"{taken}.json"}


async def test_a_failed_or_cancelled_copy_leaves_nothing(data_dir: Path, guest_image_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that overruns its bound fails with volume_failure; a cancelled one too leaves no volume."""
    async with backend(data_dir, guest_image_dir) as opened:
        await opened.images.ensure(IMAGE_ID)
        store = VolumeStore(opened.hypervisor, opened.images, data_dir=data_dir, pool="",
                            limiter=trio.CapacityLimiter(2), copy_timeout_s=0.001)
        await store.open()
        await expect_error("volume_failure", store.create(new_id(), 0, "raw", source_image=IMAGE_ID, clone="copy"),
                           "took more than")
        assert pool_files(data_dir) == set() and record_files(data_dir) == set()

        store = store_of(opened)
        copying = trio.Event()

        async def copy_forever(*args: Any) -> None:
            copying.set()
            await trio.sleep_forever()

        monkeypatch.setattr(store, "_copy", copy_forever)
        volume_id = new_id()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(store.create, volume_id, 0, "qcow2", source_image=IMAGE_ID, clone="copy"))
            await copying.wait()
            assert pool_files(data_dir) == {f"{volume_id}.qcow2"}  # made, not committed
            assert await store.list() == []
            nursery.cancel_scope.cancel()
        assert await store.list() == []
        assert pool_files(data_dir) == set() and record_files(data_dir) == set()


async def test_a_full_pool_is_storage_full(data_dir: Path, guest_image_dir: Path) -> None:
    """The pool dir on an 8 MiB tmpfs: a blank qcow2 fits, a full copy of the test guest does not (storage_full,
    with qemu-img's reason) and leaves nothing behind."""
    pool_dir = data_dir / VOLUMES_DIR
    pool_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(pool_dir)], check=True, timeout=30)
    try:
        async with backend(data_dir, guest_image_dir) as opened:
            store = store_of(opened)
            small = await store.create(new_id(), 16, "qcow2")
            failed = await expect_error("storage_full", store.create(new_id(), 0, "raw", source_image=IMAGE_ID,
                                                                     clone="copy"), "No space left on device")
            assert "copying image" in failed.reason
            assert pool_files(data_dir) == {f"{small.id}.qcow2"}
            assert record_files(data_dir) == {f"{small.id}.json"}
            await store.delete(small.id)
    finally:
        subprocess.run(["umount", "-l", str(pool_dir)], check=True, timeout=30)


async def test_volumes_and_their_metadata_survive_a_reopen(data_dir: Path, guest_image_dir: Path) -> None:
    blank, cow, copy = new_id(), new_id(), new_id()
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        await store.create(blank, 16, "raw")
        await store.create(cow, 0, "qcow2", source_image=IMAGE_ID)
        await store.create(copy, 0, "qcow2", source_image=IMAGE_ID, clone="copy")
        before = await store.list()
        pool_name = store.pool_name
    assert pool_name == own_pool_name(data_dir)
    with conn() as connection:
        pool = connection.storagePoolLookupByName(pool_name)
        assert pool.isActive() and pool.autostart() and pool.isPersistent()
    async with backend(data_dir, guest_image_dir) as opened:
        after = await store_of(opened).list()
        assert after == before
        assert [(v.id, v.source_image, v.clone) for v in after] == \
            sorted([(blank, "", ""), (cow, IMAGE_ID, "cow"), (copy, IMAGE_ID, "copy")])
    # An inactive pool (libvirtd restarted without autostart, or an operator's pool-destroy) is started again.
    with conn() as connection:
        connection.storagePoolLookupByName(pool_name).destroy()
    async with backend(data_dir, guest_image_dir) as opened:
        assert await store_of(opened).list() == before


async def test_open_clears_an_interrupted_create(data_dir: Path, guest_image_dir: Path) -> None:
    """A volume without its record (the create did not commit) is deleted; a record without its volume is
    dropped; a broken record is rebuilt from its volume (its source image from its backing file), or removed if
    the volume is gone too; files of other names in the pool dir are left alone."""
    kept, orphan_volume, orphan_record, broken, broken_gone = (new_id() for _ in range(5))
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        await store.create(kept, 16, "qcow2")
        await store.create(orphan_record, 16, "qcow2")
        await store.create(broken, 0, "qcow2", source_image=IMAGE_ID)
        (data_dir / RECORDS_DIR / f"{broken}.json").write_text("{not json")
        (data_dir / RECORDS_DIR / f"{broken_gone}.json").write_text("[]")
        xml = (f"<volume><name>{orphan_volume}.raw</name><capacity>1048576</capacity>"
               "<target><format type='raw'/></target></volume>")
        with conn() as connection:
            pool = connection.storagePoolLookupByName(store.pool_name)
            pool.createXML(xml, 0)
            pool.storageVolLookupByName(f"{orphan_record}.qcow2").delete(0)
        (data_dir / VOLUMES_DIR / "notes.txt").write_text("an operator's file\n")
    async with backend(data_dir, guest_image_dir) as opened:
        volumes = {v.id: v for v in await store_of(opened).list()}
        assert volumes.keys() == {kept, broken}
        # Its backing file names the image it was cloned from.
        assert (volumes[broken].format, volumes[broken].source_image, volumes[broken].clone) == \
            ("qcow2", IMAGE_ID, "cow")
    assert pool_files(data_dir) == {f"{kept}.qcow2", f"{broken}.qcow2", "notes.txt"}
    assert record_files(data_dir) == {f"{kept}.json", f"{broken}.json"}


async def test_the_preflight_sets_the_store_up(data_dir: Path, guest_image_dir: Path) -> None:
    """`launcher serve`'s preflight opens the store (and checks QEMU's way into the pool dir); before it, the
    backend has no volume catalog (`launcher hard-reset` never sets a pool up)."""
    (data_dir / "instances").mkdir(mode=0o711)
    async with open_backend({"image_dirs": [str(guest_image_dir)]}, host_for(data_dir)) as opened:
        assert volume_catalog(opened) is None
        assert not (data_dir / VOLUMES_DIR).exists()
        await opened.preflight()
        store = store_of(opened)
        assert store.pool_name == own_pool_name(data_dir) and store.own_pool
        assert await opened.open_volumes() is store
        assert (await store.create(new_id(), 8, "qcow2")).size_mb == 8


async def test_a_pool_dir_removed_behind_libvirts_back_is_made_again(data_dir: Path,
                                                                      guest_image_dir: Path) -> None:
    """The active pool's directory (volumes and all) removed by hand: the next open builds it again and forgets
    the volumes that went with it."""
    async with backend(data_dir, guest_image_dir) as opened:
        await store_of(opened).create(new_id(), 16, "qcow2")
    shutil.rmtree(data_dir / VOLUMES_DIR)
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        assert await store.list() == []
        assert record_files(data_dir) == set()
        info = os.stat(data_dir / VOLUMES_DIR)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o710, qemu_gid())
        assert (await store.create(new_id(), 16, "raw")).size_mb == 16


async def test_a_pool_of_our_name_elsewhere_is_a_setup_error(data_dir: Path, guest_image_dir: Path) -> None:
    name = own_pool_name(data_dir)
    elsewhere = data_dir / "elsewhere"
    xml = f"<pool type='dir'><name>{name}</name><target><path>{elsewhere}</path></target></pool>"
    with conn() as connection:
        connection.storagePoolDefineXML(xml, 0)  # removed by the fixture (its target is under the test root)
    message = await setup_error(data_dir, guest_image_dir)
    assert f"storage pool '{name}' (dir pool at {elsewhere})" in message
    assert "virsh pool-undefine" in message


async def test_an_operators_pool_that_does_not_exist_is_a_setup_error(data_dir: Path, guest_image_dir: Path) -> None:
    message = await setup_error(data_dir, guest_image_dir, volumes={"pool": "launcher-test-no-such-pool"})
    assert "qemu.volumes.pool: libvirt has no storage pool 'launcher-test-no-such-pool'" in message


def test_volumes_settings() -> None:
    assert parse_section(QemuSettings, {}, "qemu.").volumes.pool == ""
    assert parse_section(QemuSettings, {"volumes": {"pool": "ceph"}}, "qemu.").volumes.pool == "ceph"
    assert parse_section(QemuSettings, {}, "qemu.").volumes.copy_timeout_s == 3600
    with pytest.raises(ConfigError, match="qemu.volumes.copy_timeout_s: must be at least 1"):
        parse_section(QemuSettings, {"volumes": {"copy_timeout_s": 0}}, "qemu.")
    with pytest.raises(ConfigError, match="qemu.volumes.pol: unknown setting"):
        parse_section(QemuSettings, {"volumes": {"pol": "x"}}, "qemu.")


async def test_qemu_opens_a_volume_through_libvirts_dac_labels(data_dir: Path, guest_image_dir: Path) -> None:
    """What `get` gives (path, format) is enough for a domain's disk: a paused transient domain (QEMU starts and opens
    its disks, the guest does not run) with a copy-on-write volume as its disk. While it runs, libvirt has handed
    the 0600 file to QEMU's user (dynamic_ownership); once it is destroyed, the file is the launcher's again."""
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        volume_id = new_id()
        await store.create(volume_id, 0, "qcow2", source_image=IMAGE_ID)
        volume = await store.get(volume_id)
        path, fmt = volume.path, volume.format
        name = f"launcher-volume-test-{volume_id[:8]}"
        xml = f"""<domain type='qemu'>
          <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='q35'>hvm</type></os>
          <devices>
            <disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{path}'/>
              <target dev='vda' bus='virtio'/><serial>{volume_id}</serial></disk>
          </devices></domain>"""
        with conn() as connection:
            domain = connection.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
            try:
                assert os.stat(path).st_uid == pwd_uid("libvirt-qemu")
                live = ET.fromstring(domain.XMLDesc(0))
                assert live.findtext("devices/disk/serial") == volume_id
            finally:
                domain.destroy()
        info = os.stat(path)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.getuid(), 0o600)
        assert (await store.get(volume_id)).clone == "cow"


def pwd_uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


async def test_format_swap_makes_blank_raw_volumes_swap_space_and_nothing_else(data_dir: Path,
                                                                            guest_image_dir: Path) -> None:
    """mkswap on a blank raw volume (its file gets the SWAPSPACE2 signature, blkid calls it swap); a volume that is
    swap already is left as it is (a START carried on); qcow2 or a raw volume holding data is refused, unchanged."""
    async with backend(data_dir, guest_image_dir) as opened:
        store = store_of(opened)
        swap, qcow2, full = new_id(), new_id(), new_id()
        path = (await store.create(swap, 16, "raw")).path
        assert await store.format_swap(swap) is True
        with open(path, "rb") as file:
            assert file.read(4096)[-10:] == b"SWAPSPACE2"
        blkid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", path], capture_output=True, text=True)
        assert blkid.stdout.strip() == "swap", blkid
        assert await store.format_swap(swap) is False
        await store.create(qcow2, 16, "qcow2")
        await expect_error("invalid_data", store.format_swap(qcow2), "a swap volume must be raw")
        data_path = (await store.create(full, 16, "raw")).path
        with open(data_path, "r+b") as file:
            file.write(b"precious data")
        await expect_error("invalid_data", store.format_swap(full), "it is not overwritten")
        with open(data_path, "rb") as file:
            assert file.read(13) == b"precious data"
        await expect_error("not_found", store.format_swap(new_id()))
