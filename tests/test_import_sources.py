"""Image import reads only from the allow-list (image_dirs, image_url, qemu.import_sources), follows redirects
only within it, stops at qemu.image_max_bytes, and commits images that only the launcher and QEMU's group can
read. Real files, the real qemu-img and real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest
import trio
from conftest import LauncherProcess, QemuTestRoot
from test_images import MiB, files_in, http_response, make_qcow2, make_raw, open_store, tiny_server
from test_setup import refusal, serve

from virtualizers.qemu import preflight
from virtualizers.qemu.image_errors import ImageError
from virtualizers.qemu.import_policy import REFUSED, SourceRefused


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """(allowed dir with a good image in it, a dir outside the allow-list with a root-only image in it)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    make_qcow2(allowed / "good.qcow2")
    secret = make_qcow2(outside / "secret.qcow2")
    secret.chmod(0o600)
    return allowed, outside


async def refused(store: object, source: str) -> str:
    with pytest.raises(SourceRefused) as caught:
        await store.import_(source, "x")  # type: ignore[attr-defined]
    assert caught.value.code == "invalid_data"
    return str(caught.value)


async def test_files_outside_the_allow_list_are_refused_alike(tmp_path: Path, places: tuple[Path, Path]) -> None:
    """A root-only image outside, a missing file outside, /etc/shadow: one answer, which says nothing of them."""
    allowed, outside = places
    root = tmp_path / "store"
    store = await open_store(root, import_sources=[str(allowed)])
    answers = {await refused(store, source) for source in (
        str(outside / "secret.qcow2"), str(outside / "missing.qcow2"), "/etc/shadow", "/etc/no-such-file",
        f"file://{outside}/secret.qcow2", str(outside), "relative/good.qcow2", "good.qcow2",
        f"file://other-host{allowed}/good.qcow2", "ftp://127.0.0.1/x.img",
    )}
    assert answers == {REFUSED}
    assert files_in(root) == set() and store.list() == []
    info = await store.import_(str(allowed / "good.qcow2"), "good")  # the allowed one still works
    assert info.format == "qcow2" and files_in(root) == {"good.img", "good.json"}


async def test_dot_dot_and_symlink_escapes_are_refused(tmp_path: Path, places: tuple[Path, Path]) -> None:
    allowed, outside = places
    (allowed / "escape.qcow2").symlink_to(outside / "secret.qcow2")
    (allowed / "up").symlink_to(outside)
    (allowed / "inside.qcow2").symlink_to(allowed / "good.qcow2")
    root = tmp_path / "store"
    store = await open_store(root, import_sources=[str(allowed)])
    for source in (f"{allowed}/../outside/secret.qcow2", f"{allowed}/sub/../../outside/secret.qcow2",
                   str(allowed / "escape.qcow2"), str(allowed / "up" / "secret.qcow2"),
                   f"file://{allowed}/escape.qcow2", f"file://{allowed}/../outside/secret.qcow2"):
        assert await refused(store, source) == REFUSED, source
    assert files_in(root) == set()
    # A link that stays inside is fine.
    assert (await store.import_(str(allowed / "inside.qcow2"), "inside")).format == "qcow2"


async def test_a_published_digest_outside_the_allow_list_is_refused(tmp_path: Path,
                                                                    places: tuple[Path, Path]) -> None:
    """`<source>.sha256` is read too: a link from there to elsewhere must not be followed."""
    allowed, outside = places
    (outside / "digest").write_text("0" * 64 + "\n")
    (allowed / "good.qcow2.sha256").symlink_to(outside / "digest")
    root = tmp_path / "store"
    store = await open_store(root, import_sources=[str(allowed)])
    assert await refused(store, str(allowed / "good.qcow2")) == REFUSED
    assert files_in(root) == set()


async def test_ensure_reads_the_search_dirs_and_their_links(tmp_path: Path, places: tuple[Path, Path]) -> None:
    """START's automatic import keeps working: what the operator put in image_dirs (links too) is read."""
    allowed, outside = places
    (allowed / "linked.qcow2").symlink_to(outside / "secret.qcow2")
    store = await open_store(tmp_path / "store", search_dirs=[allowed], import_sources=[])
    assert (await store.ensure("good")).format == "qcow2"
    assert (await store.ensure("linked")).format == "qcow2"
    # and the API-side import from image_dirs is allowed (the link out is not)
    assert (await store.import_(str(allowed / "good.qcow2"), "again")).format == "qcow2"
    assert await refused(store, str(allowed / "linked.qcow2")) == REFUSED


async def counting_server(nursery: trio.Nursery, routes: dict[str, bytes]) -> tuple[str, list[str]]:
    """`tiny_server`, and the paths it is asked for, in order."""
    asked: list[str] = []
    return await tiny_server(nursery, routes, asked=asked), asked


async def test_urls_outside_the_prefixes_are_refused_before_any_request(tmp_path: Path,
                                                                        nursery: trio.Nursery) -> None:
    base, asked = await counting_server(nursery, {"/other.img": http_response("200 OK", b"\0" * MiB)})
    root = tmp_path / "store"
    store = await open_store(root, import_sources=[f"{base}/images/"])
    port = int(base.rsplit(":", 1)[1])
    for source in (f"{base}/other.img", f"{base}/images/../other.img", f"{base}/images/%2e%2e/other.img",
                   f"{base}/images%2f../other.img", f"{base}/imagesX/other.img", f"http://localhost:{port}/images/x",
                   f"https://127.0.0.1:{port}/images/x", f"http://127.0.0.1:{port + 1}/images/x",
                   "http://169.254.169.254/latest/meta-data/", f"http://evil@127.0.0.2:{port}/images/x"):
        assert await refused(store, source) == REFUSED, source
    assert asked == [] and files_in(root) == set()


async def test_a_redirect_out_of_the_allow_list_is_not_followed(tmp_path: Path, nursery: trio.Nursery) -> None:
    elsewhere, asked_elsewhere = await counting_server(nursery, {"/x.img": http_response("200 OK", b"\0" * MiB)})
    base, asked = await counting_server(nursery, {
        "/images/out.img": http_response("302 Found", headers=f"Location: {elsewhere}/x.img\r\n"),
        "/images/meta.img": http_response("301 Moved", headers="Location: http://169.254.169.254/latest/\r\n"),
        "/images/up.img": http_response("302 Found", headers="Location: /secret.img\r\n"),
        "/images/in.img": http_response("307 Temporary Redirect", headers="Location: /images/real.img\r\n"),
        "/images/real.img": http_response("200 OK", b"\0" * MiB),
        "/images/loop.img": http_response("302 Found", headers="Location: /images/loop.img\r\n"),
    })
    root = tmp_path / "store"
    store = await open_store(root, import_sources=[f"{base}/images"], url_template=f"{base}/images/{{id}}.img")
    for name in ("out", "meta", "up"):
        with pytest.raises(ImageError, match=f"GET {base}/images/{name}.img answered HTTP 30., a redirect "
                                             "outside the allowed import sources: refused"):
            await store.import_(f"{base}/images/{name}.img", name)
    with pytest.raises(ImageError, match="a redirect outside the allowed import sources"):
        await store.ensure("out")  # START's import too
    with pytest.raises(ImageError, match="more than 5 redirects"):
        await store.import_(f"{base}/images/loop.img", "loop")
    assert asked_elsewhere == [] and "/secret.img" not in asked
    assert files_in(root) == set()
    info = await store.import_(f"{base}/images/in.img", "in")  # a redirect within the prefix is followed
    assert (info.format, info.size) == ("raw", MiB)


async def test_an_oversize_import_is_stopped(tmp_path: Path, nursery: trio.Nursery) -> None:
    big = b"\0" * (2 * MiB)
    base, _ = await counting_server(nursery, {
        "/announced.img": http_response("200 OK", big),  # Content-Length says 2 MiB
        # no Content-Length: the body ends when the connection closes, so only counting catches it
        "/unannounced.img": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + big,
        "/fits.img": http_response("200 OK", b"\0" * MiB),
    })
    local = make_raw(tmp_path / "big.raw", 2 * MiB)
    root = tmp_path / "store"
    store = await open_store(root, import_sources=[base, str(tmp_path)], max_bytes=MiB)
    for source in (f"{base}/announced.img", f"{base}/unannounced.img", str(local)):
        with pytest.raises(ImageError, match=rf"{source}: refused, larger than qemu.image_max_bytes \(1048576 "
                                             r"bytes\)"):
            await store.import_(source, "big")
        assert files_in(root) == set()
    assert (await store.import_(f"{base}/fits.img", "fits")).size == MiB  # exactly the limit is fine


async def test_imported_images_are_readable_by_owner_and_qemus_group_only(tmp_path: Path,
                                                                          places: tuple[Path, Path]) -> None:
    allowed, _ = places
    os.umask(old := os.umask(0))  # a umask of 0 must not make images world-writable
    try:
        store = await open_store(tmp_path / "store", import_sources=[str(allowed)])
        info = await store.import_(str(allowed / "good.qcow2"), "good")
        assert stat.S_IMODE(info.path.stat().st_mode) == 0o640
        if os.geteuid() == 0:
            store.share_with_group(65534)
            shared = await store.import_(str(allowed / "good.qcow2"), "shared")
            assert stat.S_IMODE(shared.path.stat().st_mode) == 0o640 and shared.path.stat().st_gid == 65534
    finally:
        os.umask(old)


@pytest.mark.parametrize(("qemu", "message"), [
    ({"import_sources": ["relative/dir"]},
     "launcher: qemu.import_sources: 'relative/dir' is neither an absolute directory nor a file://, http:// or "
     "https:// URL"),
    ({"import_sources": ["http:///no-host"]}, "launcher: qemu.import_sources: 'http:///no-host' is not an http"),
    ({"image_url": "http://{id}.images.example/disk.qcow2"}, "launcher: qemu.image_url: {id} must be in the URL's "
                                                              "path, not its host"),
])
def test_bad_import_settings_are_one_line_and_exit_2(tmp_path: Path, qemu: dict[str, object], message: str) -> None:
    assert refusal(serve(tmp_path, {"virtualizer": "qemu", "qemu": qemu})).startswith(message)


def test_the_images_api_refuses_alike_and_imports_from_the_allow_list(stale_test_runs_removed: None) -> None:
    """A real `launcher serve` (qemu virtualizer, the system libvirtd; no VM is started): refused sources are
    400 invalid_data with the same body whether the file exists or not, before any streaming; an allowed import
    is committed readable by the owner and QEMU's group only."""
    root = QemuTestRoot.create()
    try:
        allowed = root.path / "allowed"
        allowed.mkdir()
        make_qcow2(allowed / "good.qcow2")
        data_dir = root.path / "data"
        data_dir.mkdir(mode=0o711)
        launcher = LauncherProcess(data_dir, {"virtualizer": "qemu", "qemu": {"import_sources": [str(allowed)]}})
        launcher.start(timeout=60)
        url = (data_dir / "api-url").read_text()
        headers = {"Authorization": f"Bearer {(data_dir / 'api-token').read_text().strip()}"}

        def post(source: str, image_id: str = "x") -> httpx.Response:
            return httpx.post(f"{url}/v1/images", params={"source": source, "id": image_id}, headers=headers,
                              timeout=60)

        refusals = [post(source) for source in ("/etc/shadow", "/etc/no-such-file", f"{allowed}/../data/api-token",
                                                "http://169.254.169.254/latest/meta-data/")]
        assert len({r.content for r in refusals}) == 1  # byte for byte the same answer
        assert [(r.status_code, r.json()) for r in refusals[:1]] == [
            (400, {"error": "invalid_data", "reason": REFUSED, "instance_uuid": ""})]
        answer = post(str(allowed / "good.qcow2"), "good")
        assert answer.status_code == 200 and '"image"' in answer.text.splitlines()[-1], answer.text
        image = (data_dir / "images" / "good.img").stat()
        connection = libvirt.open("qemu:///system")
        try:
            user = preflight.qemu_user(connection.getCapabilities())
        finally:
            connection.close()
        assert stat.S_IMODE(image.st_mode) == 0o640
        assert user is None or user.uid == 0 or image.st_gid == user.gid
        launcher.kill()
    finally:
        root.remove()


def test_a_vm_boots_from_an_image_imported_0640(qemu_factory: Any) -> None:
    """START's automatic import (from image_dirs, through the links the fixture puts there) keeps working, and
    QEMU (libvirt-qemu) can open the 0640 backing image: the domain runs."""
    from test_qemu import IMAGE_ID, new_uuid, payload_for, start

    launcher = qemu_factory()
    client = launcher.client()
    uuid = new_uuid()
    answer = start(client, payload_for("start_legacy.yaml", uuid), wait=1, timeout=180)
    assert answer["state"] == "running", answer
    image = (launcher.data_dir / "images" / f"{IMAGE_ID}.img").stat()
    assert stat.S_IMODE(image.st_mode) == 0o640
    client.request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)
